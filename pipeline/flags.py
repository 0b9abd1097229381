"""Checks of command-line flag values that the jobs' options share."""

from __future__ import annotations


def check_choice(flag: str, value: str, choices: tuple[str, ...]) -> None:
    """``ValueError`` naming ``flag`` and its ``choices`` unless ``value`` is one of them."""
    if value not in choices:
        raise ValueError(f"{flag} must be one of {', '.join(choices)}, got {value!r}")


#: ``--precision`` of the jobs that run a model: "auto" (bfloat16 on a GPU, float32 on CPUs), "fp32", "bf16".
PRECISIONS = ("auto", "fp32", "bf16")

#: ``--executor`` of the jobs that can run without Ray: "ray", "in-process" (the job's own process), or "auto"
#: (each job's rule: :mod:`pipeline.embed.in_process`, :mod:`pipeline.train.in_process`).
EXECUTORS = ("auto", "ray", "in-process")


class NodeSettingError(ValueError):
    """A setting that the node a worker runs on cannot honour (``--decode-device cuda`` where FFmpeg opens no
    CUDA device): the job stops, publishing nothing, and the command says this one line (exit 2)."""
