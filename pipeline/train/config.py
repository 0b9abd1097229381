"""How a model trains: the learning-rate schedule, the precision and what learns (:class:`TrainConfig`).

Plain settings with their checks and no torch, so that the command line's parser reads their defaults
without importing the trainer (:mod:`pipeline.train.trainer`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..flags import PRECISIONS

#: What each freezing option leaves trainable (parameter name prefixes / infixes); ``None`` trains all.
FREEZE = {
    "none": None,
    # the few-shot recipe: the CLIP towers stay frozen, X-CLIP's own blocks learn
    "towers": ("mit.", "prompts_generator.", "prompts_visual", "message_", "logit_scale"),
}


@dataclass
class TrainConfig:
    """An optimizer run's settings: a peak learning rate after a linear warm-up, cosine decay to
    ``total_steps``, AdamW's weight decay, the ``freeze`` option and the precision (all checked here)."""

    learning_rate: float = 1e-4  # peak learning rate
    weight_decay: float = 0.01
    freeze: str = "none"  # a key of FREEZE
    warmup_steps: int = 0  # linear warm-up to the peak
    total_steps: int | None = None  # cosine decay to 0 at this step; None keeps the peak
    precision: str = "auto"  # "auto": bf16 autocast on CUDA, float32 elsewhere

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ValueError(f"unknown precision {self.precision!r}; known: {', '.join(PRECISIONS)}")
        trainable("", self.freeze)  # names the known options when this one is not

    def learning_rate_at(self, step: int) -> float:
        """The schedule: a pure function of the step, so a resumed run continues it exactly."""
        rate = self.learning_rate
        if step < self.warmup_steps:
            rate *= (step + 1) / self.warmup_steps
        if self.total_steps:
            decay_steps = max(1, self.total_steps - self.warmup_steps)
            progress = min(1.0, max(0, step - self.warmup_steps) / decay_steps)
            rate *= 0.5 * (1 + math.cos(math.pi * progress))
        return rate


def trainable(name: str, freeze: str) -> bool:
    """Whether parameter ``name`` learns under the ``freeze`` option."""
    if freeze not in FREEZE:
        raise ValueError(f"unknown freeze option {freeze!r}; known: {', '.join(FREEZE)}")
    keep = FREEZE[freeze]
    return keep is None or any(part in name for part in keep)
