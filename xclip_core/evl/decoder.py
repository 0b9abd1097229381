"""The EVL decoder: one learned query token reads the video, layer by layer, from the frozen backbone.

Decoder layer i reads the tokens of backbone block N - K + i (K decoder layers over the last K of N blocks,
oldest first), enhanced by the temporal modules (``temporal.py``), flattened over frames: the query attends
to all T x (1 + patches) tokens, every frame's class token included. Each layer is a pre-norm transformer
decoder layer with cross-attention only (no self-attention: there is a single query)::

    x = x + attn(ln1(x), ln_frames(frames), ln_frames(frames))
    x = x + mlp(ln2(x))            # fc1, QuickGELU, dropout, fc2

The query starts as the learned ``query_token`` (zero at initialization: the original defines a normal
init for it but never calls it), and the decoder's output is the query after the last layer, (B, D), D the
backbone's width. The attention projects to ``attention_dim`` (the original's ``decoder_qkv_dim``) and back.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..transformer import MLP
from .backbone import BlockFeatures
from .config import EVLConfig
from .temporal import TemporalModules


class DecoderAttention(nn.Module):
    """Multi-head attention of queries (N, Lq, D) over memory tokens (N, Lm, D), through ``attention_dim``."""

    def __init__(self, dim: int, attention_dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.q_proj = nn.Linear(dim, attention_dim)
        self.k_proj = nn.Linear(dim, attention_dim)
        self.v_proj = nn.Linear(dim, attention_dim)
        self.out_proj = nn.Linear(attention_dim, dim)

    def reset_parameters(self) -> None:
        """The original's initialization: Xavier-uniform weights, zero biases."""
        for proj in (self.q_proj, self.k_proj, self.v_proj, self.out_proj):
            nn.init.xavier_uniform_(proj.weight)
            nn.init.zeros_(proj.bias)

    def forward(self, query: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        def heads(x: torch.Tensor) -> torch.Tensor:
            return x.unflatten(-1, (self.num_heads, -1)).transpose(1, 2)  # (N, heads, L, d)

        q, k, v = heads(self.q_proj(query)), heads(self.k_proj(memory)), heads(self.v_proj(memory))
        mixed = F.scaled_dot_product_attention(q, k, v)  # (N, heads, Lq, d)
        return self.out_proj(mixed.transpose(1, 2).flatten(2))  # (N, Lq, D)


class DecoderMLP(MLP):
    """fc1, activation, dropout, fc2."""

    def __init__(self, dim: int, hidden: int, act: str, dropout: float):
        super().__init__(dim, hidden, act)
        self.dropout = nn.Dropout(dropout)

    def reset_parameters(self) -> None:
        """The original's initialization: Xavier-uniform weights, biases ~ N(0, 1e-6^2)."""
        for fc in (self.fc1, self.fc2):
            nn.init.xavier_uniform_(fc.weight)
            nn.init.normal_(fc.bias, std=1e-6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.dropout(self.act(self.fc1(x))))


class DecoderLayer(nn.Module):
    """x + attn(ln1(x), ln_frames(y)), then x + mlp(ln2(x)): the query (B, 1, D) reads tokens (B, M, D)."""

    def __init__(self, config: EVLConfig):
        super().__init__()
        dim, decoder = config.vision_config.hidden_size, config.decoder_config
        self.layer_norm1 = nn.LayerNorm(dim, eps=decoder.layer_norm_eps)
        self.frames_layer_norm = nn.LayerNorm(dim, eps=decoder.layer_norm_eps)
        self.cross_attn = DecoderAttention(dim, decoder.attention_dim, decoder.num_attention_heads)
        self.layer_norm2 = nn.LayerNorm(dim, eps=decoder.layer_norm_eps)
        self.mlp = DecoderMLP(dim, decoder.intermediate_size, decoder.hidden_act, decoder.mlp_dropout)

    def reset_parameters(self) -> None:
        for norm in (self.layer_norm1, self.frames_layer_norm, self.layer_norm2):
            norm.reset_parameters()
        self.cross_attn.reset_parameters()
        self.mlp.reset_parameters()

    def forward(self, x: torch.Tensor, frames: torch.Tensor) -> torch.Tensor:
        x = x + self.cross_attn(self.layer_norm1(x), self.frames_layer_norm(frames))
        return x + self.mlp(self.layer_norm2(x))


class EVLDecoder(nn.Module):
    """The backbone's last K blocks' features (for B*T frames) -> the video feature (B, D)."""

    def __init__(self, config: EVLConfig):
        super().__init__()
        depth = config.decoder_config.num_layers
        self.query_token = nn.Parameter(torch.zeros(config.vision_config.hidden_size))
        self.temporal = nn.ModuleList(TemporalModules(config) for _ in range(depth))
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(depth))

    def reset_parameters(self) -> None:
        nn.init.zeros_(self.query_token)
        for temporal, layer in zip(self.temporal, self.layers, strict=True):
            temporal.reset_parameters()
            layer.reset_parameters()

    def forward(self, features: list[BlockFeatures], num_frames: int) -> torch.Tensor:
        batch = features[0].out.shape[0] // num_frames

        def per_video(t: torch.Tensor) -> torch.Tensor:
            return t.unflatten(0, (batch, num_frames))  # (B*T, ...) -> (B, T, ...)

        x = self.query_token.expand(batch, 1, -1)  # (B, 1, D)
        for block, temporal, layer in zip(features, self.temporal, self.layers, strict=True):
            frames = temporal(per_video(block.out), per_video(block.q), per_video(block.k))  # (B, T, L, D)
            x = layer(x, frames.flatten(1, 2))  # the query reads all T * L tokens
        return x[:, 0]
