"""Text-to-video search over a library: FAISS candidates, then the exact X-CLIP score.

Stage 1 ranks every row by cosine(text, video) in the FAISS index (what an inner-product index can do).
Stage 2 re-scores the candidates with X-CLIP's full score, which conditions the text on each video through
the video-specific prompt generator (``XCLIPModel.logits``), using the patch features stored per row; no
video is decoded again. When the library has no more rows than ``candidates``, the result is the exact
X-CLIP ranking of the whole library.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from xclip_core import XCLIPModel
from xclip_core.tokenizer import CLIPTokenizer

from . import index as faiss_index
from .library import Library
from .storage import StorageOptions, protocol_of

DEFAULT_CANDIDATES = 200


@dataclass
class Hit:
    """One search result: a video (or a segment of one) and its score."""

    uri: str
    score: float  # cosine similarity of the video and the video-conditioned text, in [-1, 1]
    start_s: float
    end_s: float
    segment: int
    id: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "uri": self.uri,
            "score": self.score,
            "start_s": self.start_s,
            "end_s": self.end_s,
            "segment": self.segment,
            "id": self.id,
        }


class Searcher:
    """Loads the library's model once; answers text queries against one library version."""

    def __init__(
        self, library: Library, model: XCLIPModel | None = None, tokenizer: CLIPTokenizer | None = None
    ):
        self.library = library
        source = library.model["id"]
        options = (library.options or StorageOptions()).for_protocol(protocol_of(source))
        self.model = model or XCLIPModel.from_pretrained(source, storage_options=options)
        expected = library.model.get("sha256")
        if expected and self.model.weights_sha256() != expected:
            raise ValueError(
                f"this model's weights differ from those that built {library.uri} "
                f"(sha256 {expected[:16]}...): query with the library's own model ({source})"
            )
        self.tokenizer = tokenizer or _tokenizer_for(source, options)
        self.index = library.index()

    @torch.inference_mode()
    def text_embedding(self, text: str) -> torch.Tensor:
        """The unnormalized X-CLIP text embedding (1, P) of a query."""
        if not isinstance(text, str) or not text.strip():
            raise ValueError("the query text is empty")
        tokens = self.model.tokenize(self.tokenizer, text, padding="max_length")
        return self.model.get_text_features(tokens["input_ids"], tokens["attention_mask"])

    @torch.inference_mode()
    def search(self, text: str, k: int = 10, candidates: int = DEFAULT_CANDIDATES) -> list[Hit]:
        """The ``k`` best rows for ``text``, best first, by the full X-CLIP score."""
        if k < 1:
            raise ValueError(f"k must be at least 1, got {k}")
        text_embeds = self.text_embedding(text)
        query = torch.nn.functional.normalize(text_embeds, dim=-1).numpy().astype(np.float32)
        _, ids = faiss_index.search(self.index, query, max(k, candidates))
        ids = [int(i) for i in ids[0] if i >= 0]
        if not ids:
            return []
        rows = self.library.rows_by_id(
            ids, ["id", "uri", "start_s", "end_s", "segment", "embedding", "prompt_features"]
        )
        patches, dim = self.library.manifest["prompt_shape"]
        video = torch.from_numpy(float32_rows(rows["embedding"]))
        prompt = torch.from_numpy(float32_rows(rows["prompt_features"])).view(len(ids), patches, dim)
        dtype = next(self.model.parameters()).dtype
        logits = self.model.logits(video.to(dtype), prompt.to(dtype), text_embeds)[:, 0]
        scores = (logits / self.model.logit_scale.exp()).float().tolist()
        order = sorted(range(len(ids)), key=lambda i: -scores[i])[:k]
        return [
            Hit(
                uri=rows["uri"][i].as_py(),
                score=scores[i],
                start_s=rows["start_s"][i].as_py(),
                end_s=rows["end_s"][i].as_py(),
                segment=rows["segment"][i].as_py(),
                id=rows["id"][i].as_py(),
            )
            for i in order
        ]


def float32_rows(column: Any) -> np.ndarray:
    """A column of fixed-size lists (float16 or float32) as one float32 array, a row per row."""
    return np.stack(column.to_numpy(zero_copy_only=False)).astype(np.float32)


def _tokenizer_for(source: str, options: dict[str, Any]) -> CLIPTokenizer:
    """The checkpoint's tokenizer files, or the standard CLIP vocabulary when it has none."""
    try:
        return CLIPTokenizer.from_pretrained(source, options)
    except FileNotFoundError:
        return CLIPTokenizer.from_pretrained()
