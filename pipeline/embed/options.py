"""What an embed job is asked to do (:class:`EmbedOptions`, whose defaults the CLI shows) and reports."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from ..flags import EXECUTORS, PRECISIONS, check_choice
from ..storage import StorageOptions

SAMPLINGS = ("exact", "fast")  # as pipeline.embed.stages.decode has them (not imported: PyAV, for --help)
DECODE_DEVICES = ("cpu", "cuda")  # "cuda": NVDEC (pipeline.embed.stages.decode)
COMPILES = ("auto", "on", "off")  # torch.compile of the video encoder (pipeline.embed.compiling)
IN_PROCESS_MAX_OBJECTS = 64  # "auto" embeds at most this many objects in the job's process...
IN_PROCESS_MAX_BYTES = 256 * 2**20  # ... of at most this many bytes (see pipeline.embed.in_process)...
IN_PROCESS_MAX_CPUS = 4  # ... or any number, on a machine of at most this many CPUs


@dataclass
class EmbedOptions:
    """Everything ``videosearch embed`` can set; ``None`` means "derive from the model or the cluster"."""

    model: str | None = None  # checkpoint directory, URL or file; None: the bundled model
    frames: int | None = None  # frames per video/segment; the model's own count by default
    segment_s: float | None = None  # embed fixed-length segments instead of whole videos
    sampling: str = "exact"  # "fast": the cheapest frames within half a sampling interval (keyframes)
    decode_device: str = "cpu"  # "cuda": decoders decode on their node's GPU (NVDEC)
    batch_size: int = 4  # videos (segments) per encoder call
    compile: str = "auto"  # torch.compile of the encoder; auto: a CPU encoder with a long share of the job
    precision: str = "auto"  # the encoder's dtype: auto (bf16 on a GPU, fp32 on CPUs), fp32 or bf16
    decoders: int | None = None  # decode actors
    encoders: int | None = None  # encode actors
    gpus_per_encoder: float | None = None  # 1 when the cluster has GPUs, else 0
    address: str | None = None  # Ray address; None starts (or joins) a local Ray
    # where the stages run: "ray", "in-process" (this process, no Ray), or "auto": in-process for a small
    # change set when there is no cluster to join (see pipeline.embed.in_process)
    executor: str = "auto"
    # nodes labelled KEY=decode and KEY=encode run that stage only, when both exist ("": labels ignored)
    stage_label: str = "videosearch-stage"
    retry_failed: bool = True  # refresh: decode again the objects that failed in the current version
    allow_worse: bool = False  # publish even a version with no embedded object, or far more failures
    storage: StorageOptions = field(default_factory=StorageOptions)

    def __post_init__(self) -> None:
        """Impossible values are refused here, before anything is read or started."""
        checks = (
            ("--frames", self.frames, lambda v: v >= 1, "at least 1"),
            ("--segment", self.segment_s, lambda v: 0 < v < math.inf, "a positive number of seconds"),
            ("--batch-size", self.batch_size, lambda v: v >= 1, "at least 1"),
            ("--decoders", self.decoders, lambda v: v >= 1, "at least 1"),
            ("--encoders", self.encoders, lambda v: v >= 1, "at least 1"),
            ("--gpus-per-encoder", self.gpus_per_encoder, lambda v: 0 <= v < math.inf, "0 or more"),
        )
        check_choice("--sampling", self.sampling, SAMPLINGS)
        check_choice("--decode-device", self.decode_device, DECODE_DEVICES)
        check_choice("--compile", self.compile, COMPILES)
        check_choice("--precision", self.precision, PRECISIONS)
        check_choice("--executor", self.executor, EXECUTORS)
        for flag, value, valid, wanted in checks:
            if value is not None and not valid(value):
                raise ValueError(f"{flag} must be {wanted}, got {value:g}")


@dataclass(frozen=True)
class StagesRun:
    """How an executor ran a job's stages: where (as :attr:`EmbedSummary.placement`) and whether its encoders
    ran compiled (``--compile``)."""

    placement: dict[str, dict[str, int]] = field(default_factory=dict)
    compiled: bool = False


@dataclass
class EmbedSummary:
    """What a finished job reports: counts, failures and speed."""

    library: str
    version: int
    objects: int
    ok: int
    failed: int
    segments: int
    seconds: float
    failures: list[dict[str, str]]
    changes: dict[str, int] = field(default_factory=dict)  # new, changed, deleted... (see library.refresh)
    published: bool = True  # False: nothing changed, the current version stays
    # stage ("decode", "encode") -> node ("IP short-node-id") -> actors of the stage that ran there
    placement: dict[str, dict[str, int]] = field(default_factory=dict)
    executor: str | None = None  # "ray" or "in-process"; None when nothing was embedded
    compiled: bool = False  # the encoders ran through torch.compile (--compile on, or auto's choice)

    @property
    def videos_per_s(self) -> float:
        return self.objects / self.seconds if self.seconds > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "videos_per_s": round(self.videos_per_s, 3)}

    def text(self) -> str:
        if not self.published:
            return f"library {self.library}: nothing changed since version {self.version}; nothing published"
        lines = [
            f"library {self.library} version {self.version}: {self.objects} objects, {self.ok} embedded "
            f"({self.segments} segments), {self.failed} failed, {self.seconds:.1f} s, "
            f"{self.videos_per_s:.2f} videos/s"
        ]
        if self.changes:
            from ..library.refresh import Changes  # here: the decoders import this module, not the readers

            lines.append("  changes: " + Changes(**self.changes).text())
        if self.executor == "in-process":
            processes = self.placement.get("decode", {}).get("decoder processes")
            decoders = f"{processes} decoder processes" if processes else "decoding threads"
            lines.append(f"  ran on this machine without Ray ({decoders})")
        elif self.placement:
            lines.append("  placement: " + ", ".join(_stage_nodes(s, n) for s, n in self.placement.items()))
        if self.compiled:
            lines.append("  the video encoder ran compiled (torch.compile)")
        lines += [f"  failed: {f['uri']}: {f['error']}" for f in self.failures]
        return "\n".join(lines)


def _stage_nodes(stage: str, nodes: dict[str, int]) -> str:
    """One stage's placement: "decode on 2 nodes (10.0.0.5 3f2a9c1b: 4, 10.0.0.6 9d8e7f6a: 4)"."""
    actors = ", ".join(f"{node}: {count}" for node, count in sorted(nodes.items()))
    return f"{stage} on {len(nodes)} node{'s' if len(nodes) != 1 else ''} ({actors})"
