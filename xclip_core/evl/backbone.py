"""The frozen CLIP ViT image encoder of EVL, run on every frame independently.

It is CLIP's vision tower as the original EVL code builds it: patch embedding, class token first, position
embedding, ``ln_pre``, pre-norm blocks with QuickGELU, and no ``ln_post`` or projection (the decoder reads
the blocks' outputs, not the pooled embedding). For each of its last K blocks it hands the decoder three
things: the block's output tokens and its self-attention's queries and keys, split into heads, projected
(bias included) but not scaled: the temporal cross-attention compares the queries of one frame with the keys
of its neighbours.

Parameter names are those of the Hugging Face CLIP/X-CLIP vision tower (``embeddings.patch_embedding``,
``pre_layernorm``, ``encoder.layers.N.self_attn.q_proj``...), so that X-CLIP's ``vision_model.*`` weights
load by name. The patch embedding has a bias, unlike CLIP's: EVL's own ViT has one (a linear layer on
flattened patches, zero when converted from CLIP), and a checkpoint trained with ``--finetune_backbone``
may have changed it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..transformer import EncoderLayer
from ..vision import VisionEmbeddings
from .config import EVLVisionConfig


@dataclass
class BlockFeatures:
    """What one backbone block gives the decoder, for B*T frames of L = 1 + patches tokens."""

    out: torch.Tensor  # (B*T, L, D) the block's output
    q: torch.Tensor  # (B*T, L, heads, D / heads) its attention's queries, unscaled
    k: torch.Tensor  # (B*T, L, heads, D / heads) its attention's keys


class FeatureLayer(EncoderLayer):
    """A CLIP block that also returns its attention's queries and keys: x + attn(ln1(x)), x + mlp(ln2(x))."""

    def forward_features(self, x: torch.Tensor) -> BlockFeatures:
        # x: (N, L, D)
        attn = self.self_attn
        h = self.layer_norm1(x)
        q, k, v = (
            proj(h).unflatten(-1, (attn.num_heads, -1)) for proj in (attn.q_proj, attn.k_proj, attn.v_proj)
        )
        mixed = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        x = x + attn.out_proj(mixed.transpose(1, 2).flatten(2))  # (N, L, D)
        x = x + self.mlp(self.layer_norm2(x))
        return BlockFeatures(out=x, q=q, k=k)


class FeatureEncoder(nn.Module):
    """The stack of blocks (``encoder.layers.N``); the last ``num_outputs`` report their features."""

    def __init__(self, config: EVLVisionConfig):
        super().__init__()
        self.layers = nn.ModuleList(
            FeatureLayer(
                config.hidden_size,
                config.intermediate_size,
                config.num_attention_heads,
                config.hidden_act,
                config.layer_norm_eps,
            )
            for _ in range(config.num_hidden_layers)
        )

    def forward_features(self, x: torch.Tensor, num_outputs: int) -> list[BlockFeatures]:
        first = len(self.layers) - num_outputs
        for layer in self.layers[:first]:
            x = layer(x)
        features = []
        for layer in self.layers[first:]:
            features.append(layer.forward_features(x))
            x = features[-1].out
        return features


class VisionBackbone(nn.Module):
    """Frames (N, C, H, W) -> the :class:`BlockFeatures` of the last ``num_outputs`` blocks, oldest first."""

    def __init__(self, config: EVLVisionConfig):
        super().__init__()
        self.embeddings = VisionEmbeddings(config, patch_bias=True)  # EVL's ViT has a patch bias
        self.pre_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.encoder = FeatureEncoder(config)

    def forward(self, pixel_values: torch.Tensor, num_outputs: int) -> list[BlockFeatures]:
        x = self.pre_layernorm(self.embeddings(pixel_values))  # (N, L, D)
        return self.encoder.forward_features(x, num_outputs)


def stack_features(features: list[BlockFeatures], num_frames: int) -> torch.Tensor:
    """The K blocks' features of B videos as one tensor, (B, K, 3, T, L, D): each block's output, queries
    and keys (heads merged), per video: what a clip gives the decoder, the same at every epoch."""
    blocks = [torch.stack([f.out, f.q.flatten(2), f.k.flatten(2)]) for f in features]  # K x (3, B*T, L, D)
    return torch.stack(blocks).unflatten(2, (-1, num_frames)).permute(2, 0, 1, 3, 4, 5)


def unstack_features(stacked: torch.Tensor, num_heads: int) -> list[BlockFeatures]:
    """:func:`stack_features` undone: (B, K, 3, T, L, D) -> K :class:`BlockFeatures` of B*T frames."""
    features = []
    for block in stacked.unbind(1):  # (B, 3, T, L, D)
        out, q, k = (part.flatten(0, 1) for part in block.unbind(1))  # (B*T, L, D)
        features.append(
            BlockFeatures(out=out, q=q.unflatten(-1, (num_heads, -1)), k=k.unflatten(-1, (num_heads, -1)))
        )
    return features
