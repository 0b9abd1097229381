"""Text-to-video search over a library: FAISS candidates, then the model's exact score.

Stage 1 ranks every row by cosine(text, video) in the FAISS index (what an inner-product index can do).
Stage 2 re-scores the candidates with the exact score (:mod:`pipeline.search.scorer`: X-CLIP's, which
conditions the text on each video through the video-specific prompt generator, from the features stored per
row; no video is decoded again). When the library has no more rows than ``candidates``, the result is the
exact ranking of the whole library.

One call: ``Searcher.open("s3://bucket/library").search("a dog catching a frisbee", k=10)``. More like a row
of the library (:meth:`Searcher.similar`) or like a video from outside it (:meth:`Searcher.like`): its
stored or freshly computed embedding is the query, and the stored embeddings' cosine the score.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Collection
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from ..embed.stages.decode import DecodeSettings
from ..library import Library
from ..library import index as faiss_index
from ..library.local_cache import LocalCache
from ..library.lookup import PartTables, RowLookup
from ..library.next_index import index_after
from ..models import VideoTextModel, load_library_model
from ..storage import StorageOptions, Store
from .example import decode_example, example_embedding, example_settings
from .per_video import best_of_each_video, video_candidates
from .scorer import ExactScorer, StoredVideos

DEFAULT_CANDIDATES = 200
UNDER_KEPT = 64  # folders whose row ids a searcher keeps (a search within one reads every row's uri)


@dataclass
class Hit:
    """One search result: a video (or a segment of one) and its score."""

    uri: str
    score: float  # cosine similarity of the video and the (video-conditioned) text, in [-1, 1]
    start_s: float
    end_s: float
    segment: int
    id: int
    # how ``score`` was computed: "video-conditioned" (the model's exact score, X-CLIP's), or "cosine" (the
    # embeddings' cosine: a family without a re-rank stage, such as EVL, or similar-video search)
    scored_by: str = "video-conditioned"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class NoEmbedding(ValueError):
    """The row is the error row of a video that could not be embedded."""


class Searcher:
    """Loads the library's model once (``model`` if given: it must have the same weights); answers text
    queries against one library version. For one that follows a library: ``tables``, the part tables of the
    searchers before (:class:`~pipeline.library.lookup.PartTables`), and ``before``, the searcher of the
    version before, whose index the new version's is made from where both name the same index file
    (:func:`~pipeline.library.next_index.index_after`)."""

    def __init__(
        self,
        library: Library,
        model: VideoTextModel | None = None,
        tables: PartTables | None = None,
        before: Searcher | None = None,
    ):
        self.library = library
        recorded = library.model
        self.model = model or load_library_model(recorded, library.options)
        if recorded.sha256 and self.model.identity.sha256 != recorded.sha256:
            raise ValueError(
                f"this model's weights differ from those that built {library.uri} "
                f"(sha256 {recorded.sha256[:16]}...): query with the library's own model ({recorded.source})"
            )
        self.scorer = ExactScorer(self.model)
        snapshot = library.snapshot
        tables = PartTables(library.cache) if tables is None else tables
        self.rows = RowLookup(library.store, snapshot.parts, library.schema, library.rerank_shape, tables)
        made = (
            index_after(before.library, before.cpu_index, before.rows, library, self.rows) if before else None
        )
        self.cpu_index = library.index() if made is None else made
        self.index = faiss_index.on_gpus(self.cpu_index)  # the CPU one stays, for searches within folders
        self._ids_under = functools.lru_cache(UNDER_KEPT)(self.rows.ids_under)

    @classmethod
    def open(
        cls,
        location: str | Store,
        options: StorageOptions | None = None,
        version: int | None = None,
        cache: LocalCache | None = None,
    ) -> Searcher:
        """A searcher of the library at ``location`` (its current version, or ``version``); ``cache``: where
        to keep local copies of what it reads of a remote library (:mod:`~pipeline.library.local_cache`)."""
        return cls(Library.open(location, options, version, cache))

    def memory_bytes(self) -> int:
        """About the memory the version takes here: its index (on the CPU) and row lookup; the model aside."""
        return faiss_index.memory_bytes(self.cpu_index) + self.rows.nbytes

    def text_embedding(self, text: str) -> torch.Tensor:
        """The unnormalized text embedding (1, P) of a query."""
        if not isinstance(text, str) or not text.strip():
            raise ValueError("the query text is empty")
        return self.scorer.text_embeddings([text])

    def search(
        self,
        text: str,
        k: int = 10,
        candidates: int = DEFAULT_CANDIDATES,
        per_video: bool = False,
        under: str | None = None,
    ) -> list[Hit]:
        """The ``k`` best rows for ``text``, best first, by the exact score. ``per_video``: the best segment
        of each of the ``k`` best videos instead (a video ranks by its best segment; see
        :func:`~pipeline.search.per_video.video_candidates` for the candidates then scored). ``under``: only
        the videos in that folder (a uri as the hits show them, ``s3://bucket/2024/``) or that one video."""
        if k < 1:
            raise ValueError(f"k must be at least 1, got {k}")
        text_embeds = self.text_embedding(text)
        query = torch.nn.functional.normalize(text_embeds.float(), dim=-1).numpy().astype(np.float32)
        ids = self._candidates(query, k, candidates, per_video, under)
        if not ids:
            return []
        scores = self.scorer(text_embeds, StoredVideos.from_records(self.rows.records(ids)))[:, 0].numpy()
        scored_by = "video-conditioned" if self.library.rerank_shape else "cosine"
        return self._ranked(ids, scores, k, per_video, scored_by)

    def similar(
        self,
        row_id: int,
        k: int = 10,
        candidates: int = DEFAULT_CANDIDATES,
        per_video: bool = False,
        under: str | None = None,
    ) -> list[Hit]:
        """More like row ``row_id``: the ``k`` rows nearest to it by the cosine of their stored embeddings,
        without it (``per_video``: without its video); ``under`` as in :meth:`search`.

        A flat index (libraries under 20,000 rows) proposes the true nearest rows, so the answer is the
        brute-force one; over an approximate index the true neighbours may be missed, never misordered.
        Raises ``KeyError`` when the version has no such row, :class:`NoEmbedding` for an error row."""
        try:
            vector = np.ascontiguousarray(self.rows.records([row_id])["embedding"])
        except KeyError:  # no such row, or the error row of a video (the lookup holds embedded rows only)
            error = self.library.rows_by_id([row_id], ["error"])["error"][0]
            raise NoEmbedding(f"row {row_id} has no embedding: its video failed ({error.as_py()})") from None
        own = self.rows.hits([row_id])["uri"][0].as_py() if per_video else None
        return self.nearest_to(vector, k, candidates, per_video, under, {row_id}, own)

    def like(
        self,
        video: str,
        k: int = 10,
        candidates: int = DEFAULT_CANDIDATES,
        per_video: bool = False,
        under: str | None = None,
        decode: Callable[[str, DecodeSettings], np.ndarray] | None = None,
    ) -> list[Hit]:
        """Videos like ``video``, one from outside the library: the ``k`` rows nearest to its embedding by
        cosine, the video decoded as the library's videos were and embedded by its model
        (:mod:`~pipeline.search.example`). ``decode(video, settings)`` gives its frames; by default it is read
        with the library's storage options and decoded in this process (the service decodes uploads in
        processes of their own). Raises :class:`~pipeline.search.example.BadExample` when it cannot be
        decoded."""
        settings = example_settings(self.model, self.library.manifest.get("decode"))
        if decode is None:
            frames = decode_example(video, settings, self.library.options)
        else:
            frames = decode(video, settings)
        return self.nearest_to(example_embedding(self.model, frames), k, candidates, per_video, under)

    def nearest_to(
        self,
        vector: np.ndarray,
        k: int,
        candidates: int = DEFAULT_CANDIDATES,
        per_video: bool = False,
        under: str | None = None,
        leave_out: Collection[int] = (),
        leave_out_video: str | None = None,
    ) -> list[Hit]:
        """The ``k`` rows nearest to the unit ``vector`` (1, P), nearest first, by the exact inner product of
        their stored embeddings (FAISS proposes ``candidates``); rows ``leave_out`` and the video
        ``leave_out_video`` are no results. ``per_video`` and ``under`` as in :meth:`search`."""
        if k < 1:
            raise ValueError(f"k must be at least 1, got {k}")
        ids = self._candidates(vector, k, candidates, per_video, under, leave_out, leave_out_video)
        if not ids:
            return []
        scores = self.rows.records(ids)["embedding"] @ vector[0]
        return self._ranked(ids, scores, k, per_video, "cosine")

    def _candidates(
        self,
        query: np.ndarray,
        k: int,
        candidates: int,
        per_video: bool,
        under: str | None,
        leave_out: Collection[int] = (),
        leave_out_video: str | None = None,
    ) -> list[int]:
        """Stage 1's ids for ``query``: ``candidates`` rows (at least ``k`` beyond ``leave_out``), or, per
        video, those of :func:`~pipeline.search.per_video.video_candidates` (without ``leave_out_video``)."""
        nearest, wanted = self.nearest_under(under), max(k + len(leave_out), candidates)
        if per_video:
            return video_candidates(nearest, query, self.rows, wanted, k, leave_out=leave_out_video)
        return [i for i in nearest(query, wanted) if i not in leave_out]

    def _ranked(
        self, ids: list[int], scores: np.ndarray, k: int, per_video: bool, scored_by: str
    ) -> list[Hit]:
        """The ``k`` best of the rows ``ids`` by ``scores``, best first (per video: each video's best)."""
        rows = self.rows.hits(ids)
        order = np.argsort(-scores, kind="stable").tolist()
        if per_video:
            order = best_of_each_video(order, rows["uri"].to_pylist())
        return [_hit(rows, i, float(scores[i]), scored_by) for i in order[:k]]

    def nearest_under(self, under: str | None) -> Callable[[np.ndarray, int], list[int]]:
        """Stage 1, within ``under`` if given (see :meth:`search`): ``nearest(query, wanted)``, the ids of
        the ``wanted`` rows nearest to ``query`` (1, P), nearest first (fewer where there are fewer)."""
        if under is not None and not under.strip():
            raise ValueError("the folder to search under is empty")
        among = None if under is None else self._ids_under(under)
        if among is not None and not len(among):
            return lambda query, wanted: []

        def nearest(query: np.ndarray, wanted: int) -> list[int]:
            cpu = among is not None or wanted > faiss_index.GPU_MAX_K  # FAISS's GPU kernels do neither
            _, ids = faiss_index.search(self.cpu_index if cpu else self.index, query, wanted, among)
            return [int(i) for i in ids[0] if i >= 0]

        return nearest


def _hit(rows: pa.Table, i: int, score: float, scored_by: str) -> Hit:
    """Row ``i`` of ``rows`` (the lookup's hit columns) as a hit."""
    return Hit(
        uri=rows["uri"][i].as_py(),
        score=score,
        start_s=rows["start_s"][i].as_py(),
        end_s=rows["end_s"][i].as_py(),
        segment=rows["segment"][i].as_py(),
        id=rows["id"][i].as_py(),
        scored_by=scored_by,
    )
