"""Training X-CLIP with its objective: the symmetric contrastive loss over the video-conditioned logits.

This is the single-process core (one optimizer step, freezing, resumable checkpoints on any fsspec store);
the Ray Train data-parallel loop will call it from each worker.
"""

from __future__ import annotations

import io
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any

import torch

from xclip_core import XCLIPModel
from xclip_core.tokenizer import CLIPTokenizer

from .storage import StorageOptions, join, protocol_of, read_bytes, write_bytes

#: What each freezing option leaves trainable (parameter name prefixes / infixes); ``None`` trains all.
FREEZE = {
    "none": None,
    # the few-shot recipe: the CLIP towers stay frozen, X-CLIP's own blocks learn
    "towers": ("mit.", "prompts_generator.", "prompts_visual", "message_", "logit_scale"),
}


@dataclass
class TrainConfig:
    learning_rate: float = 1e-4
    weight_decay: float = 0.01
    freeze: str = "none"  # a key of FREEZE


def trainable(name: str, freeze: str) -> bool:
    """Whether parameter ``name`` learns under the ``freeze`` option."""
    if freeze not in FREEZE:
        raise ValueError(f"unknown freeze option {freeze!r}; known: {', '.join(FREEZE)}")
    keep = FREEZE[freeze]
    return keep is None or any(part in name for part in keep)


def freeze(model: torch.nn.Module, option: str) -> None:
    """Set which parameters learn (before wrapping the model for data-parallel training)."""
    for name, param in model.named_parameters():
        param.requires_grad_(trainable(name, option))


class Trainer:
    """Optimizer steps on (videos, captions) batches, and checkpoints that resume exactly."""

    def __init__(self, model: torch.nn.Module, tokenizer: CLIPTokenizer, config: TrainConfig | None = None):
        """``model``: an :class:`XCLIPModel`, or one wrapped for data-parallel training (its ``.module``)."""
        self.model, self.tokenizer = model, tokenizer
        self.xclip: XCLIPModel = getattr(model, "module", model)
        self.config = config or TrainConfig()
        freeze(model, self.config.freeze)
        params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(
            params, lr=self.config.learning_rate, weight_decay=self.config.weight_decay
        )
        self.step_count = 0

    def step(self, pixel_values: torch.Tensor, captions: list[str]) -> float:
        """One optimizer step on a batch whose i-th caption describes the i-th video; returns the loss."""
        if len(captions) != len(pixel_values) or len(captions) < 2:
            raise ValueError("a batch needs at least two videos, each with one caption")
        self.model.train()
        context = self.xclip.config.text_config.max_position_embeddings
        tokens = self.tokenizer(captions, max_length=min(context, self.tokenizer.model_max_length))
        loss = self.model(tokens["input_ids"], pixel_values, tokens["attention_mask"], return_loss=True).loss
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.step_count += 1
        return loss.item()

    def fit(self, batches: Iterable[tuple[torch.Tensor, list[str]]]) -> list[float]:
        return [self.step(pixel_values, captions) for pixel_values, captions in batches]

    # ----------------------------------------------------------------------------------------- checkpoints
    def save(self, uri: str, options: StorageOptions | None = None) -> str:
        """Write ``checkpoint-<step>/`` under ``uri``: the model (Hugging Face layout) and the training state
        (optimizer, step, random generator), tensors only. Returns the checkpoint's URI."""
        target = join(uri, f"checkpoint-{self.step_count:08d}")
        self.xclip.save_pretrained(
            target, storage_options=(options or StorageOptions()).for_protocol(protocol_of(uri))
        )
        state = {
            "optimizer": self.optimizer.state_dict(),
            "step": self.step_count,
            "rng": torch.get_rng_state(),
            "config": asdict(self.config),
        }
        buffer = io.BytesIO()
        torch.save(state, buffer)
        write_bytes(join(target, "trainer_state.pt"), buffer.getvalue(), options)
        return target

    @classmethod
    def resume(
        cls, checkpoint: str, tokenizer: CLIPTokenizer, options: StorageOptions | None = None
    ) -> Trainer:
        """A trainer exactly as it was when ``checkpoint`` was saved."""
        storage = (options or StorageOptions()).for_protocol(protocol_of(checkpoint))
        model = XCLIPModel.from_pretrained(checkpoint, storage_options=storage)
        state: dict[str, Any] = torch.load(
            io.BytesIO(read_bytes(join(checkpoint, "trainer_state.pt"), options)), weights_only=True
        )
        trainer = cls(model, tokenizer, TrainConfig(**state["config"]))
        trainer.optimizer.load_state_dict(state["optimizer"])
        trainer.step_count = state["step"]
        torch.set_rng_state(state["rng"])
        return trainer
