"""A library refreshed many times, with and without merging its small parts: its parts, opening it, refreshes.

    python bench/small_parts.py [--videos 40] [--refreshes 60] [--latency-ms 20]

Embeds ``--videos`` synthetic clips (2 s, 128x128, the bundled model) into two libraries on a moto S3
server on 127.0.0.1, then refreshes both ``--refreshes`` times, one new clip each time (a library refreshed
every hour as videos arrive), alternating between them so that the machine's drifts fall on both: one with
refresh's rules (small parts merged: ``pipeline/library/refresh.py``), one with merging turned off (every
refresh's part kept, as before it). Prints each library's parts at the end, the mean seconds of a refresh,
and what a searcher reads as it opens each (the manifest, the index, every part's lookup columns; no local
copies) behind a proxy that holds every request for ``--latency-ms``: seconds and requests, and their ratios.
The refreshes so far read every part from the library (``$VIDEOSEARCH_CACHE=off``, as on a new machine). Last,
three refreshes of the unmerged library (one new clip each) through the proxy: without local copies, then
making them, then reading them (``pipeline/library/local_cache.py``): seconds and requests.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "bench")]

from fault_proxy import FaultProxy, Faults  # noqa: E402
from remote_reads import moto, opening  # noqa: E402

from pipeline.embed.job import embed, refresh  # noqa: E402
from pipeline.embed.options import EmbedOptions  # noqa: E402
from pipeline.library import Library  # noqa: E402
from pipeline.library import refresh as refresh_rules  # noqa: E402
from pipeline.samples.synthetic import sample_scenes, write_clip  # noqa: E402
from pipeline.storage import StorageOptions, Store  # noqa: E402

MERGING = refresh_rules.MERGE_SMALL_PARTS
# $VIDEOSEARCH_CACHE of the three refreshes through the proxy (DIR: the workdir)
COPIES = {"no local copies": "off", "copies made": "DIR/cache", "copies read": "DIR/cache"}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--videos", type=int, default=40)
    parser.add_argument("--refreshes", type=int, default=60)
    parser.add_argument("--latency-ms", type=float, default=20.0)
    args = parser.parse_args()
    with moto() as url, tempfile.TemporaryDirectory() as workdir:
        pool, source = Path(workdir) / "pool", Path(workdir) / "source"
        pool.mkdir()
        source.mkdir()
        clips = args.videos + args.refreshes + len(COPIES)
        for i, scene in enumerate(sample_scenes(clips, seed=5)):
            write_clip(pool / f"clip-{i:04d}.mp4", scene)
        for i in range(args.videos):
            shutil.copy(pool / f"clip-{i:04d}.mp4", source)
        storage = StorageOptions(endpoint_url=url)
        options = EmbedOptions(storage=storage)
        Store("s3://bench", storage).fs.mkdir("bench")
        libraries = {"merged": "s3://bench/merged", "unmerged": "s3://bench/unmerged"}
        seconds = dict.fromkeys(libraries, 0.0)
        os.environ["VIDEOSEARCH_CACHE"] = "off"  # parts read from the library, as a new machine reads them
        for library in libraries.values():
            embed(str(source), library, options)
        for i in range(args.videos, args.videos + args.refreshes):
            shutil.copy(pool / f"clip-{i:04d}.mp4", source)
            for name, library in libraries.items():
                refresh_rules.MERGE_SMALL_PARTS = MERGING if name == "merged" else 1 << 40
                started = time.perf_counter()
                refresh(str(source), library, options)
                seconds[name] += time.perf_counter() - started
        refresh_rules.MERGE_SMALL_PARTS = MERGING
        proxy = FaultProxy(url, Faults(rate=1.0, kinds=("delay",), delay_s=args.latency_ms / 1000))
        try:
            opened, parts = {}, {}
            for name, library in libraries.items():
                store = Store(library, StorageOptions(endpoint_url=proxy.url))
                parts[name] = len(Library.open(store).snapshot.parts)
                opening(store, None)  # warm: connections
                proxy.faults.seen.clear()
                started = time.perf_counter()
                opening(store, None)
                opened[name] = (time.perf_counter() - started, len(proxy.faults.seen))
            # the library of many parts refreshed through the proxy: without local copies, then with
            refresh_rules.MERGE_SMALL_PARTS = 1 << 40
            through = EmbedOptions(storage=StorageOptions(endpoint_url=proxy.url))
            refreshed = {}
            for i, (label, cache) in enumerate(COPIES.items(), start=clips - len(COPIES)):
                os.environ["VIDEOSEARCH_CACHE"] = cache.replace("DIR", workdir)
                shutil.copy(pool / f"clip-{i:04d}.mp4", source)
                proxy.faults.seen.clear()
                started = time.perf_counter()
                refresh(str(source), libraries["unmerged"], through)
                refreshed[label] = (time.perf_counter() - started, len(proxy.faults.seen))
            refresh_rules.MERGE_SMALL_PARTS = MERGING
        finally:
            proxy.close()
    print(
        f"{args.videos} clips embedded, then {args.refreshes} refreshes of one new clip each; opening "
        f"through {args.latency_ms:.0f} ms a request"
    )
    for name in libraries:
        print(
            f"  {name:9s} {parts[name]:4d} parts   a refresh {seconds[name] / args.refreshes:5.2f} s   "
            f"opening {opened[name][0]:5.2f} s, {opened[name][1]:4d} requests"
        )
    (merged_s, merged_requests), (unmerged_s, unmerged_requests) = opened["merged"], opened["unmerged"]
    print(
        f"  unmerged / merged: opening {unmerged_s / merged_s:.2f}x the time, "
        f"{unmerged_requests / merged_requests:.2f}x the requests; a refresh "
        f"{seconds['unmerged'] / seconds['merged']:.2f}x the time"
    )
    print(f"a refresh of one new clip of the unmerged library ({parts['unmerged']} parts) through the proxy:")
    for label, (took, requests) in refreshed.items():
        print(f"  {label:16s} {took:5.2f} s, {requests:4d} requests")
    (cold_s, cold_requests), (warm_s, warm_requests) = refreshed["no local copies"], refreshed["copies read"]
    print(
        f"  no local copies / copies read: {cold_s / warm_s:.2f}x the time, "
        f"{cold_requests / warm_requests:.1f}x the requests"
    )


if __name__ == "__main__":
    main()
