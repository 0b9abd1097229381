"""Downloading a library's index file from S3: one stream against ranges fetched at once, in one run.

    python bench/index_download.py [--mb 256] [--stream-mbps 50] [--latency-ms 20]

Writes an object of ``--mb`` MB (an index file's size: 2 GB at 1M rows of ``ivf``) to a moto S3 server on
127.0.0.1, behind a proxy that holds each request ``--latency-ms`` and sends each answer at
``--stream-mbps`` MB/s (S3 sends one stream at ~100 MB/s; streams at once add up), and reads it:

  one stream  ``Store.read_bytes``: one GET (how an index file was read before)
  ranges      ``Store.read_large``: its size, then ranges of 16 MiB, 16 at once (how an index file is read)

Prints the seconds and MB/s of each and the ratio one stream / ranges. On this 2-core machine moto and the
proxy share the CPUs with the reader: they bound the ranges' rate well below what S3 serves.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "bench")]

from fault_proxy import FaultProxy, Faults  # noqa: E402
from remote_reads import moto  # noqa: E402

from pipeline.storage import StorageOptions, Store  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--mb", type=int, default=256)
    parser.add_argument("--stream-mbps", type=float, default=50.0)
    parser.add_argument("--latency-ms", type=float, default=20.0)
    args = parser.parse_args()
    data = np.random.default_rng(0).bytes(args.mb * 10**6)
    with moto() as url:
        Store("s3://bench", StorageOptions(endpoint_url=url)).fs.mkdir("bench")
        Store("s3://bench/index.faiss", StorageOptions(endpoint_url=url)).write_bytes("", data)
        faults = Faults(rate=1.0, kinds=("delay",), delay_s=args.latency_ms / 1000)
        faults.bytes_per_s = args.stream_mbps * 10**6
        proxy = FaultProxy(url, faults)
        try:
            store = Store("s3://bench/index.faiss", StorageOptions(endpoint_url=proxy.url))
            results = {}
            for name, read in (("one stream", store.read_bytes), ("ranges", store.read_large)):
                started = time.perf_counter()
                assert read() == data
                results[name] = time.perf_counter() - started
        finally:
            proxy.close()
    stream = f"{args.stream_mbps:.0f} MB/s a stream"
    print(f"an object of {args.mb} MB, {stream}, {args.latency_ms:.0f} ms a request:")
    for name, seconds in results.items():
        print(f"  {name:10s} {seconds:6.2f} s  {args.mb / seconds:6.1f} MB/s")
    print(f"  one stream / ranges: {results['one stream'] / results['ranges']:.2f}")


if __name__ == "__main__":
    main()
