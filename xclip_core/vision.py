"""The CLIP vision encoder with X-CLIP's cross-frame communication.

Each layer first lets the frames of a video talk: every frame's class token becomes a message token
(``message_fc``), the messages of one video attend to each other (``message_attn``), and each frame's
tokens then attend to their own patches plus their frame's message token (the message is dropped after
the attention, before the MLP).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from .config import VisionConfig
from .transformer import EncoderLayer, SelfAttention, embedding

if TYPE_CHECKING:
    from .evl.config import EVLVisionConfig


class VisionEmbeddings(nn.Module):
    """Frames -> class token, then one token per patch (row-major), plus position embeddings. CLIP's patch
    embedding has no bias; EVL's own ViT has one (``patch_bias``)."""

    def __init__(self, config: VisionConfig | EVLVisionConfig, patch_bias: bool = False):
        super().__init__()
        dim = config.hidden_size
        self.image_size = config.image_size
        self.class_embedding = nn.Parameter(torch.zeros(dim))
        self.patch_embedding = nn.Conv2d(
            config.num_channels, dim, kernel_size=config.patch_size, stride=config.patch_size, bias=patch_bias
        )
        self.position_embedding = embedding(config.num_patches + 1, dim)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        # (N, C, H, W) -> (N, 1 + patches, D)
        n, _, height, width = pixel_values.shape
        if height != self.image_size or width != self.image_size:
            raise ValueError(
                f"frames are {height}x{width}; this model takes {self.image_size}x{self.image_size} "
                "(preprocess them with the model's processor)"
            )
        patches = self.patch_embedding(pixel_values.to(self.patch_embedding.weight.dtype))
        patches = patches.flatten(2).transpose(1, 2)  # (N, patches, D)
        cls = self.class_embedding.to(patches.dtype).expand(n, 1, -1)
        return torch.cat([cls, patches], dim=1) + self.position_embedding.weight


class CrossFrameCommunicationLayer(EncoderLayer):
    """An encoder layer whose attention also sees one message token per frame, exchanged across frames."""

    def __init__(self, config: VisionConfig):
        dim = config.hidden_size
        super().__init__(
            dim,
            config.intermediate_size,
            config.num_attention_heads,
            config.hidden_act,
            config.layer_norm_eps,
        )
        self.num_frames = config.num_frames
        self.message_fc = nn.Linear(dim, dim)
        self.message_ln = nn.LayerNorm(dim, eps=config.layer_norm_eps)
        self.message_attn = SelfAttention(dim, config.num_attention_heads)

    def forward(self, x: torch.Tensor, class_only: bool = False) -> torch.Tensor:
        """(B*T, L, D) with the class token first -> (B*T, L, D), or (B*T, 1, D) with ``class_only``."""
        frames, length, dim = x.shape
        message = self.message_fc(x[:, 0]).view(frames // self.num_frames, self.num_frames, dim)  # (B, T, D)
        message = message + self.message_attn(self.message_ln(message))
        x = torch.cat([x, message.view(frames, 1, dim)], dim=1)  # (B*T, L + 1, D)
        h = self.layer_norm1(x)
        if class_only:  # only the class token is wanted (the pooled output): it alone queries
            x = x[:, :1] + self.self_attn.out_proj(self.self_attn.attend(h[:, :1], h, h))
        else:
            x = (x + self.self_attn(h))[:, :length]
        return x + self.mlp(self.layer_norm2(x))


class CrossFrameEncoder(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.layers = nn.ModuleList(
            CrossFrameCommunicationLayer(config) for _ in range(config.num_hidden_layers)
        )

    def forward(self, x: torch.Tensor, class_only: bool = False) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x, class_only=class_only and i == len(self.layers) - 1)
        return x


class VisionTransformer(nn.Module):
    """Frames (B*T, C, H, W) -> token states (B*T, L, D) and the pooled class state (B*T, D).

    With ``class_only`` the last layer computes the class token alone (token states (B*T, 1, D)): the
    pooled output is the same and the last layer costs a fraction of a full one.
    """

    def __init__(self, config: VisionConfig):
        super().__init__()
        self.embeddings = VisionEmbeddings(config)
        self.pre_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.encoder = CrossFrameEncoder(config)
        self.post_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(
        self, pixel_values: torch.Tensor, class_only: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.encoder(self.pre_layernorm(self.embeddings(pixel_values)), class_only)
        return x, self.post_layernorm(x[:, 0])
