"""EVL's temporal modules: what the decoder adds to one backbone layer's frame tokens before it reads them.

For the tokens X (B, T, L, D) of a backbone layer (class token first in each frame), decoder layer i reads

    X + conv_t(X) + E_t + TCA(Q, K)

- ``conv_t``: a depth-wise 1-D convolution over time (kernel 3, zero padding, with bias), on every token
  (class token included), channel by channel.
- ``E_t``: a learned embedding per frame (T, D), added to all tokens of frame t; zero at initialization.
- ``TCA``: temporal cross-attention. Each patch p of frame t attends (softmax over patches, per head, scaled
  by 1/sqrt(head dim), then averaged over heads) to the patches of frame t-1 with the backbone block's own
  queries and keys: A[t, p, p'] = mean_h softmax_p'(q[t, p, h] . k[t-1, p', h] / sqrt(d)). The attention
  does not mix values: it weighs a learned vector per relative position, W_prev[p - p'] (D wide, one for
  every 2-D offset between two patches), giving sum_p' A[t, p, p'] W_prev[p - p']. The same with frame t+1
  and W_next is added. The first frame has no previous and the last no next frame (nothing is added there),
  class tokens get nothing, and both weight tables start at zero (the module starts as the identity).

Each module can be switched off (the original's ``--no_temporal_*`` flags); a switched-off module has no
parameters.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import EVLConfig


def relative_position_index(grid: int, device: torch.device | None = None) -> torch.Tensor:
    """(P, P) index into a table of (2 grid - 1)^2 relative positions, P = grid^2 patches in row-major order:
    ``index[p, p'] = (i - i' + grid - 1) * (2 grid - 1) + (j - j' + grid - 1)``, p = (i, j), p' = (i', j')."""
    rows, cols = torch.meshgrid(
        torch.arange(grid, device=device), torch.arange(grid, device=device), indexing="ij"
    )
    rows, cols = rows.flatten(), cols.flatten()  # (P,)
    d_rows = rows[:, None] - rows[None, :] + grid - 1
    d_cols = cols[:, None] - cols[None, :] + grid - 1
    return d_rows * (2 * grid - 1) + d_cols


class TemporalCrossAttention(nn.Module):
    """Patch-to-patch attention between neighbouring frames, weighing learned relative-position vectors."""

    def __init__(self, grid: int, dim: int):
        super().__init__()
        self.grid = grid
        positions = (2 * grid - 1) ** 2
        self.previous_frame_weight = nn.Parameter(torch.zeros(positions, dim))  # frame t attends to t-1
        self.next_frame_weight = nn.Parameter(torch.zeros(positions, dim))  # frame t attends to t+1

    def reset_parameters(self) -> None:
        nn.init.zeros_(self.previous_frame_weight)
        nn.init.zeros_(self.next_frame_weight)

    def forward(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        # q, k: (B, T, L, heads, d) with the class token first -> (B, T, L, D), zero on class tokens
        q, k = q[:, :, 1:], k[:, :, 1:]  # (B, T, P, heads, d)
        index = relative_position_index(self.grid, q.device)  # (P, P)
        from_previous = self.mix(q[:, 1:], k[:, :-1], index, self.previous_frame_weight)  # frames 1..T-1
        from_next = self.mix(q[:, :-1], k[:, 1:], index, self.next_frame_weight)  # frames 0..T-2
        patches = F.pad(from_previous, (0, 0, 0, 0, 1, 0)) + F.pad(from_next, (0, 0, 0, 0, 0, 1))
        return F.pad(patches, (0, 0, 1, 0))  # (B, T, 1 + P, D)

    @staticmethod
    def mix(q: torch.Tensor, k: torch.Tensor, index: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
        """sum_p' A[p, p'] table[index[p, p']]: the attention of each patch over the neighbour's patches,
        weighing the table's vector of each relative position.

        Computed as the attention laid out by relative position (B, T', P, R), times the table (R, D): for one
        query patch every key patch is at another offset, so the layout only moves numbers, and the table
        is read once, never copied out as a (P, P, D) tensor (nor its gradient summed back into it)."""
        # q, k: (B, T', P, heads, d); index: (P, P) into R relative positions; table: (R, D) -> (B, T', P, D)
        scores = torch.einsum("btqhd,btkhd->btqkh", q * q.shape[-1] ** -0.5, k)
        attn = scores.softmax(dim=-2).mean(dim=-1)  # (B, T', P, P): softmax over keys, mean over heads
        by_offset = attn.new_zeros(*attn.shape[:-1], table.shape[0])  # (B, T', P, R)
        by_offset.scatter_(-1, index.expand_as(attn), attn)
        return by_offset @ table


class TemporalModules(nn.Module):
    """The temporal modules of one decoder layer: tokens (B, T, L, D), q, k -> enhanced (B, T, L, D)."""

    def __init__(self, config: EVLConfig):
        super().__init__()
        dim, decoder = config.vision_config.hidden_size, config.decoder_config
        self.conv = (
            nn.Conv1d(dim, dim, kernel_size=3, padding=1, groups=dim) if decoder.temporal_conv else None
        )
        self.position_embedding = (
            nn.Parameter(torch.zeros(config.num_frames, dim)) if decoder.temporal_position_embedding else None
        )
        self.cross_attn = (
            TemporalCrossAttention(config.vision_config.grid_size, dim)
            if decoder.temporal_cross_attention
            else None
        )

    def reset_parameters(self) -> None:
        """The original's initialization: PyTorch's default for the convolution, zeros for the rest."""
        if self.conv is not None:
            self.conv.reset_parameters()
        if self.position_embedding is not None:
            nn.init.zeros_(self.position_embedding)
        if self.cross_attn is not None:
            self.cross_attn.reset_parameters()

    def forward(self, x: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        out = x
        if self.conv is not None:
            b, t, length, dim = x.shape
            series = x.permute(0, 2, 3, 1).reshape(b * length, dim, t)  # (B*L, D, T)
            out = out + self.conv(series).view(b, length, dim, t).permute(0, 3, 1, 2)
        if self.position_embedding is not None:
            out = out + self.position_embedding[:, None, :]  # (T, 1, D)
        if self.cross_attn is not None:
            out = out + self.cross_attn(q, k)
        return out
