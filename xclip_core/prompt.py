"""Video-specific prompt generator: text embeddings attend to a video's patch features.

The generated prompt is added to the text embedding, so every (video, text) pair gets its own text
vector: ``text + alpha * decoder(text, layernorm(video_patches))``.
"""

from __future__ import annotations

import torch
from torch import nn

from .config import XCLIPConfig
from .transformer import Attention, activation


class PromptCrossAttention(Attention):
    """Text queries attend to visual keys/values; bias-free q/k/v, output projection named ``proj``."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__(dim, num_heads, bias=False)
        self.proj = nn.Linear(dim, dim)

    def forward(self, text: torch.Tensor, visual: torch.Tensor) -> torch.Tensor:
        return self.proj(self.attend(text, visual, visual))


class PromptMLP(nn.Sequential):
    """Linear -> activation -> Linear, laid out as ``mlp.0`` / ``mlp.3`` like the checkpoints."""

    def __init__(self, dim: int, act: str):
        super().__init__(nn.Linear(dim, dim * 4), _Activation(act), nn.Identity(), nn.Linear(dim * 4, dim))


class _Activation(nn.Module):
    def __init__(self, name: str):
        super().__init__()
        self.fn = activation(name)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x)


class PromptGeneratorLayer(nn.Module):
    def __init__(self, config: XCLIPConfig):
        super().__init__()
        dim, eps = config.projection_dim, config.text_config.layer_norm_eps
        self.cross_attn = PromptCrossAttention(dim, config.prompt_num_attention_heads)
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.norm3 = nn.LayerNorm(dim, eps=eps)
        self.mlp = PromptMLP(dim, config.prompt_hidden_act)

    def forward(self, text: torch.Tensor, visual: torch.Tensor) -> torch.Tensor:
        text = text + self.cross_attn(self.norm1(text), visual)
        return text + self.mlp(self.norm3(text))


class VideoSpecificPromptGenerator(nn.Module):
    """(B, N, P) text embeddings, (B, patches, P) video patch features -> (B, N, P) prompts."""

    def __init__(self, config: XCLIPConfig):
        super().__init__()
        dim = config.projection_dim
        self.layernorm = nn.LayerNorm(dim, eps=config.vision_config.layer_norm_eps)
        self.decoder = nn.ModuleList(PromptGeneratorLayer(config) for _ in range(config.prompt_layers))
        self.alpha = nn.Parameter(torch.full((dim,), config.prompt_alpha))

    def forward(self, text: torch.Tensor, visual: torch.Tensor) -> torch.Tensor:
        visual = self.layernorm(visual)
        for layer in self.decoder:
            text = layer(text, visual)
        return self.alpha * text
