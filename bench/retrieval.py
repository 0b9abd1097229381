"""What a change in how videos are embedded does to text-to-video retrieval: the benchmarks' shared measure.

Every clip's caption is a query against every clip, ranked by the cosine of the text's and the videos'
embeddings made two ways (exact and fast sampling in ``bench/decode.py``, float32 and bfloat16 in
``bench/precision.py``): the mean Spearman rank correlation of each query's two rankings, recall@1 of the
right clip under each, and the mean cosine of a video's two embeddings.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman's rank correlation of two score vectors (no ties expected)."""
    ra, rb = a.argsort().argsort().astype(float), b.argsort().argsort().astype(float)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / np.sqrt((ra**2).sum() * (rb**2).sum()))


@dataclass(frozen=True)
class Agreement:
    """How two ways of embedding the same clips rank them for the same caption queries."""

    correlation: float  # mean Spearman correlation of a query's two rankings
    recall_a: float  # recall@1 of the right clip (query i's is clip i) under the first way
    recall_b: float
    cosine: float  # mean cosine of a clip's two embeddings

    def text(self, a: str, b: str) -> str:
        return (
            f"mean Spearman correlation of the rankings {self.correlation:.3f}; recall@1 {a} "
            f"{self.recall_a:.2f}, {b} {self.recall_b:.2f}; mean cosine of a video's two embeddings "
            f"{self.cosine:.5f}"
        )


def agreement(texts: torch.Tensor, videos_a: torch.Tensor, videos_b: torch.Tensor) -> Agreement:
    """The agreement of two ``(N, P)`` embeddings of N clips for N caption embeddings ``(N, P)`` (query i's
    right clip is clip i); every embedding is normalized here."""
    texts, videos_a, videos_b = (
        torch.nn.functional.normalize(x.float(), dim=-1) for x in (texts, videos_a, videos_b)
    )
    by_a, by_b = (texts @ videos_a.T).numpy(), (texts @ videos_b.T).numpy()
    truth = np.arange(len(texts))
    return Agreement(
        correlation=float(np.mean([spearman(a, b) for a, b in zip(by_a, by_b, strict=True)])),
        recall_a=float((by_a.argmax(1) == truth).mean()),
        recall_b=float((by_b.argmax(1) == truth).mean()),
        cosine=float((videos_a * videos_b).sum(-1).mean()),
    )
