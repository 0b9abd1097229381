"""Narrowed searches: per video (the candidates stage 2 scores, each video's best row), and in a folder."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa

from pipeline.library import LibraryWriter
from pipeline.library.lookup import RowLookup
from pipeline.library.schema import part_schema, row_id
from pipeline.search.per_video import SEGMENTS_PER_VIDEO, best_of_each_video, video_candidates

DIM = 4


def lookup(tmp_path: Path, segments: dict[str, int]) -> RowLookup:
    """A part of ``segments[video]`` embedded rows per video, as a search's row lookup sees it."""
    writer = LibraryWriter(str(tmp_path), embedding_dim=DIM, prompt_shape=None)
    rows = [
        {"id": row_id(uri, s), "uri": uri, "segment": s, "start_s": float(s), "end_s": s + 1.0,
         "embedding": [1.0, 0.0, 0.0, 0.0]}
        for uri, count in segments.items()
        for s in range(count)
    ]  # fmt: skip
    schema = part_schema(DIM, None)
    table = pa.Table.from_pylist(rows, schema=schema)
    return RowLookup(writer.store, [writer.write_part(table)], schema, None)


class Index:
    """Stage 1 over a fixed order of rows: the first ``n`` of ``order`` for any query; counts its calls."""

    def __init__(self, order: list[int]):
        self.order, self.asked = order, []

    def __call__(self, query: np.ndarray, n: int) -> list[int]:
        self.asked.append(n)
        return self.order[:n]


def test_candidates_span_enough_videos_with_a_few_segments_each(tmp_path: Path) -> None:
    rows = lookup(tmp_path, {"long": 40, "a": 1, "b": 2, "c": 1})
    long = [row_id("long", s) for s in range(40)]
    others = [row_id("a", 0), row_id("b", 0), row_id("b", 1), row_id("c", 0)]
    nearest = Index(long[:30] + others[:2] + long[30:] + others[2:])  # the long video fills the top 30

    ids = video_candidates(nearest, np.zeros((1, DIM), np.float32), rows, wanted=5, videos=3)
    assert nearest.asked == [5, 20, 44]  # grown until 3 videos are among them (all 44 rows: 30 + 2 + 10 + 2)
    assert ids == long[:SEGMENTS_PER_VIDEO] + others[:3]  # the long video's 4 nearest, a's and b's rows
    # enough videos at once; the candidates stop at the 2 videos asked for (a's row, b's 2), not c's
    assert video_candidates(Index(others), np.zeros((1, DIM)), rows, 4, 2) == others[:3]

    left = video_candidates(nearest, np.zeros((1, DIM), np.float32), rows, 5, 3, leave_out="long")
    assert left == others  # "more like this" of a segment of the long video: the 3 other videos


def test_fewer_videos_than_asked_stops_when_the_index_has_no_more(tmp_path: Path) -> None:
    rows = lookup(tmp_path, {"a": 3, "b": 3})
    order = [row_id(v, s) for v in "ab" for s in range(3)]
    nearest = Index(order)
    assert video_candidates(nearest, np.zeros((1, DIM)), rows, 2, 10) == order
    assert nearest.asked == [2, 6]  # every row asked for once: no endless growth


def test_each_video_is_represented_by_its_best_position() -> None:
    uris = ["a", "b", "a", "c", "b"]
    assert best_of_each_video([2, 0, 1, 4, 3], uris) == [2, 1, 3]  # a at 2, b at 1, c at 3


def test_a_folder_holds_the_videos_under_it_and_not_its_namesakes(tmp_path: Path) -> None:
    segments = {"s3://b/2024/a.mp4": 2, "s3://b/2024/trip/b.mp4": 1, "s3://b/2024-old/c.mp4": 1}
    rows = lookup(tmp_path, segments)
    a, b, c = ({row_id(uri, s) for s in range(n)} for uri, n in segments.items())
    for folder in ("s3://b/2024", "s3://b/2024/"):
        assert set(rows.ids_under(folder).tolist()) == a | b  # not 2024-old
    assert set(rows.ids_under("s3://b/2024/a.mp4").tolist()) == a  # one video
    assert set(rows.ids_under("s3://b/").tolist()) == a | b | c
    assert len(rows.ids_under("s3://b/2024/a")) == 0  # a name's beginning is no folder
    assert list(rows.ids_under("s3://b")) == sorted(rows.ids_under("s3://b"))
