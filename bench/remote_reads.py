"""Reading a library's parts on S3: requests and wall time of what a searcher reads as it opens, in one run.

    python bench/remote_reads.py [--parts 100] [--latency-ms 20]

Writes a library of ``--parts`` parts of 256 rows (the embed job's part size; 512-d embeddings, the bundled
model's geometry otherwise) to a moto S3 server on 127.0.0.1, behind a proxy that holds every request for
``--latency-ms`` (a request's first-byte time on S3 from the same region is 10-30 ms), and reads what a
searcher reads of every part as it opens (the row lookup's id, uri, segment, start, end and error columns).
Prints, for each way of reading the parts:

  together    ours (``read_each``, ``pipeline/library/ranged.py``): each part's footer, then the chunks the
              read needs, near ones merged; the requests of many parts sent at once
  unsized     the same for a library written before parts recorded their size: one request more per part
  per part    ours a part at a time, 8 reading threads (a part's two requests in turn)
  chunked     Arrow reading an s3fs file chunk by chunk, 8 reading threads (the reads before ranged.py)

requests per part, wall seconds, and the ratio chunked / together (goal: >= 2 at 20 ms). Then what a CLI
query reads as it opens the library (the manifest, the index file, every part's columns), the first time
and again, from the local copies it keeps (``pipeline/library/local_cache.py``).
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
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "bench")]

from fault_proxy import FaultProxy, Faults  # noqa: E402
from search import concepts, part_table  # noqa: E402

from pipeline.library import Library, LibraryWriter  # noqa: E402
from pipeline.library.index import build_index  # noqa: E402
from pipeline.library.local_cache import LocalCache  # noqa: E402
from pipeline.library.lookup import LOOKUP_COLUMNS as COLUMNS  # noqa: E402
from pipeline.library.lookup import PartTables, RowLookup  # noqa: E402
from pipeline.library.reader import READ_THREADS, read_each, read_part  # noqa: E402
from pipeline.models import load_model  # noqa: E402
from pipeline.storage import StorageOptions, Store, each_at_once  # noqa: E402

PART_ROWS = 256  # pipeline.library.writer.PART_ROWS
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


def together(library: Library) -> None:
    read_each(library.store, library.snapshot.parts, library.schema, COLUMNS, masked=False)


def unsized(library: Library) -> None:
    parts = [dataclasses.replace(part, file_bytes=None) for part in library.snapshot.parts]
    read_each(library.store, parts, library.schema, COLUMNS, masked=False)


def per_part(library: Library) -> None:
    read = lambda part: read_part(library.store, part, library.schema, COLUMNS, masked=False)  # noqa: E731
    each_at_once(read, library.snapshot.parts, READ_THREADS)


def chunked(library: Library) -> None:
    def read(part) -> pa.Table:  # noqa: ANN001
        with library.store.open(part.path, "rb", cache_type="none") as f:
            source = pa.PythonFile(f, mode="r")  # Arrow asks the s3fs file for each column chunk in turn
            return read_part(library.store, part, library.schema, COLUMNS, masked=False, source=source)

    each_at_once(read, library.snapshot.parts, READ_THREADS)


def opening(store: Store, cache: LocalCache) -> None:
    """What a searcher reads as it opens the library, keeping local copies in ``cache``."""
    library = Library.open(store, cache=cache)
    library.index()
    RowLookup(store, library.snapshot.parts, library.schema, SHAPE, PartTables(cache))


def timed(way: Callable[[Library], None], library: Library, proxy: FaultProxy) -> tuple[float, int]:
    """Seconds of reading the parts ``way``; the requests it sent."""
    proxy.faults.seen.clear()
    started = time.perf_counter()
    way(library)
    return time.perf_counter() - started, len(proxy.faults.seen)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--parts", type=int, default=100)
    parser.add_argument("--latency-ms", type=float, default=20.0)
    args = parser.parse_args()
    with moto() as url, tempfile.TemporaryDirectory() as workdir:
        Store("s3://bench", StorageOptions(endpoint_url=url)).fs.mkdir("bench")
        direct = Store("s3://bench/library", StorageOptions(endpoint_url=url))
        started = time.perf_counter()
        write_library(direct, args.parts)
        print(f"wrote {args.parts} parts of {PART_ROWS} rows in {time.perf_counter() - started:.1f} s")
        faults = Faults(rate=1.0, kinds=("delay",), delay_s=args.latency_ms / 1000)
        proxy = FaultProxy(url, faults)
        try:
            library = Library.open(Store("s3://bench/library", StorageOptions(endpoint_url=proxy.url)))
            timed(together, library, proxy)  # warm: connections, imports
            ways = {"together": together, "unsized": unsized, "per part": per_part, "chunked": chunked}
            results = {name: timed(way, library, proxy) for name, way in ways.items()}
            cache = LocalCache(Path(workdir) / "cache", 1 << 40)
            opened = [timed(lambda _: opening(library.store, cache), library, proxy) for _ in range(2)]
        finally:
            proxy.close()
    print(f"reading a searcher's columns of {args.parts} parts, {args.latency_ms:.0f} ms a request:")
    for name, (seconds, requests) in results.items():
        print(f"  {name:9s} {seconds:6.2f} s  {requests / args.parts:4.1f} requests a part")
    print(f"  chunked / together: {results['chunked'][0] / results['together'][0]:.2f} (goal >= 2)")
    print(f"  per part / together: {results['per part'][0] / results['together'][0]:.2f}")
    (first, first_requests), (again, again_requests) = opened
    print(f"a query opening the library: first {first:.2f} s ({first_requests} requests), "
          f"again {again:.2f} s ({again_requests} requests, local copies): {first / again:.1f}x")  # fmt: skip


if __name__ == "__main__":
    main()
