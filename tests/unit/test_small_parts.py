"""A library refreshed again and again keeps few parts: small parts are merged, the index stays the base's
file with a delta, and readers (a fresh open, the service following it) see exactly the version's rows."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from helpers import write_video

from pipeline import Searcher
from pipeline.embed.job import embed, refresh
from pipeline.embed.options import EmbedOptions
from pipeline.library import Library
from pipeline.library import refresh as refresh_rules
from pipeline.library.check import check
from pipeline.library.index import ids_of
from pipeline.search.service import ServiceOptions
from pipeline.search.service.follow import VersionFollower
from pipeline.storage import Store

MERGE_AT = 3
QUERY = "a red square moving left"


def add_video(videos: Path, seed: int) -> None:
    write_video(videos / f"{seed:02d}.mp4", 8, 48, 40, fps=6, seed=seed)


def assert_index_holds_the_rows(library: Library) -> None:
    """The version's index (the file with its delta applied) holds each embedded row once, with its vector."""
    assert check(library.uri).problems == []
    rows = library.table(["id", "embedding", "error"]).to_pylist()
    embedded = {row["id"]: row["embedding"] for row in rows if row["error"] is None}
    index = library.read_index()
    assert sorted(ids_of(index).tolist()) == sorted(embedded)
    for id_, vector in embedded.items():
        np.testing.assert_allclose(index.reconstruct(id_), vector, rtol=1e-6)


def test_small_parts_are_merged_and_the_index_stays_a_delta(
    tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(refresh_rules, "MERGE_SMALL_PARTS", MERGE_AT)
    monkeypatch.setattr(refresh_rules, "DELTA_MAX_FRACTION", 10.0)  # every change a delta of the first file
    videos, location = tmp_path / "videos", str(tmp_path / "library")
    videos.mkdir()
    for seed in range(4):
        add_video(videos, seed)
    options = EmbedOptions(model=str(tiny_model), gpus_per_encoder=0)
    embed(str(videos), location, options)  # one part of 4 rows: small
    first = Library.open(location)

    add_video(videos, 10)
    refresh(str(videos), location, options)  # a part of the new row
    (videos / "00.mp4").unlink()
    add_video(videos, 11)
    refresh(str(videos), location, options)  # the first part masked, a part of the new row
    before = Library.open(location)
    assert len(before.snapshot.parts) == MERGE_AT
    follower = VersionFollower(Store(location), ServiceOptions())  # the service, holding that version

    add_video(videos, 12)
    summary = refresh(str(videos), location, options)
    merged = Library.open(location)
    assert merged.manifest["index"]["path"] == first.manifest["index"]["path"]  # no index file written
    assert_index_holds_the_rows(merged)
    # the three small parts rewritten: the index file's rows apart from the delta's; then the new row's part
    assert summary.changes["new"] == 1 and len(merged.snapshot.parts) == 3
    assert not {p.path for p in merged.snapshot.parts} & {p.path for p in before.snapshot.parts}
    assert [p.deleted for p in merged.snapshot.parts] == [(), (), ()]
    assert follower.check() and follower.searcher().library.version == merged.version
    assert sorted(ids_of(follower.searcher().cpu_index)) == sorted(ids_of(merged.read_index()))

    add_video(videos, 13)  # the parts the delta names are merged again
    refresh(str(videos), location, options)
    latest = Library.open(location)
    assert latest.manifest["index"]["path"] == first.manifest["index"]["path"]
    assert_index_holds_the_rows(latest)
    assert len(latest.snapshot.parts) == 3

    fresh = tmp_path / "fresh"
    embed(str(videos), str(fresh), options)
    ours, theirs = (
        Searcher(latest).search(QUERY, k=10),
        Searcher(Library.open(str(fresh))).search(QUERY, k=10),
    )
    assert [(h.uri, h.segment) for h in ours] == [(h.uri, h.segment) for h in theirs] and len(ours) == 7
    np.testing.assert_allclose([h.score for h in ours], [h.score for h in theirs], atol=1e-4, rtol=0)


def test_fewer_small_parts_than_the_threshold_stay_as_they_are(tiny_model: Path, tmp_path: Path) -> None:
    videos, location = tmp_path / "videos", str(tmp_path / "library")
    videos.mkdir()
    add_video(videos, 0)
    options = EmbedOptions(model=str(tiny_model), gpus_per_encoder=0)
    embed(str(videos), location, options)
    written = set()
    for seed in range(1, refresh_rules.MERGE_SMALL_PARTS):
        add_video(videos, seed)
        refresh(str(videos), location, options)
        written = {p.path for p in Library.open(location).snapshot.parts}
    assert len(written) == refresh_rules.MERGE_SMALL_PARTS  # each refresh's part, none rewritten yet
    add_video(videos, 99)
    refresh(str(videos), location, options)
    latest = Library.open(location)
    assert len(latest.snapshot.parts) == 2 and not written & {p.path for p in latest.snapshot.parts}
    assert_index_holds_the_rows(latest)
