"""A small train run in the job's own process against the same run on Ray Train, start-up included.

Usage: python bench/train_executors.py [--clips 6] [--seconds 1] [--epochs 2] [--batch-size 3] [--rounds 2]
                                       [--executors in-process,ray] [--workdir DIR]

``--clips`` captioned synthetic clips (``pipeline.samples.synthetic``, ``--seconds`` each at 8 fps) are
written once; each run trains ``videosearch-tiny`` from scratch on them as a user runs ``videosearch train``:
a fresh ``python -m pipeline.cli train TABLE OUT --config videosearch-tiny --executor E --json`` with
``RAY_ADDRESS=local`` (Ray started and stopped by the run, as on a laptop), the executors in alternating
rounds. Printed per executor: the command's wall seconds and the job's own (from reading the table to the
last checkpoint: the interpreter's and torch's imports excluded), best and median, with the steps and last
epoch's loss of its last run (the executors shuffle differently: the losses are for the eye); then the
ratio of Ray Train's median wall time to the in-process one's.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline.samples.synthetic import sample_scenes, write_dataset  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def run_once(table: Path, output: Path, executor: str, args: argparse.Namespace) -> tuple[float, dict]:
    """One ``videosearch train`` in a fresh interpreter: its wall seconds and its JSON summary."""
    command = [sys.executable, "-m", "pipeline.cli", "train", str(table), str(output)]
    command += ["--config", "videosearch-tiny", "--epochs", str(args.epochs), "--lr", "1e-3"]
    command += ["--batch-size", str(args.batch_size), "--executor", executor, "--json"]
    started = time.perf_counter()
    done = subprocess.run(
        command, capture_output=True, text=True, cwd=ROOT, env={**os.environ, "RAY_ADDRESS": "local"}
    )
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
    return seconds, json.loads(done.stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clips", type=int, default=6)
    parser.add_argument("--seconds", type=float, default=1.0)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--executors", default="in-process,ray", help="comma-separated, timed in this order")
    parser.add_argument("--workdir", help="where the clips and runs go (default: a temporary directory)")
    args = parser.parse_args()
    executors = args.executors.split(",")

    with tempfile.TemporaryDirectory(prefix="videosearch-bench-train-") as tmp:
        work = Path(args.workdir or tmp)
        table = write_dataset(work / "clips", sample_scenes(args.clips, seed=4), seconds=args.seconds, fps=8)
        print(
            f"{args.clips} clips of {args.seconds:g} s, {args.epochs} epochs of batches of {args.batch_size}"
        )
        walls: dict[str, list[float]] = {e: [] for e in executors}
        jobs: dict[str, list[float]] = {e: [] for e in executors}
        last: dict[str, dict] = {}
        for round_ in range(args.rounds):
            for executor in executors:
                wall, summary = run_once(table, work / f"run-{executor}-{round_}", executor, args)
                walls[executor].append(wall)
                jobs[executor].append(summary["seconds"])
                last[executor] = summary
        for executor in executors:
            wall, epoch = walls[executor], last[executor]["epochs"][-1]
            print(
                f"{executor:>10}: wall {min(wall):.1f} s best, {statistics.median(wall):.1f} median; "
                f"the job's own {min(jobs[executor]):.1f} s best; {epoch['steps']} steps, "
                f"last loss {epoch['loss']:.4f} (executor {last[executor]['executor']})"
            )
        if {"ray", "in-process"} <= set(executors):
            ratio = statistics.median(walls["ray"]) / statistics.median(walls["in-process"])
            print(f"ray / in-process (median wall): {ratio:.1f}x")


if __name__ == "__main__":
    main()
