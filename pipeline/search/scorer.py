"""The exact score of stored videos against texts: one implementation for search (stage 2) and eval.

X-CLIP's score conditions each text on each video (the video-specific prompt generator) from the re-rank
features stored per row, so no video is decoded again. A model family without re-rank features
(``rerank_shape`` None) is scored by the plain cosine of the stored embedding and the text embedding.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import torch
import torch.nn.functional as F

from ..library.schema import dense_rows
from ..models import VideoTextModel

ROWS_PER_CHUNK = 256  # bounds the (rows x texts x patches) prompt-generator work of one call


class StoredVideos:
    """Rows' embeddings (R, P) and re-rank features (R, *rerank_shape) or ``None``."""

    def __init__(self, embeddings: torch.Tensor, rerank: torch.Tensor | None):
        self.embeddings, self.rerank = embeddings, rerank

    @classmethod
    def from_table(cls, table: pa.Table, rerank_shape: tuple[int, ...] | None) -> StoredVideos:
        """From a table with the library's ``embedding`` (and ``prompt_features``) columns."""
        embeddings = torch.from_numpy(dense_rows(table["embedding"], np.float32)).view(table.num_rows, -1)
        if not rerank_shape:
            return cls(embeddings, None)
        prompts = dense_rows(table["prompt_features"], np.float32)
        return cls(embeddings, torch.from_numpy(prompts).view(-1, *rerank_shape))

    @classmethod
    def from_records(cls, records: np.ndarray) -> StoredVideos:
        """From re-rank records (:func:`pipeline.library.features.record_dtype`)."""
        embeddings = torch.from_numpy(records["embedding"].astype(np.float32))
        if "prompt" not in (records.dtype.names or ()):
            return cls(embeddings, None)
        return cls(embeddings, torch.from_numpy(records["prompt"].astype(np.float32)))

    def __len__(self) -> int:
        return len(self.embeddings)


class ExactScorer:
    """Scores texts against stored videos with the model's own exact score."""

    def __init__(self, model: VideoTextModel):
        self.model = model
        self.dtype = next(iter(model.parameters())).dtype

    @torch.inference_mode()
    def text_embeddings(self, texts: str | list[str]) -> torch.Tensor:
        """The model's text embeddings (N, P), not normalized."""
        return self.model.encode_texts(texts)

    @torch.inference_mode()
    def __call__(self, text_embeds: torch.Tensor, videos: StoredVideos) -> torch.Tensor:
        """Scores (R, N), float32 cosines in [-1, 1], of every stored row against every text."""
        if videos.rerank is None:
            return F.normalize(videos.embeddings, dim=-1) @ F.normalize(text_embeds.float(), dim=-1).T
        blocks = [
            self.model.score(
                text_embeds,
                videos.embeddings[rows].to(self.dtype),
                videos.rerank[rows].to(self.dtype),
            ).float()
            for rows in (slice(r, r + ROWS_PER_CHUNK) for r in range(0, len(videos), ROWS_PER_CHUNK))
        ]
        return torch.cat(blocks) if blocks else torch.empty(0, len(text_embeds))
