"""The CLIP text encoder: token + position embeddings, a causal transformer, pooled at end-of-text."""

from __future__ import annotations

import torch
from torch import nn

from .config import TextConfig
from .transformer import Encoder, embedding


class TextEmbeddings(nn.Module):
    def __init__(self, config: TextConfig):
        super().__init__()
        self.token_embedding = embedding(config.vocab_size, config.hidden_size)
        self.position_embedding = embedding(config.max_position_embeddings, config.hidden_size)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        # (N, L) -> (N, L, D)
        length = input_ids.shape[-1]
        limit = self.position_embedding.num_embeddings
        if length > limit:
            raise ValueError(f"text is {length} tokens long; the model takes at most {limit}")
        return self.token_embedding(input_ids) + self.position_embedding.weight[:length]


class TextTransformer(nn.Module):
    """Returns the final hidden states (N, L, D) and the pooled end-of-text state (N, D)."""

    def __init__(self, config: TextConfig):
        super().__init__()
        self.embeddings = TextEmbeddings(config)
        self.encoder = Encoder(
            config.num_hidden_layers,
            config.hidden_size,
            config.intermediate_size,
            config.num_attention_heads,
            config.hidden_act,
            config.layer_norm_eps,
        )
        self.final_layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.embeddings(input_ids)
        if attention_mask is None:
            x = self.encoder(x, is_causal=True)
        else:
            # causal AND not padding: (N, 1, L, L)
            length = input_ids.shape[-1]
            causal = torch.ones(length, length, dtype=torch.bool, device=x.device).tril()
            x = self.encoder(x, mask=causal & attention_mask[:, None, None, :].bool())
        x = self.final_layer_norm(x)
        # the end-of-text token has the largest id in CLIP's vocabulary
        pooled = x[torch.arange(x.shape[0], device=x.device), input_ids.argmax(dim=-1)]
        return x, pooled
