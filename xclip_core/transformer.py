"""The pre-norm transformer block that every part of X-CLIP shares (text tower, vision tower, MIT).

Parameter names match the Hugging Face checkpoints (``self_attn.q_proj``, ``layer_norm1``, ``mlp.fc1``...).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    """CLIP's activation: x * sigmoid(1.702 x)."""
    return x * torch.sigmoid(1.702 * x)


ACTIVATIONS = {"quick_gelu": quick_gelu, "gelu": F.gelu, "relu": F.relu}


def activation(name: str):
    if name not in ACTIVATIONS:
        raise ValueError(f"unsupported activation {name!r}; supported: {', '.join(ACTIVATIONS)}")
    return ACTIVATIONS[name]


def embedding(num_embeddings: int, dim: int) -> nn.Embedding:
    """An ``nn.Embedding`` whose weight is left uninitialized: ``XCLIPModel.init_weights`` or a checkpoint
    fills it. (Its own random init has no kernel on the meta device that ``from_pretrained`` builds on, and
    the fallback imports ``torch._dynamo``: seconds in every process that loads a model.)"""
    return nn.Embedding(num_embeddings, dim, _weight=torch.empty(num_embeddings, dim))


class Attention(nn.Module):
    """Multi-head attention with separate q/k/v projections, computed with fused SDPA."""

    def __init__(self, dim: int, num_heads: int, bias: bool = True):
        super().__init__()
        self.num_heads = num_heads
        self.q_proj = nn.Linear(dim, dim, bias=bias)
        self.k_proj = nn.Linear(dim, dim, bias=bias)
        self.v_proj = nn.Linear(dim, dim, bias=bias)

    def heads(self, x: torch.Tensor) -> torch.Tensor:
        # (N, L, D) -> (N, heads, L, D / heads)
        n, length, dim = x.shape
        return x.view(n, length, self.num_heads, dim // self.num_heads).transpose(1, 2)

    def attend(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        mask: torch.Tensor | None = None,
        is_causal: bool = False,
    ) -> torch.Tensor:
        """Project and attend; returns (N, Lq, D) before the output projection."""
        q, k, v = self.heads(self.q_proj(query)), self.heads(self.k_proj(key)), self.heads(self.v_proj(value))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal)
        n, _, length, _ = out.shape
        return out.transpose(1, 2).reshape(n, length, -1)


class SelfAttention(Attention):
    """Self-attention with an output projection named ``out_proj`` (CLIP towers and MIT)."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__(dim, num_heads)
        self.out_proj = nn.Linear(dim, dim)

    def forward(
        self, x: torch.Tensor, mask: torch.Tensor | None = None, is_causal: bool = False
    ) -> torch.Tensor:
        return self.out_proj(self.attend(x, x, x, mask, is_causal))


class MLP(nn.Module):
    def __init__(self, dim: int, hidden: int, act: str):
        super().__init__()
        self.act = activation(act)
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class EncoderLayer(nn.Module):
    """x + attn(ln1(x)), then x + mlp(ln2(x))."""

    def __init__(self, dim: int, hidden: int, num_heads: int, act: str, eps: float):
        super().__init__()
        self.self_attn = SelfAttention(dim, num_heads)
        self.layer_norm1 = nn.LayerNorm(dim, eps=eps)
        self.mlp = MLP(dim, hidden, act)
        self.layer_norm2 = nn.LayerNorm(dim, eps=eps)

    def forward(
        self, x: torch.Tensor, mask: torch.Tensor | None = None, is_causal: bool = False
    ) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x), mask, is_causal)
        return x + self.mlp(self.layer_norm2(x))


class Encoder(nn.Module):
    """A stack of ``EncoderLayer`` (the key prefix ``encoder.layers.N`` of the checkpoints)."""

    def __init__(self, depth: int, dim: int, hidden: int, num_heads: int, act: str, eps: float):
        super().__init__()
        self.layers = nn.ModuleList(EncoderLayer(dim, hidden, num_heads, act, eps) for _ in range(depth))

    def forward(
        self, x: torch.Tensor, mask: torch.Tensor | None = None, is_causal: bool = False
    ) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x, mask, is_causal)
        return x
