"""The benchmarks run (tiny inputs; their figures are not checked, only that they are produced and that the
encoder benchmark's two implementations agree). Figures come from full runs: see bench/RESULTS.md."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def bench(script: str, *args: str) -> str:
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / script), *args],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    return done.stdout


def test_encoder_benchmark_compares_identical_outputs() -> None:
    out = bench("encoder.py", "--preset", "videosearch-tiny", "--batch", "1", "--rounds", "1")
    assert re.search(r"ratio ours / reference \(best\): \d+\.\d+x", out)
    assert float(re.search(r"max abs difference of video embeddings: (\S+)", out)[1]) < 1e-4
    assert re.search(r"ours\s+\S+ GFLOP per video", out) and "roofline:" in out


def test_model_load_benchmark_reports_both_ratios(tmp_path: Path) -> None:
    out = bench("model_load.py", "--preset", "videosearch-tiny", "--rounds", "1", "--workdir", str(tmp_path))
    assert re.search(r"plain / ours \(best\): \d+\.\d+x", out), out
    assert re.search(r"ours / hash alone \(best; 1.0 is the floor\): \d+\.\d+", out), out


def test_pipeline_benchmark_reports_ratios_and_cpu(tmp_path: Path) -> None:
    model = str(ROOT / "xclip_core" / "data" / "default-model")
    out = bench(
        "pipeline.py", "--videos", "3", "--seconds", "1", "--width", "64", "--height", "48",
        "--model", model, "--workdir", str(tmp_path),
    )  # fmt: skip
    for line in (
        "full Ray pipeline",
        "plain loop",
        "pipeline / plain loop",
        "CPU time during the pipeline",
        "one-video job in this process",
        "whole job in this process / plain loop",
    ):
        assert line in out, out
    floor = re.search(r"start-up floor \(a trivial job of the same shape, one row\): (\S+) s", out)
    assert floor and float(floor[1]) > 0, out


def test_pipeline_benchmark_runs_without_ray_where_ray_is_missing(tmp_path: Path) -> None:
    """As on the lent GPU machine, whose image has no Ray: the job in its own process, the stages and the
    plain loop on a sample of the videos."""
    blocker = tmp_path / "no-ray"
    blocker.mkdir()
    (blocker / "sitecustomize.py").write_text(
        "import importlib.abc, sys\n"
        "class NoRay(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path, target=None):\n"
        "        if name.split('.')[0] == 'ray':\n"
        "            raise ModuleNotFoundError(f'No module named {name!r}', name=name)\n"
        "sys.meta_path.insert(0, NoRay())\n"
    )
    model = str(ROOT / "xclip_core" / "data" / "default-model")
    args = ["--videos", "5", "--distinct", "2", "--stage-videos", "2", "--no-ray", "--seconds", "1"]
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "pipeline.py"), *args, "--width", "64", "--height", "48",
         "--model", model, "--workdir", str(tmp_path / "work")],
        capture_output=True, text=True, timeout=600, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(blocker)},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-4000:]
    out = done.stdout
    assert "Ray" not in out.replace("Ray Data", "")  # no Ray pipeline, no figure that needs one
    assert re.search(r"decode stage alone .* 2 in ", out) and re.search(r"plain loop .* 2 in ", out), out
    assert re.search(r"whole job in this process .* 5 in ", out), out
    for line in ("whole job in this process / plain loop", "one-video job in this process"):
        assert line in out, out


def test_refresh_benchmark_reports_its_ratios(tmp_path: Path) -> None:
    out = bench(
        "refresh.py", "--videos", "12", "--change", "0.1", "--long-minutes", "0.5", "1",
        "--workdir", str(tmp_path),
    )  # fmt: skip
    assert re.search(r"ratio refresh / full embed: \d+\.\d+", out), out
    assert re.search(r"ratio bytes written / library size: \d+\.\d+", out), out
    assert "'new': 1, 'changed': 1, 'moved': 0, 'copied': 0, 'deleted': 1" in out, out
    assert "'new': 0, 'changed': 0, 'moved': 12, 'copied': 0, 'deleted': 0" in out, (
        out
    )  # every clip into a folder
    assert re.search(r"ratio reorganized refresh / full embed: \d+\.\d+", out), out
    assert re.search(r"ratio peak RSS 1 min / 0.5 min: \d+\.\d+ in batches", out), out


def test_train_efficiency_benchmark_reports_both_ratios() -> None:
    out = bench("train_efficiency.py", "--geometry", "tiny", "--steps", "1")
    assert re.search(r"ratio EVL / X-CLIP steps/s: \d+\.\d+x", out), out
    assert re.search(r"ratio EVL / X-CLIP step peak RSS: \d+\.\d+", out), out
    assert "backbone forward (no grad)" in out, out


def test_train_executors_benchmark_times_a_run_in_process(tmp_path: Path) -> None:
    """(The Ray Train run, ~1 minute, is left to full runs: the same command with another --executor.)"""
    out = bench(
        "train_executors.py", "--clips", "4", "--epochs", "1", "--batch-size", "2", "--rounds", "1",
        "--executors", "in-process", "--workdir", str(tmp_path),
    )  # fmt: skip
    assert re.search(r"in-process: wall \d+\.\d s best.*2 steps.*\(executor in-process\)", out), out


# three captioned clips of 2 s 64x48 for bench/decode.py and bench/precision.py
TINY_CLIPS = [
    "--videos", "3", "--seconds", "2", "--width", "64", "--height", "48", "--fps", "10", "--gop", "5",
]  # fmt: skip


def test_decode_benchmark_compares_decord_exact_and_fast(tmp_path: Path) -> None:
    out = bench("decode.py", *TINY_CLIPS, "--workdir", str(tmp_path))
    for mode in ("exact", "fast"):
        assert re.search(rf"{mode}\s+\S+ ms CPU per video\s+efficiency / decord\s+\S+x", out), out
    assert re.search(r"mean Spearman correlation of the rankings -?\d\.\d+", out), out


def test_precision_benchmark_reports_both_rates_and_what_bf16_changes(tmp_path: Path) -> None:
    out = bench("precision.py", *TINY_CLIPS, "--rounds", "1", "--workdir", str(tmp_path))
    for precision in ("fp32", "bf16"):
        assert re.search(rf"{precision}\s+best\s+\S+ videos/s", out), out
    assert re.search(r"ratio bf16 / fp32: best \d+\.\d+x", out), out
    assert re.search(r"mean Spearman correlation of the rankings -?\d\.\d+; recall@1 fp32", out), out


def test_follow_benchmark_makes_the_index_without_reading_its_file() -> None:
    out = bench("follow.py", "--parts", "8", "--change", "0.05", "--latency-ms", "1")
    requests = dict(re.findall(r"(read|made)\s+\S+ s\s+(\d+) requests", out))
    assert int(requests["made"]) == 2 < int(requests["read"]), out  # the new part only: footer, chunks
    assert re.search(r"read / made: \d+\.\dx", out), out


def test_large_reads_benchmark_reads_a_checkpoint_three_ways() -> None:
    out = bench("large_reads.py", "--mb", "40", "--stream-mbps", "400", "--latency-ms", "1")
    assert len(re.findall(r"(?:one stream|ahead|whole file)\s+\d+\.\d+ s\s+\d+\.\d MB/s", out)) == 3, out
    assert re.search(r"one stream / ahead: \d+\.\d+", out), out


def test_remote_reads_benchmark_counts_two_requests_a_part() -> None:
    out = bench("remote_reads.py", "--parts", "3", "--latency-ms", "1")
    requests = dict(re.findall(r"(\w+(?: part)?)\s+\S+ s\s+(\S+) requests a part", out))
    assert requests["together"] == requests["per part"] == "2.0" and requests["unsized"] == "3.0", out
    assert float(requests["chunked"]) > 3, out
    assert re.search(r"chunked / together: \d+\.\d+", out), out
    # again: _current, the manifest and the CRC-checked local copies of the index and parts
    assert re.search(
        r"first \d+\.\d+ s \(\d+ requests\), again \d+\.\d+ s \(2 requests, local copies\)", out
    ), out
