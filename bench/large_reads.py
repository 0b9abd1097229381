"""A checkpoint on S3: read tensor after tensor in one stream, or through ranges fetched at once, in one run.

    python bench/large_reads.py [--mb 256] [--stream-mbps 50] [--latency-ms 20]

Writes a safetensors checkpoint of ``--mb`` MB in 32 tensors (base-patch32's weights are 786 MB) to a moto S3
server on 127.0.0.1, behind a proxy that holds each request ``--latency-ms`` and sends each answer at
``--stream-mbps`` MB/s (S3 sends one stream at ~100 MB/s; streams at once add up), and reads it:

  one stream   the tensors in file order through an s3fs file: one ranged GET after another (the loader
               before ``AheadReader``)
  ahead        ``xclip_core.checkpoints.load_tensors``: the same through ``xclip_core.ahead_reader``
               (windows of 32 MiB ranges fetched 8 at once; the memory of the model and one window)
  whole file   s3fs's ``cat_file`` of the whole object (50 MB ranges, 10 at once): what the transport gives
               a reader that holds the whole file, the reference

Prints the seconds and MB/s of each and the ratio one stream / ahead. On this 2-core machine moto and the
proxy share the CPUs with the reader: they bound the concurrent reads well below what S3 serves.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import safetensors.torch
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "bench")]

from fault_proxy import FaultProxy, Faults  # noqa: E402
from remote_reads import moto  # noqa: E402

from pipeline.storage import StorageOptions, Store  # noqa: E402
from xclip_core import safetensors_reader  # noqa: E402
from xclip_core.checkpoints import load_tensors  # noqa: E402
from xclip_core.sources import ModelSource  # noqa: E402

NAME = "model.safetensors"


def one_stream(source: ModelSource) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors read in file order through one s3fs file (the loader before AheadReader)."""
    path = source.path(NAME)
    with source.fs.open(path, "rb") as f:
        stored = safetensors_reader.read_header(f, source.fs.size(path))
        return {name: safetensors_reader.read_tensor(f, entry) for name, entry in stored.items()}


def timed(read: Callable[[], object]) -> float:
    started = time.perf_counter()
    read()
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--mb", type=int, default=256)
    parser.add_argument("--stream-mbps", type=float, default=50.0)
    parser.add_argument("--latency-ms", type=float, default=20.0)
    args = parser.parse_args()
    weights = {f"layer{i}": torch.randn(args.mb * 10**6 // 4 // 32) for i in range(32)}
    with moto() as url, tempfile.TemporaryDirectory() as workdir:
        direct = StorageOptions(endpoint_url=url)
        Store("s3://bench", direct).fs.mkdir("bench")
        safetensors.torch.save_file(weights, f"{workdir}/{NAME}")
        Store("s3://bench/model", direct).fs.put(f"{workdir}/{NAME}", "bench/model/")
        faults = Faults(rate=1.0, kinds=("delay",), delay_s=args.latency_ms / 1000)
        faults.bytes_per_s = args.stream_mbps * 10**6
        proxy = FaultProxy(url, faults)
        try:
            model = ModelSource("s3://bench/model", StorageOptions(endpoint_url=proxy.url).for_protocol("s3"))
            results = {
                "one stream": timed(lambda: one_stream(model)),
                "ahead": timed(lambda: load_tensors(model, NAME)),
                "whole file": timed(lambda: model.read_bytes(NAME)),
            }
        finally:
            proxy.close()
    stream = f"{args.stream_mbps:.0f} MB/s a stream"
    print(f"a checkpoint of {args.mb} MB, {stream}, {args.latency_ms:.0f} ms a request:")
    for name, seconds in results.items():
        print(f"  {name:10s} {seconds:6.2f} s  {args.mb / seconds:6.1f} MB/s")
    print(f"  one stream / ahead: {results['one stream'] / results['ahead']:.2f}")


if __name__ == "__main__":
    main()
