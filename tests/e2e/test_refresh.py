"""End to end: ``videosearch refresh`` through the CLI on the moto S3 server.

Objects are added, changed (same key, new content), deleted and re-added between refreshes; after each, the
library must equal a from-scratch ``embed`` of the same source (same rows, embeddings within 1e-4, same
query results), the refresh must have decoded only what changed, and the parts of unchanged objects must be
the very files the earlier version wrote.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import s3fs
from helpers import MotoS3, cli_env, run, run_all, write_video

from pipeline import Library, Searcher
from pipeline.library.index import ids_of, search
from pipeline.search.example import BadExample
from pipeline.search.service import ServiceOptions
from pipeline.search.service.follow import VersionFollower
from pipeline.storage import Store

TOL = 1e-4
CPU_ENCODERS = ["--gpus-per-encoder", "0"]  # float32, as the comparison to TOL needs
QUERIES = ("a red square moving left", "noise")


@pytest.fixture(scope="module")
def clips(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Short local clips (2 s at 10 fps) by name; ``b2`` is another content for the key of ``b``."""
    directory = tmp_path_factory.mktemp("clips")
    seeds = {"a": 1, "b": 2, "b2": 22, "c": 3, "d": 4, "e": 5}
    return {
        name: Path(write_video(directory / f"{name}.mp4", 20, 48, 40, fps=10, seed=seed))
        for name, seed in seeds.items()
    }


def rows(library: Library) -> dict[tuple[str, int], dict[str, Any]]:
    table = library.table(["id", "uri", "segment", "etag", "embedding", "error"])
    return {(row["uri"], row["segment"]): row for row in table.to_pylist()}


def assert_follows(follower: VersionFollower, latest: Library) -> None:
    """The follower moves to ``latest``, whose index it holds as a reader that opens it does."""
    assert follower.check() and follower.searcher().library.version == latest.version
    held, read = follower.searcher().cpu_index, latest.read_index()
    assert sorted(ids_of(held)) == sorted(ids_of(read))
    query = np.random.default_rng(0).standard_normal((1, read.d)).astype(np.float32)  # every row: flat
    found = [search(index, query, read.ntotal) for index in (held, read)]
    held_scores, read_scores = (
        {int(i): round(float(s), 5) for s, i in zip(scores[0], ids[0], strict=True)} for scores, ids in found
    )
    assert held_scores == read_scores


def assert_same_library(refreshed: Library, fresh: Library) -> None:
    """The same rows (ids, etags, errors), embeddings within TOL, and the same hits for each query."""
    ours, theirs = rows(refreshed), rows(fresh)
    assert ours.keys() == theirs.keys()
    for key, row in ours.items():
        other = theirs[key]
        assert (row["id"], row["etag"], row["error"]) == (other["id"], other["etag"], other["error"]), key
        np.testing.assert_allclose(row["embedding"], other["embedding"], atol=TOL, rtol=0)
    assert refreshed.manifest["counts"] == fresh.manifest["counts"]
    for text in QUERIES:
        a, b = Searcher(refreshed).search(text, k=20), Searcher(fresh).search(text, k=20)
        assert [(h.uri, h.segment) for h in a] == [(h.uri, h.segment) for h in b], text
        np.testing.assert_allclose([h.score for h in a], [h.score for h in b], atol=TOL, rtol=0)


def fresh(source: str | Path, library: str | Path, flags: list[Any], options: Any = None) -> Library:
    """A from-scratch embed of ``source``."""
    run("embed", source, library, *flags).json()
    return Library.open(str(library), options)


def test_refresh_embeds_only_what_changed_and_equals_a_fresh_embed(
    s3: MotoS3, bucket: str, tiny_model: Path, clips: dict[str, Path]
) -> None:
    fs = s3fs.S3FileSystem(endpoint_url=s3.endpoint_url, skip_instance_cache=True)
    source, library = f"s3://{bucket}/videos", f"s3://{bucket}/library"
    flags = [
        "--model",
        tiny_model,
        "--segment",
        "1",
        "--endpoint-url",
        s3.endpoint_url,
        "--json",
        *CPU_ENCODERS,
    ]

    def put(name: str, key: str | None = None) -> None:
        fs.put_file(str(clips[name]), f"{bucket}/videos/{key or name}.mp4")

    def refresh() -> dict[str, Any]:
        return run("refresh", source, library, *flags).json()

    def fresh_embed(name: str) -> Library:
        return fresh(source, f"s3://{bucket}/{name}", flags, s3.options)

    for name in "abcd":
        put(name)
    first = refresh()  # no library yet: the first version
    assert (first["version"], first["ok"], first["segments"]) == (1, 4, 8)
    assert first["changes"]["new"] == 4
    nothing = refresh()
    assert (nothing["published"], nothing["version"], nothing["changes"]["unchanged"]) == (False, 1, 4)

    reader = Library.open(library, s3.options)  # holds version 1 while version 2 is published
    follower = VersionFollower(Store(library, s3.options), ServiceOptions())  # the service's, following
    before = [h.to_dict() for h in Searcher(reader).search(QUERIES[0], k=8)]
    written = {p.path: fs.info(f"{bucket}/library/{p.path}")["ETag"] for p in reader.snapshot.parts}

    put("b2", key="b")  # changed: same key, new content
    fs.rm(f"{bucket}/videos/c.mp4")
    put("e")
    second = refresh()
    assert second["version"] == 2
    assert {k: v for k, v in second["changes"].items() if not k.endswith("_rows")} == {
        "new": 1, "changed": 1, "moved": 0, "copied": 0, "deleted": 1, "unchanged": 2, "retried": 0,
    }  # fmt: skip
    assert second["changes"]["reused_rows"] == 4  # a's and d's segments, not decoded again
    latest = Library.open(library, s3.options)
    kept = [p for p in latest.snapshot.parts if p.path in written]
    assert kept, "version 1's part is referenced, not rewritten"
    for part in kept:
        assert fs.info(f"{bucket}/library/{part.path}")["ETag"] == written[part.path]
    new_rows = sum(p.rows for p in latest.snapshot.parts if p.path not in written)
    assert new_rows == 4  # b's and e's two segments each: nothing else was encoded
    assert [h.to_dict() for h in Searcher(reader).search(QUERIES[0], k=8)] == before
    assert_same_library(latest, fresh_embed("fresh-2"))
    assert_follows(follower, latest)

    put("c")  # re-added, as it was
    third = refresh()
    assert (third["version"], third["changes"]["new"], third["changes"]["unchanged"]) == (3, 1, 4)
    assert_same_library(Library.open(library, s3.options), fresh_embed("fresh-3"))
    assert_follows(follower, Library.open(library, s3.options))

    versions = run("versions", library, "--endpoint-url", s3.endpoint_url, "--json").json()
    assert [(v["number"], v["current"], v["counts"]["videos"]) for v in versions] == [
        (1, False, 4), (2, False, 4), (3, True, 5),
    ]  # fmt: skip
    assert versions[1]["changes"]["deleted"] == 1 and all(v["published"] for v in versions)
    checked = run("check", library, "--endpoint-url", s3.endpoint_url, "--json")  # masks, an index delta
    assert (checked.code, checked.json()["problems"]) == (0, [])
    old = run(
        "query", library, QUERIES[0], "-k", "8", "--version", "1", "--json", "--endpoint-url", s3.endpoint_url
    )
    hits = old.json()
    assert [(h["uri"], h["segment"], h["id"]) for h in hits] == [
        (h["uri"], h["segment"], h["id"]) for h in before
    ]
    np.testing.assert_allclose([h["score"] for h in hits], [h["score"] for h in before], atol=1e-6, rtol=0)

    # --per-video: the best segment of each video, in the order of the full ranking's first of each
    storage = ["--json", "--endpoint-url", s3.endpoint_url]
    every = run("query", library, QUERIES[0], "-k", "20", *storage).json()
    best = run("query", library, QUERIES[0], "-k", "20", "--per-video", *storage).json()
    firsts: dict[str, int] = {}
    for hit in every:
        firsts.setdefault(hit["uri"], hit["id"])
    assert len(every) == 10 and [hit["id"] for hit in best] == list(firsts.values()) and len(best) == 5


def test_moved_renamed_and_copied_videos_keep_their_embeddings_and_equal_a_fresh_embed(
    s3: MotoS3, bucket: str, tiny_model: Path, clips: dict[str, Path]
) -> None:
    fs = s3fs.S3FileSystem(endpoint_url=s3.endpoint_url, skip_instance_cache=True)
    source, library = f"s3://{bucket}/videos", f"s3://{bucket}/library"
    flags = ["--model", tiny_model, "--segment", "1", "--endpoint-url", s3.endpoint_url, "--json"]
    for name in "abcd":
        fs.put_file(str(clips[name]), f"{bucket}/videos/{name}.mp4")
    run("refresh", source, library, *flags, *CPU_ENCODERS).json()

    fs.mv(f"{bucket}/videos/b.mp4", f"{bucket}/videos/2024/trip/b.mp4")  # a copy and a delete: same ETag
    fs.mv(f"{bucket}/videos/c.mp4", f"{bucket}/videos/c renamed.mp4")
    fs.rm(f"{bucket}/videos/d.mp4")
    fs.copy(f"{bucket}/videos/a.mp4", f"{bucket}/videos/best of/a.mp4")  # `aws s3 cp`: the same MD5 ETag
    moved = run("refresh", source, library, *flags, *CPU_ENCODERS).json()
    assert {k: v for k, v in moved["changes"].items() if not k.endswith("_rows")} == {
        "new": 0, "changed": 0, "moved": 2, "copied": 1, "deleted": 1, "unchanged": 1, "retried": 0,
    }  # fmt: skip
    assert moved["executor"] is None  # nothing decoded or encoded
    latest = Library.open(library, s3.options)
    assert sorted(set(latest.table(["uri"])["uri"].to_pylist())) == [
        f"s3://{bucket}/videos/2024/trip/b.mp4", f"s3://{bucket}/videos/a.mp4",
        f"s3://{bucket}/videos/best of/a.mp4", f"s3://{bucket}/videos/c renamed.mp4",
    ]  # fmt: skip
    assert_same_library(latest, fresh(source, f"s3://{bucket}/fresh", [*flags, *CPU_ENCODERS], s3.options))


def test_a_local_folder_moved_with_mv_is_not_embedded_again(
    tiny_model: Path, clips: dict[str, Path], tmp_path: Path
) -> None:
    source, library = tmp_path / "videos", tmp_path / "library"
    (source / "inbox").mkdir(parents=True)
    for name in "ab":
        shutil.copy2(clips[name], source / "inbox" / f"{name}.mp4")
    run("embed", source, library, "--model", tiny_model, "--json").json()
    (source / "inbox").rename(source / "sorted")
    moved = run("refresh", source, library, "--model", tiny_model, "--json").json()
    assert (moved["changes"]["moved"], moved["changes"]["new"], moved["executor"]) == (2, 0, None)
    hits = Searcher.open(str(library)).search(QUERIES[0], k=2)
    assert sorted(h.uri for h in hits) == [str(source / "sorted" / f"{name}.mp4") for name in "ab"]

    # videos like one from outside the library: a copy of b, embedded as the library's were, is b
    (tmp_path / "b copy.mp4").write_bytes(clips["b"].read_bytes())
    like = run("query", library, "--like", "b copy.mp4", "-k", "2", "--json", cwd=tmp_path).json()
    assert [h["uri"] for h in like] == [str(source / "sorted" / f"{name}.mp4") for name in "ba"]
    assert like[0]["score"] == pytest.approx(1.0, abs=1e-5) and like[1]["score"] < 0.999
    assert like[0]["scored_by"] == "cosine"
    (tmp_path / "notes.mp4").write_text("not a video")
    with pytest.raises(BadExample, match="notes.mp4 cannot be used as an example: "):
        Searcher.open(str(library)).like(str(tmp_path / "notes.mp4"))
    for args in (["a text", "--like", "notes.mp4"], [], ["--like", "notes.mp4", "--queries", "-"]):
        refused = run("query", library, *args, cwd=tmp_path)
        assert refused.code == 2 and "give one of a TEXT to look for, --like VIDEO or --queries FILE" in (
            refused.stderr
        ), refused.stderr

    # a copy of the folder (`cp -r`: new dates, no ETags) is found by its bytes: nothing decoded
    shutil.copytree(source / "sorted", source / "backup", copy_function=shutil.copy)
    copied = run("refresh", source, library, "--model", tiny_model, "--json").json()
    assert (copied["changes"]["copied"], copied["changes"]["new"], copied["executor"]) == (2, 0, None)
    rows = Library.open(str(library)).table(["uri", "embedding"]).to_pylist()
    embeddings = {Path(row["uri"]).relative_to(source).as_posix(): row["embedding"] for row in rows}
    assert embeddings["backup/a.mp4"] == embeddings["sorted/a.mp4"] != embeddings["backup/b.mp4"]


def test_a_part_found_damaged_is_repaired_and_the_refresh_embeds_its_videos_again(
    tiny_model: Path, clips: dict[str, Path], tmp_path: Path
) -> None:
    """A re-rank record changed on disk (which a search would read without noticing): `check` names the file,
    `check --repair` publishes a version without its part, and the next refresh embeds those videos again:
    the library equals a fresh embed."""
    source, library = tmp_path / "videos", tmp_path / "library"
    source.mkdir()
    for name in "abc":
        shutil.copy2(clips[name], source / f"{name}.mp4")
    flags = ["--model", tiny_model, "--segment", "1", "--json", *CPU_ENCODERS]
    run("embed", source, library, *flags).json()
    (part,) = Library.open(str(library)).snapshot.parts
    records = library / str(part.features)
    data = bytearray(records.read_bytes())
    data[-3] ^= 0x10  # in the last row's re-rank features
    records.write_bytes(bytes(data))

    found = run("check", library)
    assert found.code == 1 and f"{part.features}: damaged: its CRC-32 is" in found.stdout, found.stdout
    repaired = run("check", library, "--repair", "--json")
    assert repaired.code == 1 and json.loads(repaired.stdout)["repaired"]["dropped_videos"] == 3
    assert run("check", library).code == 0
    again = run("refresh", source, library, *flags).json()
    assert (again["changes"]["new"], again["changes"]["unchanged"], again["version"]) == (3, 0, 3)
    assert_same_library(Library.open(str(library)), fresh(source, tmp_path / "fresh", flags))


def test_refresh_refuses_another_model_or_decoding(
    s3: MotoS3, bucket: str, tiny_model: Path, clips: dict[str, Path], tmp_path: Path
) -> None:
    fs = s3fs.S3FileSystem(endpoint_url=s3.endpoint_url, skip_instance_cache=True)
    fs.put_file(str(clips["a"]), f"{bucket}/videos/a.mp4")
    source, library = f"s3://{bucket}/videos", f"s3://{bucket}/library"
    storage = ["--endpoint-url", s3.endpoint_url]
    run("embed", source, library, "--model", tiny_model, *storage, *CPU_ENCODERS, "--json").json()
    other = run("refresh", source, library, *storage)  # the bundled model: not the library's
    assert other.code == 2 and "another model" in other.stderr and "videosearch embed" in other.stderr
    segmented = run("refresh", source, library, "--model", tiny_model, "--segment", "1", *storage)
    assert segmented.code == 2 and "decoding" in segmented.stderr
    assert Library.open(library, s3.options).version == 1


# A job killed at a point: a subprocess runs the CLI with that point made fatal. It kills its whole process
# group (the CLI, and Ray's workers and services that it started) with SIGKILL, as a crash or `kill -9` would.
CRASHING_CLI = """
import os, signal, sys
from pipeline import cli
from pipeline.library.journal import Journal
from pipeline.library.writer import LibraryWriter

def die(*args, **kwargs):
    os.killpg(0, signal.SIGKILL)

def after(function):
    def wrapped(*args, **kwargs):
        result = function(*args, **kwargs)
        die()
        return result
    return wrapped

point = sys.argv[1]
if point == "listed":  # the source is listed and the lease taken; nothing decoded yet
    Journal.__enter__ = after(Journal.__enter__)
elif point == "part":  # a part is written and recorded; no index, no manifest
    Journal.record = after(Journal.record)
elif point == "manifest":  # the manifest is written; _current still names the previous version
    LibraryWriter.set_current = die
sys.exit(cli.main(sys.argv[2:]))
"""


def crashed_run(point: str, *args: str | os.PathLike) -> int:
    done = subprocess.run(
        [sys.executable, "-c", CRASHING_CLI, point, *map(str, args)],
        capture_output=True,
        env=cli_env(),
        start_new_session=True,  # its own process group, which it kills
        timeout=300,
    )
    return done.returncode


def test_a_killed_refresh_leaves_the_library_answering_and_the_rerun_completes_it(
    tiny_model: Path, clips: dict[str, Path], tmp_path: Path
) -> None:
    source, library = tmp_path / "videos", tmp_path / "library"
    source.mkdir()
    flags = ["--model", tiny_model, "--segment", "1", "--json", *CPU_ENCODERS]
    for name in "ab":
        shutil.copy(clips[name], source / f"{name}.mp4")
    assert run("refresh", source, library, *flags).json()["version"] == 1

    version = 1
    for point, added in (("listed", "c"), ("part", "d"), ("manifest", "e")):
        before = [h.to_dict() for h in Searcher.open(str(library)).search(QUERIES[0], k=10)]
        shutil.copy(clips[added], source / f"{added}.mp4")
        assert crashed_run(point, "refresh", source, library, *flags) == -signal.SIGKILL
        # the previous version still answers, as it did
        assert Library.open(str(library)).version == version
        assert [h.to_dict() for h in Searcher.open(str(library)).search(QUERIES[0], k=10)] == before
        summary = run("refresh", source, library, *flags).json()  # the rerun completes the job
        assert summary["changes"]["new"] == 1, point
        if point == "part":  # the killed job's finished part is reused, not decoded and encoded again
            assert summary["changes"]["resumed_rows"] == 2
        version = summary["version"]
        assert not list((library / "runs").iterdir()), "the journals go once a version is published"
    versions = run("versions", library, "--json").json()
    assert [v["published"] for v in versions] == [True, True, True, False, True]  # 4: the killed manifest
    assert_same_library(Library.open(str(library)), fresh(source, tmp_path / "fresh", flags))


def test_a_second_writer_is_refused_while_the_first_holds_the_lease(
    tiny_model: Path, clips: dict[str, Path], tmp_path: Path
) -> None:
    source, library = tmp_path / "videos", tmp_path / "library"
    source.mkdir()
    shutil.copy(clips["a"], source / "a.mp4")
    flags = ["--model", tiny_model, "--json", *CPU_ENCODERS]
    runs = run_all({"one": ["refresh", source, library, *flags], "two": ["refresh", source, library, *flags]})
    codes = sorted(r.code for r in runs.values())
    busy = [r for r in runs.values() if r.code == 2]
    # the documented outcome: one publishes; the other is refused at once (the lease, claimed by
    # compare-and-swap however close together they start), or, if it started after the first had published,
    # finds nothing changed
    assert codes in ([0, 2], [0, 0])
    if busy:
        assert "being written by another job" in busy[0].stderr, busy[0].stderr
    assert Library.open(str(library)).version == 1
