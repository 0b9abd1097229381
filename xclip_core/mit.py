"""Multi-frame integration transformer (MIT): fuses the per-frame embeddings of a video into one."""

from __future__ import annotations

import torch
from torch import nn

from .config import VisionConfig
from .transformer import Encoder


class MultiframeIntegrationTransformer(nn.Module):
    """(B, T, D) frame embeddings -> (B, D) video embedding: residual transformer, then mean over frames."""

    def __init__(self, config: VisionConfig):
        super().__init__()
        dim = config.mit_hidden_size
        self.position_embedding = nn.Parameter(torch.zeros(1, config.num_frames, dim))
        self.encoder = Encoder(
            config.mit_num_hidden_layers,
            dim,
            config.mit_intermediate_size,
            config.mit_num_attention_heads,
            config.hidden_act,
            config.layer_norm_eps,
        )

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        x = self.encoder(frames + self.position_embedding) + frames
        return x.mean(dim=1)
