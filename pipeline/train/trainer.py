"""Training a model with its family's objective: X-CLIP's contrastive loss over video-conditioned logits,
EVL's cross-entropy over labels or contrastive loss against a frozen text tower.

This is the single-process core (one optimizer step, the learning-rate schedule, mixed precision, freezing,
resumable checkpoints on any fsspec store); the Ray Train job (:mod:`pipeline.train.job`) runs it in each
data-parallel worker. The model is a family's module (loaded with :func:`pipeline.models.load_model`) with
``trains_on`` ("caption" or "label": what each video's target is) and ``training_loss(model, pixel_values,
targets, tokenizer)``, which runs the batch through ``model`` (the module or its data-parallel wrapper). What
learns is the model's business first (EVL's backbone and text tower never do), then ``freeze``'s.
"""

from __future__ import annotations

import contextlib
import io
import json
from collections.abc import Callable, Iterable
from dataclasses import asdict
from typing import Any

import torch

from xclip_core.tokenizer import CLIPTokenizer

from ..bf16 import warn_if_emulated
from ..models import load_model
from ..storage import StorageOptions, Store
from .config import TrainConfig, trainable

HISTORY = "history.json"  # in a checkpoint: the per-epoch records of the run so far


def read_history(checkpoint: Store) -> list[dict[str, float]]:
    """The per-epoch records (epoch, loss, steps) of the run up to ``checkpoint``."""
    return json.loads(checkpoint.read_bytes(HISTORY))


def freeze(model: torch.nn.Module, option: str) -> None:
    """Set which parameters learn (before wrapping the model for data-parallel training): those the model
    trains at all (a family keeps some frozen: EVL's backbone and text tower) that ``option`` leaves
    trainable."""
    for name, param in model.named_parameters():
        param.requires_grad_(param.requires_grad and trainable(name, option))
    if not any(param.requires_grad for param in model.parameters()):
        raise ValueError(f"the freeze option {option!r} leaves nothing of this model to train")


class Trainer:
    """Optimizer steps on (videos, captions) batches, and checkpoints that resume exactly."""

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: CLIPTokenizer | None = None,
        config: TrainConfig | None = None,
    ):
        """``model``: a model (see the module docstring), or one wrapped for data-parallel training (its
        ``.module``); ``tokenizer``: the model's own by default."""
        self.model = model
        self.core: Any = getattr(model, "module", model)  # the family's module, unwrapped
        self.tokenizer = tokenizer or self.core.tokenizer
        self.config = config or TrainConfig()
        freeze(model, self.config.freeze)
        if self.config.precision == "bf16" and next(model.parameters()).device.type == "cpu":
            warn_if_emulated("training", "0.04-0.38x", "bench/train_efficiency.py --dtype bf16")
        params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(
            params, lr=self.config.learning_rate, weight_decay=self.config.weight_decay
        )
        self.step_count = 0
        self.epoch = 0  # epochs finished; saved with the checkpoint so that a resumed run knows where it is
        self.history: list[dict[str, float]] = []  # per finished epoch: epoch, loss (mean), steps (in all)

    def _autocast(self, device: torch.device) -> contextlib.AbstractContextManager:
        precision = self.config.precision
        if precision == "bf16" or (precision == "auto" and device.type == "cuda"):
            return torch.autocast(device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def step(
        self,
        pixel_values: torch.Tensor | None,
        targets: list[str],
        backbone_features: torch.Tensor | None = None,
    ) -> float:
        """One optimizer step on a batch whose i-th target (a caption, or a label: the model's
        ``trains_on``) is the i-th video's; returns the loss. A model with a frozen backbone (EVL) may be
        given the videos' ``backbone_features`` (computed once per clip) instead of their pixels."""
        inputs = pixel_values if backbone_features is None else backbone_features
        if len(targets) != len(inputs) or len(targets) < 2:
            raise ValueError("a batch needs at least two videos, each with one caption or label")
        cached = {} if backbone_features is None else {"backbone_features": backbone_features}
        self.model.train()
        for group in self.optimizer.param_groups:
            group["lr"] = self.config.learning_rate_at(self.step_count)
        with self._autocast(inputs.device):
            loss = self.core.training_loss(self.model, pixel_values, targets, self.tokenizer, **cached)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.step_count += 1
        return loss.item()

    def fit(self, batches: Iterable[tuple[torch.Tensor, list[str]]]) -> list[float]:
        return [self.step(pixel_values, captions) for pixel_values, captions in batches]

    def end_epoch(self, losses: list[float]) -> dict[str, float]:
        """Count a finished epoch whose steps gave ``losses``; returns its record in :attr:`history`."""
        self.epoch += 1
        record = {"epoch": self.epoch, "loss": sum(losses) / max(len(losses), 1), "steps": self.step_count}
        self.history.append(record)
        return record

    # ----------------------------------------------------------------------------------------- checkpoints
    def save(self, uri: str, options: StorageOptions | None = None) -> str:
        """Write ``checkpoint-<step>/`` under ``uri``: the model (Hugging Face layout, with its tokenizer and
        preprocessor files) and the training state (optimizer, step, random generator), tensors only.
        Returns the checkpoint's URI."""
        target = Store(uri, options) / f"checkpoint-{self.step_count:08d}"
        self.core.save_pretrained(target.uri, storage_options=target.fsspec_options())
        self.core.processor.save_pretrained(target.uri, target.fsspec_options())
        state = {
            "optimizer": self.optimizer.state_dict(),
            "step": self.step_count,
            "epoch": self.epoch,
            "rng": torch.get_rng_state(),
            "config": asdict(self.config),
        }
        buffer = io.BytesIO()
        torch.save(state, buffer)
        target.write_bytes("trainer_state.pt", buffer.getvalue())
        target.write_bytes(HISTORY, json.dumps(self.history, indent=1).encode())
        return target.uri

    @classmethod
    def resume(
        cls,
        checkpoint: str,
        tokenizer: CLIPTokenizer | None = None,
        options: StorageOptions | None = None,
        wrap: Callable[[torch.nn.Module], torch.nn.Module] | None = None,
        model: torch.nn.Module | None = None,
    ) -> Trainer:
        """A trainer exactly as it was when ``checkpoint`` was saved. ``wrap`` prepares the (frozen) model for
        data-parallel training before the optimizer is built, as in a Ray Train worker; ``model``: the
        checkpoint's model, loaded already."""
        store = Store(checkpoint, options)
        model = load_model(checkpoint, options) if model is None else model
        state: dict[str, Any] = torch.load(
            io.BytesIO(store.read_bytes("trainer_state.pt")), weights_only=True
        )
        config = TrainConfig(**state["config"])
        freeze(model, config.freeze)
        trainer = cls(wrap(model) if wrap else model, tokenizer, config)
        trainer.optimizer.load_state_dict(state["optimizer"])
        trainer.step_count, trainer.epoch = state["step"], state["epoch"]
        trainer.history = read_history(store)
        torch.set_rng_state(state["rng"])
        return trainer
