"""The service following a library on S3: the new version's index read again, or made from the one held.

    python bench/follow.py [--parts 200] [--change 0.01] [--latency-ms 20]

Writes a library of ``--parts`` parts of 256 rows (512-d embeddings, the index ``auto`` picks) to a moto S3
server on 127.0.0.1 behind a proxy that holds every request for ``--latency-ms``, then publishes a version
as a refresh does: ``--change`` of the rows masked (videos changed or deleted), as many new rows in a new
part, the index as the file plus a delta. A reader holding the first version (its index and row lookup, as
the service holds them) opens the second; its row lookup reads the new part only either way. Prints the
seconds, requests and bytes of the second version's index:

  read    :meth:`Library.read_index`: the index file, the delta applied (what the service did before)
  made    :func:`pipeline.library.next_index.index_after`: the index held, copied, the two deltas' difference
          applied (the new part's embeddings read)

and the ratio read / made.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

import faiss
import numpy as np
import pyarrow as pa

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "bench")]

from fault_proxy import FaultProxy, Faults  # noqa: E402
from remote_reads import DIM, PART_ROWS, SHAPE, moto, write_library  # noqa: E402
from search import concepts, part_table  # noqa: E402

from pipeline.library import Library, LibraryWriter  # noqa: E402
from pipeline.library.lookup import PartTables, RowLookup  # noqa: E402
from pipeline.library.next_index import index_after  # noqa: E402
from pipeline.library.reader import embedded_rows  # noqa: E402
from pipeline.library.refresh import index_delta  # noqa: E402
from pipeline.storage import StorageOptions, Store  # noqa: E402


def publish_change(store: Store, change: float) -> int:
    """A version as a refresh publishes it: ``change`` of the rows masked, as many new rows in a new part, the
    index as a delta. Returns the rows changed."""
    base = Library.open(store)
    rows = base.manifest["counts"]["segments"]
    changed = max(1, int(rows * change))
    writer = LibraryWriter(store, embedding_dim=DIM, prompt_shape=SHAPE)
    new = [writer.write_part(part_table(rows, changed, DIM, SHAPE, concepts(DIM), base.model.tag))]
    gone = np.arange(0, rows, rows // changed)[:changed]  # spread over the parts
    parts = [part.masked(set(gone[(gone >= n * PART_ROWS) & (gone < (n + 1) * PART_ROWS)].tolist()))
             for n, part in enumerate(base.snapshot.parts)] + new  # fmt: skip
    ntotal = len(embedded_rows(store, parts, writer.schema)[0])
    delta = index_delta(base.manifest["index"], gone, new, parts, ntotal)
    assert delta is not None, "the change is too large for a delta: pass a smaller --change"
    writer.publish(parts, delta, base.model, base.snapshot)
    return changed


def timed(proxy: FaultProxy, make: Callable[[], faiss.Index]) -> tuple[float, int, faiss.Index]:
    """Seconds of ``make()``, the requests it sent, what it made."""
    proxy.faults.seen.clear()
    started = time.perf_counter()
    index = make()
    return time.perf_counter() - started, len(proxy.faults.seen), index


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--parts", type=int, default=200)
    parser.add_argument("--change", type=float, default=0.01)
    parser.add_argument("--latency-ms", type=float, default=20.0)
    args = parser.parse_args()
    with moto() as url:
        Store("s3://bench", StorageOptions(endpoint_url=url)).fs.mkdir("bench")
        direct = Store("s3://bench/library", StorageOptions(endpoint_url=url))
        started = time.perf_counter()
        write_library(direct, args.parts)
        changed = publish_change(direct, args.change)
        print(f"wrote {args.parts} parts of {PART_ROWS} rows, then {changed} changed, in "
              f"{time.perf_counter() - started:.1f} s")  # fmt: skip
        proxy = FaultProxy(url, Faults(rate=1.0, kinds=("delay",), delay_s=args.latency_ms / 1000))
        try:
            store = Store("s3://bench/library", StorageOptions(endpoint_url=proxy.url))
            first, second = Library.open(store, version=1), Library.open(store, version=2)
            tables, arrow = PartTables(), pa.total_allocated_bytes()
            first_rows = RowLookup(store, first.snapshot.parts, first.schema, SHAPE, tables)
            held = first.index()
            second_rows = RowLookup(store, second.snapshot.parts, second.schema, SHAPE, tables)
            arrow = pa.total_allocated_bytes() - arrow  # both lookups: the service keeps the version before
            read = timed(proxy, second.read_index)
            made = timed(proxy, lambda: index_after(first, held, first_rows, second, second_rows))
        finally:
            proxy.close()
        file_bytes = direct.size(second.manifest["index"]["path"])
    assert made[2] is not None and made[2].ntotal == read[2].ntotal
    kind = second.manifest["index"]["kind"]
    print(f"the second version's index ({kind}, {read[2].ntotal} vectors; file {file_bytes / 1e6:.0f} MB), "
          f"{args.latency_ms:.0f} ms a request:")  # fmt: skip
    for name, (seconds, requests, _) in (("read", read), ("made", made)):
        print(f"  {name}  {seconds:6.2f} s  {requests:3d} requests")
    print(f"  read / made: {read[0] / made[0]:.1f}x; the file's {file_bytes / 1e6:.0f} MB not read again")
    print(f"the reader's row lookups of both versions and the part tables kept: {arrow / 2**20:.1f} MiB "
          f"of Arrow memory, {arrow / len(second_rows):.0f} bytes a row of the second")  # fmt: skip


if __name__ == "__main__":
    main()
