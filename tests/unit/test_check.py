"""``videosearch check`` and ``check --repair``: every file of a version read and held against its manifest;
a version without what is wrong, whose videos a refresh embeds again."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest
from helpers import part_row

from pipeline.cli import main
from pipeline.library import DamagedLibraryError, Library, LibraryWriter, Version
from pipeline.library.check import DAMAGED, INCONSISTENT, MISSING, check
from pipeline.library.index import build_index
from pipeline.library.repair import repair
from pipeline.library.schema import part_schema, row_id
from pipeline.library.writer import IndexDelta
from pipeline.storage import StorageOptions, Store
from xclip_core import ModelIdentity

DIM, SHAPE = 8, (2, 4)
MODEL = ModelIdentity("test/xclip-tiny", "0" * 64)


def rows(videos: dict[str, range], failed: tuple[str, ...] = ()) -> pa.Table:
    """Part rows: each video's segments in ``videos`` (a range of segment numbers), ids as a job gives them;
    a video in ``failed`` is one error row."""
    rng = np.random.default_rng(len(videos) + sum(len(s) for s in videos.values()))
    shapes = (DIM, SHAPE[0] * SHAPE[1])
    out = [
        part_row(
            row_id(f"s3://videos/{name}.mp4", segment),
            f"s3://videos/{name}.mp4",
            segment,
            name not in failed,
            rng,
            shapes,
            MODEL.tag,
            9.0,
        )
        for name, segments in videos.items()
        for segment in (segments if name not in failed else range(1))
    ]
    return pa.Table.from_pylist(out, schema=part_schema(DIM, SHAPE))


def index_of(*tables: pa.Table):
    table = pa.concat_tables(tables)
    ok = table.filter(pc.is_null(table["error"]))
    vectors = ok["embedding"].combine_chunks().flatten().to_numpy().reshape(-1, DIM)
    return build_index(ok["id"].to_numpy(), vectors)


# three parts; video b's segments are split over the first two (a job writes parts of 256 rows, not of videos)
FIRST = {"a": range(3), "b": range(2)}
SECOND = {"b": range(2, 4), "c": range(2), "f": range(1)}
THIRD = {"d": range(3), "e": range(1)}


def library(where: tuple[str, StorageOptions | None]) -> Version:
    """Version 1 holds the first two parts; version 2 changes c (masked in the second part, its new rows in
    the third part) and adds the third part's videos, with its index as version 1's file plus a delta."""
    writer = LibraryWriter(*where, embedding_dim=DIM, prompt_shape=SHAPE)
    first, second = rows(FIRST), rows(SECOND, failed=("f",))
    parts = [writer.write_part(first), writer.write_part(second)]
    v1 = writer.publish(parts, index_of(first, second), MODEL, None)
    third = rows({**THIRD, "c": range(2)})
    c = [row_id("s3://videos/c.mp4", s) for s in range(2)]
    parts = [parts[0], parts[1].masked(set(c)), writer.write_part(third)]
    delta = IndexDelta(
        v1.manifest["index"], tuple(c), (parts[2].path,), v1.manifest["counts"]["segments"] + 4
    )
    return writer.publish(parts, delta, MODEL, v1)


@pytest.fixture(params=["local", "s3"])
def where(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[str, StorageOptions | None]:
    if request.param == "local":
        return str(tmp_path / "lib"), None
    s3 = request.getfixturevalue("s3")
    return f"s3://{request.getfixturevalue('bucket')}/lib", s3.options


def flip(store: Store, name: str, at: int) -> None:
    data = bytearray(store.read_bytes(name))
    data[at] ^= 0x01
    store.write_bytes(name, bytes(data))


def test_a_healthy_library_has_no_problems(where) -> None:
    """Parts with masks, error rows, a video split over parts and an index delta: every file agrees."""
    version = library(where)
    checked = check(*where[:1], options=where[1])
    assert (checked.version, checked.ok, checked.problems) == (2, True, [])
    assert checked.files == 1 + 3 + 3 + 1  # manifest, parts, their records, the index
    assert check(where[0], 1, where[1]).ok
    assert repair(where[0], checked, where[1]) is None  # nothing to do: nothing published
    assert Library.open(*where).version == version.number


@pytest.mark.parametrize("damage", ["flipped", "truncated", "removed"])
@pytest.mark.parametrize("file", ["part", "features", "index"])
def test_each_damaged_or_missing_file_is_named(where, file: str, damage: str) -> None:
    version = library(where)
    store = Store(*where)
    part = version.parts[1]
    name = {"part": part.path, "features": part.features, "index": version.manifest["index"]["path"]}[file]
    size = len(store.read_bytes(name))
    if damage == "flipped":  # a bit in the middle: a page's values, a record's re-rank features, a vector
        flip(store, name, size // 2)
    elif damage == "truncated":
        store.write_bytes(name, store.read_bytes(name)[: size // 2])
    else:
        store.fs.rm(store.path(name))
    checked = check(*where[:1], options=where[1])
    assert not checked.ok and [(p.path, p.kind) for p in checked.problems] == [
        (name, MISSING if damage == "removed" else DAMAGED)
    ]
    message = checked.problems[0].detail
    if damage == "flipped" and file != "part":
        assert "its CRC-32 is" in message
    if damage == "flipped" and file == "features":  # what a search cannot see: it reads records unchecked
        found = Library.open(*where).rows_by_id([row_id("s3://videos/b.mp4", 2)], ["prompt_features"])
        assert found.num_rows == 1
    if damage == "removed":  # a search or a refresh that reads it says so, and what to do
        remedy = "`videosearch reindex" if file == "index" else "(`videosearch check --repair`)"
        with pytest.raises(DamagedLibraryError, match=rf"{name} is missing; .*{re.escape(remedy)}"):
            latest = Library.open(*where)
            latest.rows_by_id([row_id("s3://videos/b.mp4", 2)], ["uri", "prompt_features"])
            latest.index()
    assert main(["check", where[0], *endpoint(where)]) == 1


def endpoint(where) -> list[str]:
    return ["--endpoint-url", where[1].endpoint_url] if where[1] else []


def test_files_that_disagree_are_inconsistent(tmp_path: Path) -> None:
    """Readable files that do not say what the manifest says: counts, another part's records (a library
    written before records had a checksum), an index that lacks the version's rows."""
    where = (str(tmp_path / "lib"), None)
    version = library(where)
    store = Store(*where)
    manifest = version.manifest
    manifest["parts"][0]["ok"] += 1
    records = [p["features"] for p in manifest["parts"]]
    del manifest["parts"][2]["features_crc32"]
    store.write_bytes(manifest["parts"][2]["features"], store.read_bytes(records[1]))  # the second's records
    manifest["index"] = {**manifest["index"], "removed": [], "added": []}  # version 1's index, no delta
    store.write_bytes("versions/2.json", json.dumps(manifest).encode())
    problems = {p.path: (p.kind, p.detail) for p in check(*where).problems}
    assert problems == {
        manifest["parts"][0]["path"]: (
            INCONSISTENT, "5 rows (5 ok, 0 errors); the manifest says 5 (6 ok, 0 errors)"
        ),
        records[2]: (INCONSISTENT, "5 records of 48 bytes; the part has 6 rows, whose records are 48 bytes"),
        manifest["index"]["path"]: (INCONSISTENT, "it lacks 4 of the version's rows"),  # d's and e's
    }  # fmt: skip


def visible(where) -> dict[str, list[int]]:
    """Each video's segments in the current version."""
    table = Library.open(*where).table(["uri", "segment"])
    out: dict[str, list[int]] = {}
    for uri, segment in zip(table["uri"].to_pylist(), table["segment"].to_pylist(), strict=True):
        out.setdefault(uri.rsplit("/", 1)[-1][:-4], []).append(segment)
    return {video: sorted(segments) for video, segments in sorted(out.items())}


@pytest.mark.parametrize("damage", ["records flipped", "part removed"])
@pytest.mark.parametrize("which", [0, 1])
def test_repair_leaves_out_the_wrong_parts_and_every_row_of_their_videos(
    tmp_path: Path, which: int, damage: str
) -> None:
    """Video b's segments lie in the first two parts: whichever part is wrong, b leaves whole, found by
    its segments (a head that does not start at 0, a tail whose next segment's id was lost), from the part's
    own ids or, when the part is gone, from the index's."""
    where = (str(tmp_path / "lib"), None)
    version = library(where)
    store = Store(*where)
    part = version.parts[which]
    if damage == "records flipped":
        flip(store, str(part.features), -7)
    else:
        store.fs.rm(store.path(part.path))
    checked = check(*where)
    repaired = repair(where[0], checked)
    assert repaired is not None and repaired.dropped_parts == [part.path]
    expected = {"a": [0, 1, 2], "c": [0, 1], "d": [0, 1, 2], "e": [0], "f": [0]}
    expected.pop("a" if which == 0 else "f")  # (c's rows in the second part were masked: its rows are new)
    assert visible(where) == expected
    assert repaired.dropped_videos == 6 - len(expected)
    latest = Library.open(*where)
    assert (latest.version, latest.index().ntotal) == (
        3,
        sum(len(s) for v, s in expected.items() if v != "f"),
    )
    assert latest.manifest["changes"] == {"dropped": repaired.dropped_videos}
    assert check(*where).ok
    assert Library.open(where[0], version=2).version == 2  # the version before stays, for rollback


def test_repair_of_an_index_alone_builds_it_again(where) -> None:
    version = library(where)
    flip(Store(*where), version.manifest["index"]["path"], -20)
    repaired = repair(where[0], check(*where[:1], options=where[1]), where[1])
    assert repaired is not None and (repaired.dropped_parts, repaired.dropped_videos) == ([], 0)
    latest = Library.open(*where)
    assert latest.index().ntotal == version.manifest["index"]["ntotal"]
    assert latest.table(["id"]).num_rows == Library.open(where[0], where[1], 2).table(["id"]).num_rows
    assert check(*where[:1], options=where[1]).ok


def test_repair_refuses_a_check_of_another_version(tmp_path: Path) -> None:
    where = (str(tmp_path / "lib"), None)
    library(where)
    flip(Store(*where), Library.open(where[0], version=1).manifest["index"]["path"], -20)
    old = check(where[0], 1)
    assert not old.ok
    with pytest.raises(ValueError, match=r"only the current version \(2\) can be repaired.*rollback --to 1"):
        repair(where[0], old)


def test_the_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    where = (str(tmp_path / "lib"), None)
    version = library(where)
    assert main(["check", where[0]]) == 0
    assert capsys.readouterr().out.endswith("8 files read, no problems\n")
    flip(Store(*where), str(version.parts[2].features), -7)
    assert main(["check", where[0], "--repair", "--json"]) == 1
    result = json.loads(capsys.readouterr().out)
    assert (result["ok"], result["version"], result["repaired"]["version"]) == (False, 2, 3)
    assert result["problems"][0]["path"] == version.parts[2].features
    assert result["repaired"]["dropped_videos"] == 3  # c, d and e
    with pytest.raises(SystemExit) as usage:
        main(["check", where[0], "--repair", "--version", "1"])
    assert usage.value.code == 2
