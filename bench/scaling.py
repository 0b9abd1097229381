"""The same embed job on 1, 2 and 3 worker nodes of 1 CPU each: videos/s as the cluster grows.

    python bench/scaling.py [--workers 1 2 3] [--videos 48]

Each size is a real multi-node Ray cluster on this machine (``tests/cluster.py``: a head without CPUs that
drives the job, worker nodes of 1 CPU); the job is ``videosearch embed --address`` with the bundled model
over the same local clips (synthetic, 4 s 320x180 H.264), as a user runs it against a cluster that is up.
Printed: the job's wall time, videos/s, the speed-up over one worker, and where its stages ran. On a machine
with fewer cores than the cluster has CPUs the nodes share cores: the speed-up then measures the plan's
overhead, not the cluster's capacity (this repository's CI machine has 2 cores).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]  # the package (not bench/pipeline.py), and the cluster helper

from cluster import LocalCluster  # noqa: E402

from pipeline.samples.synthetic import sample_scenes, write_clip  # noqa: E402


def write_clips(directory: Path, count: int) -> None:
    scenes = sample_scenes(count, seed=7, max_shapes=2)
    paths = [directory / f"clip-{i:03d}.mp4" for i in range(count)]
    with ProcessPoolExecutor(os.cpu_count()) as pool:
        list(pool.map(write_clip, paths, scenes, [4.0] * count, [12] * count, [320] * count, [180] * count))


def embed(cluster: LocalCluster, source: Path, library: Path) -> tuple[float, dict]:
    command = [sys.executable, "-m", "pipeline.cli", "embed", str(source), str(library), "--json"]
    started = time.perf_counter()
    done = subprocess.run(
        [*command, "--address", cluster.address], capture_output=True, text=True, env=cluster.env
    )
    seconds = time.perf_counter() - started
    if done.returncode:
        raise RuntimeError(f"embed exited with {done.returncode}:\n{done.stderr[-3000:]}")
    return seconds, json.loads(done.stdout)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--videos", type=int, default=48)
    args = parser.parse_args()
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_ADDRESS", None)
    with tempfile.TemporaryDirectory(prefix="vs-scaling-") as tmp:
        source = Path(tmp) / "videos"
        source.mkdir()
        write_clips(source, args.videos)
        baseline = None
        print(f"{args.videos} clips of 4 s 320x180, bundled model, nodes of 1 CPU, {os.cpu_count()} cores")
        for workers in args.workers:
            with LocalCluster(env) as cluster:
                cluster.start({f"worker-{i}": (1, {}) for i in range(workers)})
                seconds, summary = embed(cluster, source, Path(tmp) / f"library-{workers}")
            rate = args.videos / seconds
            baseline = baseline or rate
            placement = "; ".join(
                f"{stage} on {len(nodes)} node(s)" for stage, nodes in summary["placement"].items()
            )
            speedup = rate / baseline
            print(f"{workers} worker(s): {seconds:.1f} s, {rate:.2f} videos/s, {speedup:.2f}x ({placement})")


if __name__ == "__main__":
    main()
