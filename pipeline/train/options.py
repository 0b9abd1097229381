"""What a train job is asked to do (:class:`TrainOptions`, whose defaults the CLI shows) and reports."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from xclip_core.config import XCLIPConfig

from ..flags import EXECUTORS, check_choice
from ..storage import StorageOptions
from ..video_table import DEFAULT_TEMPLATE
from .config import TrainConfig

FAMILIES_TRAINED_NEW = ("xclip", "evl")  # what --family can start
# "auto" trains in the job's process when the decoded clips fill at most this much memory (and see
# pipeline.train.in_process)
IN_PROCESS_MAX_CLIP_BYTES = 2**30


@dataclass
class TrainOptions:
    """What ``videosearch train`` can set."""

    output: str  # where checkpoints go: checkpoint-<step>/ in the Hugging Face layout
    model: str | None = None  # a checkpoint to fine-tune (of any family); None: ``config`` or ``family``
    config: XCLIPConfig | None = None  # geometry when training X-CLIP from scratch
    # "evl": a new EVL model over the frozen towers of ``backbone`` (a CLIP/X-CLIP checkpoint; None: the
    # bundled model): a classifier of a uri,label table's labels, or text-aligned on a uri,caption table
    family: str = "xclip"
    backbone: str | None = None
    resume: str | None = None  # a checkpoint of an earlier run to continue with its own settings and state
    epochs: int = 1  # epochs in all, those of a resumed run included
    batch_size: int = 8  # clips per worker and step
    workers: int = 1
    use_gpu: bool = False
    cpus_per_worker: float | None = None  # default: the most that lets every worker run at once
    template: str = DEFAULT_TEMPLATE  # the caption of a labeled video
    seed: int = 0  # model initialization and shuffling
    # a frozen backbone's features computed once per clip: "on", "off", or "auto" (see train.backbone_cache)
    backbone_cache: str = "auto"
    address: str | None = None  # Ray address; None starts (or joins) a local Ray
    # "ray" (Ray Train), "in-process" (one worker in this process, no Ray), or "auto": in-process for one
    # worker when there is no cluster to join and the decoded clips are small (see pipeline.train.in_process)
    executor: str = "auto"
    train: TrainConfig = field(default_factory=TrainConfig)
    storage: StorageOptions = field(default_factory=StorageOptions)

    def __post_init__(self) -> None:
        check_choice("--family", self.family, FAMILIES_TRAINED_NEW)
        check_choice("--executor", self.executor, EXECUTORS)
        new_evl = self.family == "evl"
        if sum(x is not None for x in (self.model, self.config, self.resume)) + new_evl != 1:
            raise ValueError(
                "train needs exactly one of: a model to fine-tune, a config, a run to resume, or --family evl"
            )
        if self.backbone is not None and not new_evl:
            raise ValueError("--backbone is for a new EVL model (--family evl)")
        if self.epochs < 1 or self.batch_size < 2 or self.workers < 1:
            raise ValueError("epochs and workers must be at least 1, the batch size at least 2")
        if self.executor == "in-process" and self.workers > 1:
            raise ValueError(f"--executor in-process runs one worker: {self.workers} workers need Ray")


@dataclass
class TrainSummary:
    checkpoint: str  # the last checkpoint's URI
    clips: int  # decoded clips trained on
    failed: int  # listed videos that could not be decoded
    epochs: list[dict[str, float]]  # per epoch: epoch, loss (mean over steps), steps (in all)
    seconds: float
    backbone_cached: bool = False  # the epochs stepped from the frozen backbone's features, computed once
    executor: str = "ray"  # where it ran: "ray" (Ray Train) or "in-process"
    missing: int = 0  # videos of the table that do not exist (skipped)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def text(self) -> str:
        lines = [
            f"epoch {int(e['epoch'])}: loss {e['loss']:.4f} ({int(e['steps'])} steps)" for e in self.epochs
        ]
        lines.append(
            f"trained on {self.clips} clips ({self.failed} failed to decode"
            f"{f', {self.missing} missing' if self.missing else ''}) in {self.seconds:.0f} s "
            f"({'in this process' if self.executor == 'in-process' else 'on Ray Train'}); "
            f"last checkpoint: {self.checkpoint}"
        )
        if self.backbone_cached:
            lines.append("the frozen backbone ran once per clip (its features cached for every epoch)")
        return "\n".join(lines)
