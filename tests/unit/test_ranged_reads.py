"""A part file on remote storage is read in a few requests: its footer, then the chunks a read needs."""

from __future__ import annotations

import dataclasses
import io
import itertools

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from fault_proxy import FaultProxy
from helpers import MotoS3, part_row

from pipeline.library import DamagedLibraryError, LibraryWriter
from pipeline.library.ranged import KnownBytes, column_ranges
from pipeline.library.reader import CHECKED_PARQUET, READ_THREADS, read_each, read_part
from pipeline.storage import StorageOptions, Store

DIM = 256  # wide enough that the vectors are most of a part's bytes


def parquet_bytes() -> bytes:
    """A Parquet file of three row groups: narrow columns around a wide vector column."""
    rng = np.random.default_rng(0)
    table = pa.table(
        {
            "id": np.arange(3000),
            "vector": pa.FixedSizeListArray.from_arrays(pa.array(rng.random(3000 * 64, np.float32)), 64),
            "error": pa.array([None if i % 7 else f"failed {i}" for i in range(3000)]),
        }
    )
    out = io.BytesIO()
    pq.write_table(table, out, row_group_size=1000, write_page_checksum=True)
    return out.getvalue()


class Counted:
    """A fetch over ``data`` that records the ranges asked for."""

    def __init__(self, data: bytes) -> None:
        self.data, self.calls = data, []

    def __call__(self, starts: list[int], ends: list[int]) -> list[bytes]:
        self.calls.append(list(zip(starts, ends, strict=True)))
        return [self.data[start:end] for start, end in zip(starts, ends, strict=True)]


def test_any_read_returns_the_files_bytes_whether_planned_or_not() -> None:
    data = parquet_bytes()
    fetch = Counted(data)
    file = KnownBytes(len(data), fetch)
    file.fetch([(100, 5000), (len(data) - 1000, len(data) + 50)])  # a range past the end is cut at the end
    rng = np.random.default_rng(1)
    for _ in range(200):
        start = int(rng.integers(0, len(data)))
        length = int(rng.integers(0, 20000))
        file.seek(start)
        assert file.read(length) == data[start : start + length]
    file.seek(-10, io.SEEK_END)
    assert file.read() == data[-10:]
    assert file.read(5) == b""  # at the end
    assert len(fetch.calls) > 1  # reads outside the plan were fetched when asked


def test_the_planned_ranges_hold_everything_a_read_of_those_columns_needs() -> None:
    data = parquet_bytes()
    fetch = Counted(data)
    file = KnownBytes(len(data), fetch)
    file.fetch([(len(data) - 64 * 1024, len(data))])
    source = pa.PythonFile(file, mode="r")
    metadata = pq.ParquetFile(source).metadata
    planned = column_ranges(metadata, {"id", "error"})
    # one range between each two vector chunks: a row group's error chunk and the next one's id are adjacent
    assert len(planned) == 4
    file.fetch(planned)
    fetched = len(fetch.calls)

    fragment = CHECKED_PARQUET.make_fragment(source)
    table = fragment.to_table(columns=["id", "error"], filter=pc.field("error").is_valid(), use_threads=False)
    assert table["id"].to_pylist() == list(range(0, 3000, 7))
    assert len(fetch.calls) == fetched  # nothing more was fetched
    assert sum(end - start for start, end in planned) < len(data) / 10  # and the vectors never were

    vectors = fragment.to_table(columns=["vector"], use_threads=False)  # not planned: fetched when read
    assert vectors.num_rows == 3000 and len(fetch.calls) > fetched


@pytest.fixture
def remote_part(s3: MotoS3, bucket: str):
    """A part of 300 rows (every 10th an error) written to the bucket, and the proxy in front of moto."""
    proxy = FaultProxy(s3.endpoint_url)
    store = Store(f"s3://{bucket}/lib", StorageOptions(endpoint_url=proxy.url))
    rng = np.random.default_rng(0)
    rows = [part_row(i, f"v{i // 3}.mp4", i % 3, i % 10 != 0, rng, (DIM, None), "m", 3.0) for i in range(300)]
    writer = LibraryWriter(store, embedding_dim=DIM, prompt_shape=None)
    part = writer.write_part(pa.Table.from_pylist(rows, writer.schema))
    yield store, writer.schema, part, proxy
    proxy.close()


def gets_and_bytes(proxy: FaultProxy) -> tuple[int, int, int]:
    """The requests seen: HEADs, GETs and the bytes the GETs' ranges asked for."""
    heads = sum(method == "HEAD" for method, _, _ in proxy.faults.seen)
    ranges = [r.split("=")[1].split("-") for method, _, r in proxy.faults.seen if method == "GET"]
    return heads, len(ranges), sum(int(end) - int(start) + 1 for start, end in ranges)


def test_a_remote_part_is_read_in_two_requests_without_the_columns_not_asked_for(remote_part) -> None:
    store, schema, part, proxy = remote_part
    whole = store.read_bytes(part.path)
    assert part.file_bytes == len(whole)
    older = dataclasses.replace(part, file_bytes=None)  # a part written before its size was recorded
    for info, filter in itertools.product((part, older), (None, pc.field("error").is_null())):
        proxy.faults.seen.clear()
        table = read_part(store, info, schema, ["id", "uri", "segment"], filter)
        assert table.equals(read_part(store, info, schema, ["id", "uri", "segment"], filter, source=whole))
        assert table.num_rows == (300 if filter is None else 270)  # a filter's columns came with the rest
        heads, gets, fetched = gets_and_bytes(proxy)
        assert (heads, gets) == (info.file_bytes is None, 2)  # (its size), its footer, its chunks
        assert fetched < 300 * DIM * 4 / 2  # the embeddings (most of the file) were not fetched

    proxy.faults.seen.clear()
    table = read_part(store, part, schema, ["id", "embedding"])
    assert table["embedding"].null_count == 30 and len(table["embedding"][1]) == DIM
    assert gets_and_bytes(proxy)[2] >= 300 * DIM * 4


def test_a_remote_part_shorter_than_its_recorded_size_is_damaged(remote_part) -> None:
    store, schema, part, _ = remote_part
    whole = store.read_bytes(part.path)
    for kept in (len(whole) - 1000, 1000, 0):  # its footer cut, or all of it: the tail read past its end
        store.write_bytes(part.path, whole[:kept])
        with pytest.raises(DamagedLibraryError, match=f"{part.path} cannot be read .*the file ends before"):
            read_part(store, part, schema, ["id"])


def test_the_requests_of_many_remote_parts_are_sent_together(remote_part) -> None:
    store, schema, part, proxy = remote_part
    writer = LibraryWriter(store, embedding_dim=DIM, prompt_shape=None)
    rng = np.random.default_rng(1)
    parts = [part] + [
        writer.write_part(
            pa.Table.from_pylist([part_row(1000 * n, "w.mp4", 0, True, rng, (DIM, None), "m", 3.0)], schema)
        )
        for n in range(1, 2 * READ_THREADS)
    ]
    proxy.faults.seen.clear()
    # each request held until all the parts' are in flight at once; sent one part per thread, they never are
    proxy.faults.delay_s, proxy.faults.together = 5.0, len(parts)
    proxy.faults.kinds, proxy.faults.rate = ("delay",), 1.0
    tables = read_each(store, parts, schema, ["id", "uri"])
    assert [t["id"].to_pylist() for t in tables] == [list(range(300))] + [[1000 * n] for n in range(1, 16)]
    # two requests for the first part, one for each other: a tail holds all of a part that small
    assert gets_and_bytes(proxy)[:2] == (0, len(parts) + 1)
    assert proxy.faults.most_in_flight >= len(parts) > READ_THREADS  # not one part per reading thread

    proxy.faults.rate = 0.0
    missing, truncated = parts[3], parts[5]
    store.delete(missing.path)
    store.write_bytes(truncated.path, store.read_bytes(truncated.path)[:100])
    with pytest.raises(DamagedLibraryError, match=f"{missing.path} is missing"):
        read_each(store, parts, schema, ["id"])
    with pytest.raises(DamagedLibraryError, match=f"{truncated.path} cannot be read"):
        read_each(store, parts[4:], schema, ["id"])
    assert read_each(store, parts[6:], schema, ["id"])[0]["id"].to_pylist() == [6000]
