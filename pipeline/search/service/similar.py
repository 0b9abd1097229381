"""More like this: the rows nearest to a row of the library by their stored embeddings.

The FAISS index proposes candidates (the row's own embedding as the query), which are scored again by the
exact inner product of the stored, normalized embeddings, and the row itself is left out. A flat index
(libraries under 20,000 rows) proposes the true nearest rows, so the answer is the brute-force one; over an
approximate index the true neighbours may be missed, never misordered.
"""

from __future__ import annotations

import numpy as np

from ...library import Library
from ...library import index as faiss_index
from ..scorer import float32_rows
from ..searcher import DEFAULT_CANDIDATES, Hit


class NoEmbedding(ValueError):
    """The row is the error row of a video that could not be embedded."""


def similar(library: Library, row_id: int, k: int, candidates: int = DEFAULT_CANDIDATES) -> list[Hit]:
    """The ``k`` rows nearest to row ``row_id`` by inner product, nearest first, without the row itself.

    Raises ``KeyError`` when the version has no such row, :class:`NoEmbedding` for an error row.
    """
    row = library.rows_by_id([row_id], ["embedding", "error"])
    if row["error"][0].is_valid:
        raise NoEmbedding(f"row {row_id} has no embedding: its video failed ({row['error'][0].as_py()})")
    query = float32_rows(row["embedding"])
    _, found = faiss_index.search(library.index(), query, max(k + 1, candidates))
    ids = [int(i) for i in found[0] if i >= 0 and i != row_id]
    if not ids:
        return []
    rows = library.rows_by_id(ids, ["id", "uri", "start_s", "end_s", "segment", "embedding"])
    scores = float32_rows(rows["embedding"]) @ query[0]
    order = np.argsort(-scores, kind="stable")[:k]
    return [
        Hit(
            uri=rows["uri"][i].as_py(),
            score=float(scores[i]),
            start_s=rows["start_s"][i].as_py(),
            end_s=rows["end_s"][i].as_py(),
            segment=rows["segment"][i].as_py(),
            id=rows["id"][i].as_py(),
            scored_by="cosine",
        )
        for i in order
    ]
