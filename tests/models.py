"""Tiny random X-CLIP models for tests, with every parameter moved off its initialization.

Initial values such as LayerNorm weights of 1 and zero biases make parts of a model identities that could hide
a mis-wired parameter; perturbing every parameter takes that cover away.
"""

from __future__ import annotations

import torch
import transformers
from torch import nn


def perturbed(model: nn.Module, scale: float = 0.1) -> nn.Module:
    """Add Gaussian noise of ``scale`` to every parameter (uses the global torch seed); returns ``model``."""
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param) * scale)
    return model.eval()


def reference_model(text: dict, vision: dict, seed: int = 0, **config) -> transformers.XCLIPModel:
    """A perturbed ``transformers.XCLIPModel`` (the numerical reference) of the given small geometry."""
    torch.manual_seed(seed)
    return perturbed(
        transformers.XCLIPModel(transformers.XCLIPConfig(text_config=text, vision_config=vision, **config))
    )
