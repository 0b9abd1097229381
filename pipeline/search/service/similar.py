"""More like this: the rows nearest to a row of the library by their stored embeddings.

The FAISS index proposes candidates (the row's own embedding as the query), which are scored again by the
exact inner product of the stored, normalized embeddings, and the row itself is left out (per video: the
row's whole video, and each other video's nearest row stands for it). A flat index (libraries under 20,000
rows) proposes the true nearest rows, so the answer is the brute-force one; over an approximate index the
true neighbours may be missed, never misordered.
"""

from __future__ import annotations

import numpy as np

from ..per_video import best_of_each_video, video_candidates
from ..searcher import DEFAULT_CANDIDATES, Hit, Searcher


class NoEmbedding(ValueError):
    """The row is the error row of a video that could not be embedded."""


def similar(
    searcher: Searcher,
    row_id: int,
    k: int,
    candidates: int = DEFAULT_CANDIDATES,
    per_video: bool = False,
    under: str | None = None,
) -> list[Hit]:
    """The ``k`` rows nearest to row ``row_id`` by inner product, nearest first, without the row itself;
    ``per_video``: the nearest row of each of the ``k`` nearest other videos (the row's own video left out);
    ``under``: only rows of the videos in that folder (see :meth:`Searcher.search`).

    The rows come from the searcher's in-memory lookup (:class:`~pipeline.library.lookup.RowLookup`): the
    query row's and the candidates' embeddings are read in O(their own bytes), whatever the library's size.
    Raises ``KeyError`` when the version has no such row, :class:`NoEmbedding` for an error row.
    """
    rows = searcher.rows
    try:
        query = np.ascontiguousarray(rows.records([row_id])["embedding"])
    except KeyError:  # no such row, or the error row of a video (the lookup holds embedded rows only)
        error = searcher.library.rows_by_id([row_id], ["error"])["error"][0]
        raise NoEmbedding(f"row {row_id} has no embedding: its video failed ({error.as_py()})") from None
    wanted, nearest = max(k + 1, candidates), searcher.nearest_under(under)
    if per_video:
        own = rows.hits([row_id])["uri"][0].as_py()
        ids = video_candidates(nearest, query, rows, wanted, k, leave_out=own)
    else:
        ids = [i for i in nearest(query, wanted) if i != row_id]
    if not ids:
        return []
    scores = rows.records(ids)["embedding"] @ query[0]
    hits = rows.hits(ids)
    order = np.argsort(-scores, kind="stable").tolist()
    if per_video:
        order = best_of_each_video(order, hits["uri"].to_pylist())
    return [
        Hit(
            uri=hits["uri"][i].as_py(),
            score=float(scores[i]),
            start_s=hits["start_s"][i].as_py(),
            end_s=hits["end_s"][i].as_py(),
            segment=hits["segment"][i].as_py(),
            id=hits["id"][i].as_py(),
            scored_by="cosine",
        )
        for i in order[:k]
    ]
