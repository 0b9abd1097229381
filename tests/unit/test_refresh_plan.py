"""What a refresh keeps, masks, rewrites and embeds: ``plan_refresh`` on a library written here."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from pipeline.library import Library, LibraryWriter, Version
from pipeline.library.index import build_index, needs_rebuild
from pipeline.library.reader import read_parts
from pipeline.library.refresh import (
    REWRITE_MASKED_FRACTION,
    content_hash,
    copy_rows,
    index_delta,
    plan_refresh,
    rewrite_parts,
    same_local_bytes,
    whole_videos,
)
from pipeline.library.schema import part_schema, row_id
from xclip_core import ModelIdentity

DIM = 4
MODEL = ModelIdentity("test/model", "0" * 64)


def listed(name: str, etag: str | None = None) -> dict:
    """A listed object; its ETag (a content hash) is its name's unless given."""
    return {"uri": f"s3://b/{name}.mp4", "size": 10, "etag": etag or f"etag-{name}", "mtime": 1.0}


def rows_of(video: dict, segments: int = 2, error: str | None = None) -> list[dict]:
    rng = np.random.default_rng(abs(hash((video["uri"], video["etag"]))) % 2**32)
    return [
        {
            **video,
            "id": abs(hash((video["uri"], s))) % 2**62,
            "segment": s,
            "start_s": float(s),
            "end_s": s + 1.0,
            "duration_s": float(segments),
            "fps": 25.0,
            "frame_count": 25 * segments,
            "width": 64,
            "height": 48,
            "thumbnail": b"",
            "error": error,
            "embedding": None if error else rng.standard_normal(DIM).tolist(),
            "model_id": MODEL.tag,
        }
        for s in range(1 if error else segments)
    ]


def publish(path: Path, parts_rows: list[list[dict]], base: Version | None = None) -> Library:
    """A version of one part per entry of ``parts_rows`` (plus ``base``'s parts)."""
    writer = LibraryWriter(str(path), embedding_dim=DIM, prompt_shape=None)
    parts = (base.parts if base else []) + [
        writer.write_part(pa.Table.from_pylist(rows, schema=part_schema(DIM, None))) for rows in parts_rows
    ]
    everything = [row for part in parts_rows for row in part]
    ok = [row for row in everything if row["error"] is None]
    index = build_index(np.array([r["id"] for r in ok]), np.array([r["embedding"] for r in ok]))
    writer.publish(parts, index, MODEL, base)
    return Library.open(str(path))


def test_unchanged_new_changed_deleted_and_failed_objects(tmp_path: Path) -> None:
    a, b, c, d = listed("a"), listed("b"), listed("c"), listed("d")
    broken = listed("e")
    library = publish(
        tmp_path, [rows_of(a) + rows_of(b), rows_of(c) + rows_of(d) + rows_of(broken, error="x")]
    )
    first, second = library.snapshot.parts
    now = [a, listed("b", etag="e2"), d, broken, listed("f")]  # b changed, c deleted, f new, e failed before

    plan = plan_refresh(library, now)
    assert [row["uri"] for row in plan.to_embed] == [
        r["uri"] for r in (listed("b", "e2"), broken, listed("f"))
    ]
    assert plan.changes.to_dict() == {
        "new": 1, "changed": 1, "moved": 0, "copied": 0, "deleted": 1, "unchanged": 2, "retried": 1,
        "reused_rows": 4, "resumed_rows": 0,
    }  # fmt: skip
    # the first part keeps a (b masked: half its rows, not more); the second loses c's 2 and e's row of 5
    assert [(p.path, set(p.deleted)) for p in plan.kept] == [(first.path, {r["id"] for r in rows_of(b)})]
    assert [p.path for p in plan.rewrite] == [second.path]
    assert set(plan.gone_ids) == {r["id"] for r in rows_of(b) + rows_of(c)}  # embedded rows leave the index

    kept = plan_refresh(library, now, retry_failed=False)
    assert "s3://b/e.mp4" not in [row["uri"] for row in kept.to_embed] and kept.changes.retried == 0

    assert plan_refresh(library, [a, listed("b"), listed("c"), d, broken], retry_failed=False).changes.nothing


def test_masked_rows_stay_out_and_mostly_masked_parts_are_rewritten(tmp_path: Path) -> None:
    a, b = listed("a"), listed("b")
    library = publish(tmp_path, [rows_of(a, segments=1) + rows_of(b, segments=3)])
    plan = plan_refresh(library, [b])  # a's 1 row of 4 leaves: masked
    assert [len(p.deleted) for p in plan.kept] == [1] and not plan.rewrite
    plan = plan_refresh(library, [a])  # b's 3 rows of 4 leave: more than half, rewritten with a's row
    assert REWRITE_MASKED_FRACTION * 4 < 3 and not plan.kept
    writer = LibraryWriter(str(tmp_path), embedding_dim=DIM, prompt_shape=None)
    (rewritten,), readded = rewrite_parts(writer, plan.rewrite)
    assert (rewritten.rows, rewritten.deleted, readded) == (1, (), [])
    assert plan_refresh(library, []).kept == [] and plan_refresh(library, []).changes.deleted == 2


def test_a_reader_of_a_masked_part_sees_only_the_rows_the_version_holds(tmp_path: Path) -> None:
    a, b = listed("a"), listed("b")
    library = publish(tmp_path, [rows_of(a) + rows_of(b)])
    plan = plan_refresh(library, [a, listed("b", etag="e2")])
    changed = rows_of(listed("b", etag="e2"))  # same ids as b's old rows: only the part tells them apart
    writer = LibraryWriter(str(tmp_path), embedding_dim=DIM, prompt_shape=None)
    parts = plan.kept + [writer.write_part(pa.Table.from_pylist(changed, schema=writer.schema))]
    ok = rows_of(a) + changed
    index = build_index(np.array([r["id"] for r in ok]), np.array([r["embedding"] for r in ok]))
    writer.publish(parts, index, MODEL, library.snapshot)

    latest = Library.open(str(tmp_path))
    assert latest.manifest["counts"]["segments"] == 4 and latest.table().num_rows == 4
    got = latest.rows_by_id([r["id"] for r in changed], ["etag", "embedding"])
    assert got["etag"].to_pylist() == ["e2", "e2"]
    np.testing.assert_allclose(got["embedding"].to_pylist(), [r["embedding"] for r in changed], rtol=1e-6)
    assert library.table().num_rows == 4 and set(library.table()["etag"].to_pylist()) == {
        "etag-a",
        "etag-b",
    }  # version 1


@pytest.mark.parametrize(
    ("kind", "ntotal", "trained_on", "rebuild"),
    [
        ("flat", 19_000, 100, False),  # flat never drifts
        ("flat", 20_000, 19_000, True),  # large enough for IVF
        ("ivf", 30_000, 20_000, False),
        ("ivf", 45_000, 20_000, True),  # more than twice what its centroids saw
        ("ivf", 25_000, 60_000, True),  # less than half
        ("hnsw", 1_000_000, 10, False),  # explicit kind: remove() rebuilds it when it must
    ],
)
def test_index_rebuild_rule(kind: str, ntotal: int, trained_on: int, rebuild: bool) -> None:
    assert needs_rebuild(kind, ntotal, trained_on) is rebuild


def test_a_video_with_an_error_row_enters_as_its_error_row_only(tmp_path: Path) -> None:
    a, b = listed("a"), listed("b")
    writer = LibraryWriter(str(tmp_path), embedding_dim=DIM, prompt_shape=None)
    schema = part_schema(DIM, None)
    first = writer.write_part(pa.Table.from_pylist(rows_of(a) + rows_of(b)[:1], schema=schema))
    failed = {**rows_of(b, error="truncated")[0], "id": 12345}  # b failed after its first segment
    second = writer.write_part(pa.Table.from_pylist([failed], schema=schema))
    parts = whole_videos(writer, [first, second])
    assert parts[0].deleted == (rows_of(b)[0]["id"],) and parts[1] == second
    assert whole_videos(writer, [first]) == [first]  # nothing failed: nothing masked


def test_a_small_change_publishes_an_index_delta_that_readers_apply(tmp_path: Path) -> None:
    videos = [listed(f"v{i:02d}") for i in range(60)]  # 120 embedded rows in the index file: 12 may change
    library = publish(tmp_path, [[row for video in videos for row in rows_of(video)]])
    entry = library.manifest["index"]
    now = [listed("v00", etag="e2"), *videos[1:59], listed("new")]  # v00 changed, v59 deleted, one new
    plan = plan_refresh(library, now)
    writer = LibraryWriter(str(tmp_path), embedding_dim=DIM, prompt_shape=None)
    fresh = rows_of(listed("v00", etag="e2")) + rows_of(listed("new"))
    new_part = writer.write_part(pa.Table.from_pylist(fresh, schema=writer.schema))
    parts = plan.kept + [new_part]
    delta = index_delta(entry, plan.gone_ids, [new_part], parts, 120 - 4 + 4)
    assert delta is not None and set(delta.removed) == set(plan.gone_ids) and delta.added == (new_part.path,)
    writer.publish(parts, delta, MODEL, library.snapshot)

    latest = Library.open(str(tmp_path))
    assert latest.manifest["index"]["path"] == entry["path"]  # no index file written
    index = latest.index()
    expected = {r["id"]: r["embedding"] for video in videos[1:59] for r in rows_of(video)}
    expected |= {r["id"]: r["embedding"] for r in fresh}
    assert index.ntotal == len(expected) == latest.manifest["index"]["ntotal"]
    for id_, vector in expected.items():
        np.testing.assert_allclose(index.reconstruct(id_), vector, rtol=1e-6)
    assert library.index().ntotal == 120  # the base version still reads its own index

    # a change larger than a tenth of the file's vectors asks for a new file
    assert index_delta(entry, np.arange(10), [new_part], parts, 120) is None


def test_a_moved_object_keeps_its_rows_under_its_new_uri(tmp_path: Path) -> None:
    a, b, c = listed("a"), listed("b"), listed("c")
    library = publish(tmp_path, [rows_of(a) + rows_of(b), rows_of(c)])
    first, _ = library.snapshot.parts
    there = {**b, "uri": "s3://b/kept/b-2024.mp4", "mtime": 9.0}  # `aws s3 mv`: same ETag, a new date
    plan = plan_refresh(library, [a, there])  # b moved, c deleted

    assert plan.to_embed == [] and plan.copies == {b["uri"]: [there]}
    assert plan.changes.to_dict() == {
        "new": 0, "changed": 0, "moved": 1, "copied": 0, "deleted": 1, "unchanged": 1, "retried": 0,
        "reused_rows": 2, "resumed_rows": 0,
    }  # fmt: skip
    assert [p.path for p in plan.copied_from] == [first.path]  # the part that holds b's rows, as it was
    assert set(plan.gone_ids) == {r["id"] for r in rows_of(b) + rows_of(c)}  # old ids leave the index

    writer = LibraryWriter(str(tmp_path), embedding_dim=DIM, prompt_shape=None)
    (moved,) = copy_rows(writer, library, plan)
    got = read_parts(library.store, [moved], writer.schema).to_pylist()
    old = {r["segment"]: r for r in library.table().to_pylist() if r["uri"] == b["uri"]}
    assert [(r["uri"], r["etag"], r["mtime"], r["segment"]) for r in got] == [
        (there["uri"], b["etag"], 9.0, 0), (there["uri"], b["etag"], 9.0, 1),
    ]  # fmt: skip
    for row in got:  # the new uri's ids; embedding, thumbnail and decoding facts as they were
        assert row["id"] == row_id(there["uri"], row["segment"])
        same = {k: v for k, v in old[row["segment"]].items() if k not in ("id", "uri", "mtime")}
        assert {k: row[k] for k in same} == same


def test_a_move_needs_one_deleted_and_one_new_object_with_a_telling_fingerprint(tmp_path: Path) -> None:
    b, c, failed = listed("b"), listed("c", etag="twin"), listed("f")
    library = publish(
        tmp_path, [rows_of(b) + rows_of(c) + rows_of(listed("d", etag="twin")) + rows_of(failed, error="x")]
    )

    def moved(*now: dict) -> int:
        return plan_refresh(library, list(now)).changes.moved

    def to(video: dict, name: str, **changes: object) -> dict:
        return {**video, "uri": f"s3://b/new/{name}.mp4", **changes}

    assert moved(to(b, "b")) == 1
    assert moved(to(b, "b1"), to(b, "b2")) == 0  # two copies of b: which is b's cannot be told
    assert moved(to(c, "c")) == 0  # c and d had the same content: which moved cannot be told
    assert moved(to(failed, "f")) == 0  # a failed object is tried again at its new uri
    assert moved(b, to(b, "copy")) == 0  # b is still there: a copy is a new object
    assert moved(to(b, "b", etag="other")) == 0  # another content


def test_without_etags_a_move_keeps_size_and_modification_time(tmp_path: Path) -> None:
    local = {"uri": "/videos/a.mp4", "size": 10, "etag": None, "mtime": 1.5}
    undated = {"uri": "/videos/b.mp4", "size": 10, "etag": None, "mtime": None}
    library = publish(tmp_path, [rows_of(local) + rows_of(undated)])
    assert plan_refresh(library, [{**local, "uri": "/archive/a.mp4"}]).changes.moved == 1  # `mv`
    assert (
        plan_refresh(library, [{**local, "uri": "/archive/a.mp4", "mtime": 2.0}]).changes.moved == 0
    )  # `cp`
    assert plan_refresh(library, [{**undated, "uri": "/archive/b.mp4"}]).changes.moved == 0  # size alone


def md5_etag(content: str) -> str:
    """S3's ETag of an object uploaded whole: the MD5 of its bytes, quoted."""
    return f'"{hashlib.md5(content.encode()).hexdigest()}"'


def test_a_copy_under_an_md5_etag_takes_a_copy_of_the_rows_wherever_the_original_is(tmp_path: Path) -> None:
    a, b, c = (listed(name, etag=md5_etag(name)) for name in "abc")
    failed = listed("f", etag=md5_etag("f"))
    library = publish(tmp_path, [rows_of(a) + rows_of(b), rows_of(c) + rows_of(failed, error="x")])
    best = {**b, "uri": "s3://b/best/b.mp4", "mtime": 5.0}  # `aws s3 cp`: the same ETag, a new date
    also = {**b, "uri": "s3://b/also/b.mp4"}
    c1, c2 = ({**c, "uri": f"s3://b/c{i}.mp4"} for i in (1, 2))  # c deleted, two copies: no move, two copies
    again = {**failed, "uri": "s3://b/f-again.mp4"}  # a copy of a failed video: embedded
    plan = plan_refresh(library, [a, b, best, also, c1, c2, failed, again])

    assert {k: v for k, v in plan.changes.to_dict().items() if not k.endswith("_rows")} == {
        "new": 1, "changed": 0, "moved": 0, "copied": 4, "deleted": 1, "unchanged": 2, "retried": 1,
    }  # fmt: skip
    assert [row["uri"] for row in plan.to_embed] == [failed["uri"], again["uri"]]
    assert plan.copies == {b["uri"]: [best, also], c["uri"]: [c1, c2]}
    assert set(plan.gone_ids) == {r["id"] for r in rows_of(c)}  # b's rows stay, c's leave

    writer = LibraryWriter(str(tmp_path), embedding_dim=DIM, prompt_shape=None)
    got = read_parts(library.store, copy_rows(writer, library, plan), writer.schema).to_pylist()
    old = {(r["uri"], r["segment"]): r for r in library.table().to_pylist()}
    assert sorted((r["uri"], r["segment"]) for r in got) == sorted(
        (copy["uri"], s) for copy in (best, also, c1, c2) for s in (0, 1)
    )
    copies = {copy["uri"]: copy for copy in (best, also, c1, c2)}
    for row in got:
        copy = copies[row["uri"]]
        original = old[(b["uri"] if copy["etag"] == b["etag"] else c["uri"], row["segment"])]
        assert row["id"] == row_id(row["uri"], row["segment"])
        assert (row["etag"], row["mtime"]) == (copy["etag"], copy["mtime"])  # the listing's
        assert row["embedding"] == original["embedding"] and row["duration_s"] == original["duration_s"]


def test_only_an_md5_etag_stands_for_the_content() -> None:
    assert content_hash('"d41d8cd98f00b204e9800998ecf8427e"')  # S3, uploaded whole
    assert content_hash('"a2b9c3d41d8cd98f00b204e9800998ec-12"')  # S3, uploaded in 12 parts
    assert content_hash("d41d8cd98f00b204e9800998ecf8427e")
    assert not content_hash('"5f8a1b2c-1a2b3"')  # nginx: the date and size
    assert not content_hash('W/"d41d8cd98f00b204e9800998ecf8427e"')  # weak: "equivalent", not equal bytes
    assert not content_hash("CKih16GjycICEAE=")  # a GCS generation
    assert not content_hash(None)


def test_without_an_md5_etag_a_copy_is_embedded(tmp_path: Path) -> None:
    a = listed("a")  # an opaque ETag
    local = {"uri": "/videos/v.mp4", "size": 10, "etag": None, "mtime": 1.5}
    library = publish(tmp_path, [rows_of(a) + rows_of(local)])
    plan = plan_refresh(
        library, [a, {**a, "uri": "s3://b/copy.mp4"}, local, {**local, "uri": "/videos/w.mp4"}]
    )
    assert (plan.changes.copied, plan.changes.new, plan.copies) == (0, 2, {})  # `cp -p`: size and date alone


def test_a_local_copy_is_found_by_its_bytes(tmp_path: Path) -> None:
    """Local files have no ETag: a new file is compared byte for byte with the library's unchanged videos of
    its size (`cp` gives the copy a new date, `cp -p` keeps it); equal bytes make a copy of the rows."""
    videos = tmp_path / "videos"
    videos.mkdir()
    content = {"v": bytes(range(256)) * 8192, "f": b"\x01" * 2_097_152}  # 2 MiB each, past one compared chunk
    for name, data in content.items():
        (videos / f"{name}.mp4").write_bytes(data)

    def local(path: Path, mtime: float = 1.5) -> dict:
        return {"uri": str(path), "size": path.stat().st_size, "etag": None, "mtime": mtime}

    v, f = local(videos / "v.mp4"), local(videos / "f.mp4")
    library = publish(tmp_path / "lib", [rows_of(v) + rows_of(f, error="x")])
    (videos / "backup").mkdir()
    copies = {}
    for name, data in {
        "v.mp4": content["v"],  # `cp`: the same bytes, a new date
        "v renamed.mp4": content["v"],
        "v last byte.mp4": content["v"][:-1] + b"\x00",  # the same size, one byte differs at the end
        "f.mp4": content["f"],  # a copy of a failed video: embedded
    }.items():
        (videos / "backup" / name).write_bytes(data)
        copies[name] = local(videos / "backup" / name, mtime=9.0)
    listing = [v, f, *copies.values()]
    plan = plan_refresh(library, listing, same_bytes=same_local_bytes)
    assert plan.copies == {v["uri"]: [copies["v.mp4"], copies["v renamed.mp4"]]}
    embedded = {row["uri"] for row in plan.to_embed}
    assert embedded == {f["uri"], copies["v last byte.mp4"]["uri"], copies["f.mp4"]["uri"]}  # f: retried
    assert (plan.changes.copied, plan.changes.new) == (2, 2)
    assert plan_refresh(library, listing).changes.copied == 0  # no comparer (a remote store): embedded

    (videos / "v.mp4").unlink()  # the original gone: nothing to compare with (and no move: other dates)
    plan = plan_refresh(library, [f, *copies.values()], same_bytes=same_local_bytes)
    assert (plan.changes.copied, plan.changes.new, plan.changes.deleted) == (0, 4, 1)


def test_same_local_bytes(tmp_path: Path) -> None:
    a, b, c = (tmp_path / name for name in "abc")
    a.write_bytes(b"x" * 3_000_000)
    b.write_bytes(b"x" * 3_000_000)
    c.write_bytes(b"x" * 2_999_999 + b"y")
    assert same_local_bytes(str(a), f"file://{b}")
    assert not same_local_bytes(str(a), str(c))
    assert not same_local_bytes(str(a), str(tmp_path / "gone"))  # unreadable: not a copy
