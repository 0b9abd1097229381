"""Reading a library's parts on S3: requests and wall time of what a searcher reads as it opens, in one run.

    python bench/remote_reads.py [--parts 100] [--latency-ms 20]

Writes a library of ``--parts`` parts of 256 rows (the embed job's part size; 512-d embeddings, the bundled
model's geometry otherwise) to a moto S3 server on 127.0.0.1, behind a proxy that holds every request for
``--latency-ms`` (a request's first-byte time on S3 from the same region is 10-30 ms), and opens the version
as a searcher does: ``Library.open`` and the row lookup (the id, uri, segment, start, end and error columns
of every part). Prints, for each way of reading a part:

  ranged      ours (``pipeline/library/ranged.py``): the footer, then the chunks the read needs, merged
  chunked     Arrow reading an s3fs file chunk by chunk (how parts were read before ranged.py)
  unsized     ours for a library written before parts recorded their size: one request more per part

requests per part, wall seconds, and the ratio chunked / ranged (goal: >= 2 at 20 ms).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "bench")]

from fault_proxy import FaultProxy, Faults  # noqa: E402
from search import concepts, part_table  # noqa: E402

from pipeline.library import Library, LibraryWriter, reader  # noqa: E402
from pipeline.library.index import build_index  # noqa: E402
from pipeline.library.lookup import RowLookup  # noqa: E402
from pipeline.models import load_model  # noqa: E402
from pipeline.storage import StorageOptions, Store  # noqa: E402

PART_ROWS = 256  # pipeline.embed.stages.write.PART_ROWS
DIM, SHAPE = 512, (1, 64)  # the re-rank records are not read as a searcher opens


@contextlib.contextmanager
def moto() -> Iterator[str]:
    """A moto S3 server on 127.0.0.1, its URL."""
    os.environ.update(
        AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1"
    )
    port = 5600 + os.getpid() % 1000
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        for _ in range(100):
            with contextlib.suppress(OSError):
                urllib.request.urlopen(f"{url}/moto-api/", timeout=1).close()
                break
            time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        proc.wait()


def write_library(store: Store, parts: int) -> None:
    """A published library of ``parts`` parts, written straight to ``store``."""
    identity = load_model(None).identity
    writer = LibraryWriter(store, embedding_dim=DIM, prompt_shape=SHAPE)
    centers, written, vectors = concepts(DIM), [], []
    for start in range(0, parts * PART_ROWS, PART_ROWS):
        table = part_table(start, PART_ROWS, DIM, SHAPE, centers, identity.tag)
        written.append(writer.write_part(table))
        vectors.append(table["embedding"].combine_chunks().flatten().to_numpy().reshape(-1, DIM))
    rows = parts * PART_ROWS
    writer.publish(
        written, build_index(np.arange(rows, dtype=np.int64), np.concatenate(vectors)), identity, None
    )


@contextlib.contextmanager
def chunked(root: Store, part, columns, data) -> Iterator[pa.NativeFile]:  # noqa: ANN001
    """The reads before ranged.py: Arrow asks an s3fs file for each column chunk in turn."""
    with root.open(part.path, "rb", cache_type="none") as f:
        yield pa.PythonFile(f, mode="r")


def open_as_a_searcher(store: Store, proxy: FaultProxy, unsized: bool = False) -> tuple[float, int]:
    """Seconds of opening the current version and building its row lookup; the requests for its parts."""
    proxy.faults.seen.clear()
    started = time.perf_counter()
    library = Library.open(store)
    parts = library.snapshot.parts
    if unsized:
        parts = [dataclasses.replace(part, file_bytes=None) for part in parts]
    RowLookup(library.store, parts, library.schema, library.rerank_shape)
    return time.perf_counter() - started, sum("/parts/" in path for _, path, _ in proxy.faults.seen)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--parts", type=int, default=100)
    parser.add_argument("--latency-ms", type=float, default=20.0)
    args = parser.parse_args()
    with moto() as url, tempfile.TemporaryDirectory():
        Store("s3://bench", StorageOptions(endpoint_url=url)).fs.mkdir("bench")
        direct = Store("s3://bench/library", StorageOptions(endpoint_url=url))
        started = time.perf_counter()
        write_library(direct, args.parts)
        print(f"wrote {args.parts} parts of {PART_ROWS} rows in {time.perf_counter() - started:.1f} s")
        faults = Faults(rate=1.0, kinds=("delay",), delay_s=args.latency_ms / 1000)
        proxy = FaultProxy(url, faults)
        try:
            store = Store("s3://bench/library", StorageOptions(endpoint_url=proxy.url))
            open_as_a_searcher(store, proxy)  # warm: connections, imports
            results = {"ranged": open_as_a_searcher(store, proxy)}
            results["unsized"] = open_as_a_searcher(store, proxy, unsized=True)
            ours, reader._opened = reader._opened, chunked
            try:
                results["chunked"] = open_as_a_searcher(store, proxy)
            finally:
                reader._opened = ours
        finally:
            proxy.close()
    print(f"opening a searcher's rows, {args.parts} parts, {args.latency_ms:.0f} ms a request:")
    for name, (seconds, requests) in results.items():
        print(f"  {name:8s} {seconds:6.2f} s  {requests / args.parts:4.1f} requests a part")
    print(f"  chunked / ranged: {results['chunked'][0] / results['ranged'][0]:.2f} (goal >= 2)")


if __name__ == "__main__":
    main()
