"""One result per video: the candidates that stage 2 scores, and the best segment of each video.

A library embedded in segments (``--segment``) holds many rows per video, and the rows nearest a text are
often neighbouring segments of one long video. A per-video search ranks videos by their best segment: stage
1 gathers candidates until they span enough videos, keeping each video's :data:`SEGMENTS_PER_VIDEO` nearest
segments; stage 2 scores those exactly and keeps each video's best.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from ..library.lookup import RowLookup

SEGMENTS_PER_VIDEO = 4  # a video's segments scored exactly in a per-video search: its nearest in the index
GROWTH = 4  # each new stage-1 search asks for this many times the rows of the last


def video_candidates(
    nearest: Callable[[np.ndarray, int], list[int]],
    query: np.ndarray,
    rows: RowLookup,
    wanted: int,
    videos: int,
    leave_out: str | None = None,
) -> list[int]:
    """Ids of candidate rows for a per-video search of ``query``, nearest first: at most
    :data:`SEGMENTS_PER_VIDEO` per video, of the ``max(videos, wanted // SEGMENTS_PER_VIDEO)`` nearest
    videos (fewer where the library has fewer). ``nearest(query, n)`` (stage 1) is asked for ``wanted``
    rows, then :data:`GROWTH` times as many, until its rows span enough videos or it has no more.
    ``leave_out``: a video's uri whose rows are no candidates (the video a "more like this" starts from)."""
    enough = max(videos, wanted // SEGMENTS_PER_VIDEO)
    while True:
        ids = nearest(query, wanted)
        kept, per_video = [], {}
        for row_id, uri in zip(ids, rows.hits(ids)["uri"].to_pylist(), strict=True):
            count = per_video.get(uri, 0)
            if uri == leave_out or count == SEGMENTS_PER_VIDEO or (not count and len(per_video) == enough):
                continue
            kept.append(row_id)
            per_video[uri] = count + 1
        if len(per_video) >= enough or len(ids) < wanted or wanted >= len(rows):
            return kept
        wanted = min(wanted * GROWTH, len(rows))


def best_of_each_video(order: list[int], uris: list[str]) -> list[int]:
    """Of the positions in ``order`` (best first), the first of each video (``uris[position]``)."""
    seen: set[str] = set()
    best = []
    for position in order:
        if uris[position] not in seen:
            seen.add(uris[position])
            best.append(position)
    return best
