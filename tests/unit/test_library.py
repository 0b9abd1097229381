"""Tests for ``pipeline.library``: versions, immutability, concurrent writers, crashes; local disk and S3."""

from __future__ import annotations

import dataclasses
import json
import threading
from typing import TYPE_CHECKING

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from helpers import part_row

from pipeline.library import (
    CURRENT,
    ConcurrentWriteError,
    DamagedLibraryError,
    Library,
    LibraryWriter,
    NotALibraryError,
    PartInfo,
    Version,
    VersionNotFoundError,
)
from pipeline.library.check import check
from pipeline.library.features import features_path
from pipeline.library.history import rollback
from pipeline.library.index import build_index, deserialize
from pipeline.library.journal import RUNS, Journal, LibraryBusyError, maintenance
from pipeline.library.reindex import reindex
from pipeline.library.repair import repair
from pipeline.library.schema import part_schema
from pipeline.storage import StorageOptions, Store
from xclip_core import ModelIdentity

if TYPE_CHECKING:
    from helpers import MotoS3

DIM, SHAPE = 8, (2, 4)
MODEL = ModelIdentity("test/xclip-tiny", "0" * 64)


def rows(ids: range, failed: tuple[int, ...] = ()) -> pa.Table:
    """Part rows for ``ids``: two segments per video; the ids in ``failed`` are error rows."""
    rng = np.random.default_rng(ids.start)
    shapes = (DIM, SHAPE[0] * SHAPE[1])
    out = [
        part_row(i, f"s3://videos/v{i // 2}.mp4", i % 2, i not in failed, rng, shapes, MODEL.tag, 2.0)
        for i in ids
    ]
    return pa.Table.from_pylist(out, schema=part_schema(DIM, SHAPE))


def index_of(*tables: pa.Table) -> faiss.Index:
    """The exact index of the ok rows of ``tables``."""
    table = pa.concat_tables(tables)
    ok = table.filter(pc.is_null(table["error"]))
    vectors = ok["embedding"].combine_chunks().flatten().to_numpy().reshape(-1, DIM)
    return build_index(ok["id"].to_numpy(), vectors)


@pytest.fixture(params=["local", "s3"])
def where(request: pytest.FixtureRequest, tmp_path) -> tuple[str, StorageOptions | None]:
    """A library URI (not created yet) and its storage options: in a tmp dir, or in a moto S3 bucket."""
    if request.param == "local":
        return str(tmp_path / "lib"), None
    s3: MotoS3 = request.getfixturevalue("s3")
    return f"s3://{request.getfixturevalue('bucket')}/lib", s3.options


def writer(where) -> LibraryWriter:
    return LibraryWriter(*where, embedding_dim=DIM, prompt_shape=SHAPE)


def publish(where, base: Version | None, *tables: pa.Table, old: tuple[pa.Table, ...] = ()) -> Version:
    """Publish ``base``'s parts (holding ``old``) plus new parts holding ``tables``."""
    w = writer(where)
    parts = (base.parts if base else []) + [w.write_part(t) for t in tables]
    return w.publish(parts, index_of(*old, *tables), MODEL, base, extra={"note": "test"})


def test_publish_then_open(where) -> None:
    first, second = rows(range(0, 6), failed=(4,)), rows(range(6, 10))
    version = publish(where, None, first, second)
    assert version.number == 1 and version.token

    lib = Library.open(*where)
    assert lib.version == 1 and lib.versions() == [1] and lib.model == MODEL
    m = lib.manifest
    assert m["parent"] is None and m["extra"] == {"note": "test"} and m["next_id"] == 10
    assert m["counts"] == {"videos": 5, "segments": 9, "ok": 4, "failed": 1}
    assert m["index"]["kind"] == "flat" and m["index"]["ntotal"] == 9
    assert [(p["rows"], p["ok"], p["errors"]) for p in m["parts"]] == [(6, 5, 1), (4, 4, 0)]
    assert all(p["path"].startswith("parts/part-") for p in m["parts"])
    assert lib.index().ntotal == 9 and lib.index() is lib.index()

    assert lib.table().num_rows == 10 and lib.table()["id"].to_pylist() == list(range(10))
    listing = lib.table(columns=["id", "uri", "error"])
    assert listing.column_names == ["id", "uri", "error"]
    assert listing["error"].to_pylist().count("broken") == 1

    got = lib.rows_by_id(np.array([7, 0, 3, 7]), columns=["uri", "prompt_features"])
    assert got.column_names == ["uri", "prompt_features"]
    assert got["uri"].to_pylist() == [f"s3://videos/v{i}.mp4" for i in (3, 0, 1, 3)]
    assert got["prompt_features"].type == pa.list_(pa.float16(), 8)
    assert lib.rows_by_id([9])["embedding"].to_pylist() == second.slice(3)["embedding"].to_pylist()
    with pytest.raises(KeyError, match=r"\[-1, 42\]"):
        lib.rows_by_id([1, -1, 42])


def test_versions_are_immutable_and_readers_are_undisturbed(where) -> None:
    first, second = rows(range(0, 4)), rows(range(4, 8), failed=(5,))
    v1 = publish(where, None, first)
    reader = Library.open(*where)
    assert reader.table(columns=["id"]).num_rows == 4

    v2 = publish(where, v1, second, old=(first,))
    assert v2.number == 2 and v2.manifest["parent"] == 1 and v2.manifest["next_id"] == 8
    assert Store(*where).read_bytes(CURRENT) == b"2"
    # the reader still sees version 1 (and reads its index only now, after version 2 was published)
    assert reader.version == 1 and reader.table().num_rows == 4 and reader.index().ntotal == 4
    again = Library.open(*where, version=1)
    assert again.table()["id"].to_pylist() == [0, 1, 2, 3] and again.index().ntotal == 4
    latest = Library.open(*where)
    assert latest.version == 2 and latest.table().num_rows == 8 and latest.index().ntotal == 7
    assert latest.versions() == [1, 2]


def test_two_writers_from_the_same_base_one_wins(where) -> None:
    first = rows(range(0, 2))
    base = publish(where, None, first)
    publish(where, base, rows(range(2, 4)), old=(first,))  # writer A: version 2
    with pytest.raises(ConcurrentWriteError, match="published version 2 .* started from version 1"):
        publish(where, base, rows(range(4, 6)), old=(first,))  # writer B, from version 1 too

    # interleaved: A claims 3, B (same base) skips to 4 and publishes first; A's publish then fails
    base = Library.current_version(*where)
    a, b = writer(where), writer(where)
    claimed_a = a.claim(a.prepare(base.parts, Library(where[0], base, where[1]).index(), MODEL, base), base)
    claimed_b = b.claim(b.prepare(base.parts, Library(where[0], base, where[1]).index(), MODEL, base), base)
    assert (claimed_a.number, claimed_b.number) == (3, 4)
    assert b.set_current(claimed_b, base).number == 4
    with pytest.raises(ConcurrentWriteError, match="published version 4"):
        a.set_current(claimed_a, base)
    assert Library.open(*where).version == 4
    # a retried request that had succeeded: _current already names our version
    assert b.set_current(claimed_b, base).number == 4


def test_racing_threads_exactly_one_publishes(where) -> None:
    base = publish(where, None, rows(range(0, 2)))
    barrier, results = threading.Barrier(3), []

    def race(start: int) -> None:
        table = rows(range(start, start + 2))
        w = writer(where)
        parts, index = [w.write_part(table)], index_of(table)
        barrier.wait()
        try:
            results.append(w.publish(parts, index, MODEL, base).number)
        except ConcurrentWriteError:
            results.append("lost")

    threads = [threading.Thread(target=race, args=(start,)) for start in (10, 20, 30)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    won = [r for r in results if r != "lost"]
    assert len(won) == 1 and results.count("lost") == 2
    assert Library.open(*where).version == won[0]


def test_writers_starting_together_get_the_lease_one_at_a_time(where) -> None:
    """Each finds no live journal before any has written one; the claim by compare-and-swap lets one in."""
    store, racers = Store(*where), 6
    barrier, done, results = threading.Barrier(racers), threading.Event(), []

    def start() -> None:
        journal = Journal(store, MODEL.sha256, {"frames": 8, "segment_s": None}, "embed")
        barrier.wait()
        try:
            with journal:
                results.append(journal.run)
                done.wait(30)  # holding the lease until every other writer has tried
                journal.finish()
        except LibraryBusyError as e:
            results.append(str(e))
            if sum("being written by another job" in r for r in results) == racers - 1:
                done.set()

    threads = [threading.Thread(target=start) for _ in range(racers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    refused = [r for r in results if "being written by another job" in r]
    assert len(results) == racers and len(refused) == racers - 1, results
    assert store.names(RUNS) == []  # the refused left no journal; the winner's went when it finished


def test_reindex_rollback_and_repair_hold_the_lease_as_jobs_do(where) -> None:
    """A job and a command that publishes without embedding refuse each other at once, by name, instead of
    one losing its compare-and-swap after doing its work; a dead job's journal stays for its rerun."""
    publish(where, None, rows(range(0, 4)))
    store, decode = Store(*where), {"frames": 8, "segment_s": None}
    maintenance_commands = {
        "reindex": lambda: reindex(where[0], "flat", where[1]),
        "rollback": lambda: rollback(where[0], 1, where[1]),
        "check --repair": lambda: repair(where[0], check(where[0], options=where[1]), where[1]),
    }
    with Journal(store, MODEL.sha256, decode, "refresh") as job:
        for command in maintenance_commands.values():
            with pytest.raises(
                LibraryBusyError, match=r"being written by another job \(`videosearch refresh`, run"
            ):
                command()
        job.finish()
    for name in maintenance_commands:
        refused = pytest.raises(LibraryBusyError, match=rf"another job \(`videosearch {name}`, run")
        with maintenance(store, name), refused, Journal(store, MODEL.sha256, decode, "embed"):
            pass
    assert Library.open(*where).version == 1  # nothing was published

    dead = {
        "run": "dead",
        "host": "elsewhere",
        "pid": 1,
        "started": "",
        "expires": 0.0,
        "model": MODEL.sha256,
    }
    store.write_bytes(f"{RUNS}/dead.json", json.dumps({**dead, "decode": decode, "parts": []}).encode())
    assert reindex(where[0], "flat", where[1]).number == 2
    assert rollback(where[0], 1, where[1]).number == 3
    assert store.names(RUNS) == ["dead.json"]  # theirs went as they finished; the dead job's stays


def test_crash_before_current_leaves_the_previous_version(where) -> None:
    first = rows(range(0, 4))
    v1 = publish(where, None, first)
    w = writer(where)
    table = rows(range(4, 8))
    orphan = w.claim(w.prepare(v1.parts + [w.write_part(table)], index_of(first, table), MODEL, v1), v1)
    assert orphan.number == 2  # ... and the writer dies here

    lib = Library.open(*where)
    assert lib.version == 1 and lib.table().num_rows == 4 and lib.index().ntotal == 4
    assert lib.versions() == [1, 2]  # the orphan's number stays taken
    v3 = publish(where, lib.snapshot, rows(range(4, 6)), old=(first,))
    assert v3.number == 3 and v3.manifest["parent"] == 1
    assert Library.open(*where).table().num_rows == 6


def test_not_a_library_and_missing_version(where) -> None:
    assert Library.current_version(*where) is None
    with pytest.raises(NotALibraryError, match="not a videosearch library.*videosearch embed"):
        Library.open(*where)
    with pytest.raises(NotALibraryError):
        Library.open(*where, version=1)
    publish(where, None, rows(range(0, 2)))
    with pytest.raises(VersionNotFoundError, match="no version 7; available versions: 1"):
        Library.open(*where, version=7)


@pytest.mark.parametrize("damaged", ["current", "manifest", "part", "features", "index"])
def test_a_damaged_file_is_named_with_what_to_do(where, damaged: str) -> None:
    """A truncated or overwritten file (a copy cut short, a disk that filled up) is a one-line error that
    names it and says what repairs it, not the parser's complaint about '<Buffer>' or a FAISS traceback."""
    version = publish(where, None, rows(range(0, 4)))
    (part,) = version.parts
    store = Store(*where)
    name = {
        "current": CURRENT,
        "manifest": "versions/1.json",
        "part": part.path,
        "features": part.features,
        "index": version.manifest["index"]["path"],
    }[damaged]
    data = store.read_bytes(name)
    store.write_bytes(name, b"abc" if damaged == "current" else data[: len(data) // 2])
    with pytest.raises(DamagedLibraryError) as error:
        library = Library.open(*where)
        library.rows_by_id([2], columns=["uri", "prompt_features"])
        library.index()
    message = str(error.value)
    assert message.startswith(f"{store.uri} is damaged: {name} ") and "\n" not in message
    if damaged == "current":
        assert "write the number of the version to publish into it (the library has versions 1" in message
    elif damaged == "index":
        assert message.endswith(f"`videosearch reindex {store.uri}` builds it again")
        reindex(where[0], options=where[1])  # from the parts: the index is whole again
        assert Library.open(*where).index().ntotal == 4
    else:
        assert "cannot be read (" in message and "rollback --to N" in message


def test_a_part_whose_bytes_changed_is_damaged_not_silently_wrong(tmp_path) -> None:
    """A flipped byte inside a page (bit rot, a bad copy) of a part: Parquet would decode other values (other
    uris, other embeddings) without complaint; the page's checksum makes it a damaged file instead."""
    where = (str(tmp_path / "lib"), None)
    (part,) = publish(where, None, rows(range(0, 4))).parts
    path = tmp_path / "lib" / part.path
    chunk = pq.ParquetFile(path).metadata.row_group(0).column(1)  # uri
    start = chunk.dictionary_page_offset or chunk.data_page_offset
    data = bytearray(path.read_bytes())
    data[start + chunk.total_compressed_size - 3] ^= 0x01  # in the uri column's last page's values
    path.write_bytes(bytes(data))
    failed = f"{part.path} cannot be read .*checksum verification failed"
    with pytest.raises(DamagedLibraryError, match=failed):
        Library.open(*where).table(["id", "uri"])


def test_an_index_whose_bytes_changed_is_damaged_not_silently_wrong(tmp_path) -> None:
    """A flipped byte among an index file's vectors: FAISS would load it and search other vectors; the
    manifest's CRC-32 of the file makes it a damaged file that `reindex` repairs."""
    where = (str(tmp_path / "lib"), None)
    version = publish(where, None, rows(range(0, 4)))
    path = tmp_path / "lib" / version.manifest["index"]["path"]
    data = bytearray(path.read_bytes())
    data[-8] ^= 0x40  # a bit of the last row's id (the id map follows the vectors)
    path.write_bytes(bytes(data))
    assert deserialize(bytes(data)).ntotal == 4  # FAISS itself does not notice
    with pytest.raises(
        DamagedLibraryError, match=r"cannot be read \(its CRC-32 is \d+, the manifest recorded"
    ):
        Library.open(*where).index()
    reindex(where[0], options=where[1])
    assert Library.open(*where).index().ntotal == 4


def test_write_part_validates_and_casts(tmp_path) -> None:
    w = writer((str(tmp_path / "lib"), None))
    table = rows(range(0, 3), failed=(1,))
    with pytest.raises(ValueError, match=r"missing \['fps'\]"):
        w.write_part(table.drop_columns(["fps"]))
    loose = table.set_column(
        table.schema.get_field_index("embedding"),
        "embedding",
        pa.array(table["embedding"].to_pylist(), pa.list_(pa.float64())),
    )
    info = w.write_part(loose)
    # (the CRCs and the size: test_encode_write)
    unchecked = dataclasses.replace(info, crc32=None, file_bytes=None, features_crc32=None)
    assert unchecked == PartInfo(info.path, rows=3, ok=2, errors=1, features=features_path(info.path))
    short = table.set_column(
        table.schema.get_field_index("embedding"),
        "embedding",
        pa.array([[0.0] * (DIM - 1)] * 3, pa.list_(pa.float32())),
    )
    with pytest.raises(ValueError, match="'embedding' cannot be cast"):
        w.write_part(short)


def test_publish_checks_its_input(tmp_path) -> None:
    where = (str(tmp_path / "lib"), None)
    table = rows(range(0, 3))
    w = writer(where)
    parts = [w.write_part(table)]
    with pytest.raises(ValueError, match="the parts have 3 embeddings"):
        w.publish(parts, index_of(rows(range(0, 2))), MODEL, None)
    with pytest.raises(ValueError, match="dimension 4"):
        w.publish(parts, build_index(np.arange(3), np.eye(3, 4)), MODEL, None)
    v1 = w.publish(parts, index_of(table), MODEL, None)
    with pytest.raises(ValueError, match="opened by number"):
        w.publish(parts, index_of(table), MODEL, Library.open(*where, version=v1.number).snapshot)


def test_reindex_publishes_the_same_rows_with_an_index_of_another_kind(tmp_path) -> None:
    location = str(tmp_path / "lib")
    first = writer((location, None))
    parts = [first.write_part(rows(range(0, 6), failed=(3,))), first.write_part(rows(range(6, 12)))]
    base = first.publish(parts, index_of(rows(range(0, 6), failed=(3,)), rows(range(6, 12))), MODEL, None)
    before = Library.open(location)
    version = reindex(location, "hnsw")
    after = Library.open(location)
    assert (version.number, after.version) == (2, 2) and after.manifest["parent"] == base.number
    assert after.manifest["index"]["kind"] == "hnsw" and after.manifest["extra"]["reindexed"].startswith(
        "hnsw"
    )
    assert (
        after.snapshot.parts == before.snapshot.parts
        and after.manifest["counts"] == before.manifest["counts"]
    )
    queries = np.random.default_rng(1).standard_normal((5, DIM)).astype(np.float32)
    for query in queries:  # the same nearest rows (HNSW is exact on a handful of vectors)
        assert (
            after.index().search(query[None], 3)[1].tolist()
            == before.index().search(query[None], 3)[1].tolist()
        )
    with pytest.raises(ValueError, match="--kind must be"):
        reindex(location, "kd-tree")
