"""The in-process executor: when a job runs its stages without Ray, and that it writes what Ray would."""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import pytest
import ray
import torch
from helpers import cli_env, compiled_graphs_from_here, pattern_frames, videosearch, write_frames, write_video

from pipeline.embed import in_flight, in_process, on_ray
from pipeline.embed.in_flight import InFlightMarker
from pipeline.embed.in_process import TIMED_FROM, encoder_threads, runs_in_process
from pipeline.embed.job import embed, refresh
from pipeline.embed.options import (
    IN_PROCESS_MAX_BYTES,
    IN_PROCESS_MAX_CPUS,
    IN_PROCESS_MAX_OBJECTS,
    EmbedOptions,
)
from pipeline.embed.parallel import in_parallel
from pipeline.embed.resources import encode_cpu_s, encoder_lanes
from pipeline.embed.stages.decode import DecodeSettings
from pipeline.embed.stages.encode import EncodeFrames
from pipeline.library import Library
from pipeline.models import load_model


def listed(count: int, size: int = 1000) -> list[dict]:
    return [{"uri": f"/videos/{i}.mp4", "size": size, "etag": None, "mtime": 0.0} for i in range(count)]


def videos_and_a_broken_file(tmp_path: Path, count: int) -> Path:
    """A directory of ``count`` short videos and ``broken.mp4``, which is not one."""
    videos = tmp_path / "videos"
    videos.mkdir()
    for i in range(count):
        write_video(videos / f"{i}.mp4", 12, 48, 40, fps=6, seed=i)
    (videos / "broken.mp4").write_bytes(b"not a video")
    return videos


def dead_pid() -> int:
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True)
    return int(done.stdout)


@pytest.fixture
def library(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(in_flight.tempfile, "gettempdir", lambda: str(tmp_path / "tmp"))
    return str(tmp_path / "library")


def test_auto_runs_a_small_change_in_process_when_there_is_no_cluster_to_join(
    library: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    auto = EmbedOptions()
    assert runs_in_process(listed(3), auto, library)
    assert runs_in_process(listed(IN_PROCESS_MAX_OBJECTS), EmbedOptions(address="local"), library)
    monkeypatch.setattr(in_process, "usable_cpus", lambda: IN_PROCESS_MAX_CPUS + 1)  # a larger machine
    assert not runs_in_process(listed(IN_PROCESS_MAX_OBJECTS + 1), auto, library)
    assert not runs_in_process(listed(2, size=IN_PROCESS_MAX_BYTES), auto, library)
    monkeypatch.setattr(in_process, "usable_cpus", lambda: IN_PROCESS_MAX_CPUS)  # a small one: any job
    assert runs_in_process(listed(IN_PROCESS_MAX_OBJECTS * 10, size=IN_PROCESS_MAX_BYTES), auto, library)
    assert not runs_in_process(listed(3), EmbedOptions(address="ray://head:10001"), library)
    assert not runs_in_process(listed(3), EmbedOptions(decoders=2), library)
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")
    assert not runs_in_process(listed(3), auto, library)
    # an explicit choice wins
    assert runs_in_process(listed(100), EmbedOptions(executor="in-process"), library)
    monkeypatch.setenv("RAY_ADDRESS", "local")
    assert not runs_in_process(listed(1), EmbedOptions(executor="ray"), library)
    with pytest.raises(ValueError, match="--executor must be one of auto, ray, in-process"):
        EmbedOptions(executor="threads")


def test_a_video_that_killed_an_in_process_job_sends_the_next_job_to_ray(library: str) -> None:
    marker = InFlightMarker(library)
    assert marker.begin("/videos/bad.mp4") == 0  # this process decodes it: not left behind
    assert marker.left_behind() is None and runs_in_process(listed(3), EmbedOptions(), library)

    # videos decode side by side: each is in flight until it ends
    assert marker.begin("/videos/other.mp4") == 0
    marker.end("/videos/bad.mp4")
    assert json.loads(marker.path.read_text())["videos"] == {"/videos/other.mp4": 1}
    marker.end("/videos/other.mp4")
    assert not marker.path.exists()

    # the process died while decoding two videos
    videos = {"/videos/bad.mp4": 1, "/videos/beside.mp4": 2}
    marker.path.write_text(json.dumps({"pid": dead_pid(), "videos": videos}))
    assert marker.left_behind() == "/videos/bad.mp4"
    assert not runs_in_process(listed(3), EmbedOptions(), library)
    assert runs_in_process(listed(3), EmbedOptions(), library + "-other")  # another library's marker
    # forced in-process, each video's crashed tries are counted, as the decoder's crash ledger wants
    again = InFlightMarker(library)
    assert again.begin("/videos/bad.mp4") == 1 and again.begin("/videos/beside.mp4") == 2
    assert again.begin("/videos/new.mp4") == 0
    for uri in ("/videos/bad.mp4", "/videos/beside.mp4", "/videos/new.mp4"):
        again.end(uri)
    assert again.left_behind() is None and not again.path.exists()


def test_ctrl_c_stops_an_in_process_job_with_a_word_and_leaves_no_crash_marker(
    tiny_model: Path, tmp_path: Path
) -> None:
    """Ctrl-C is not a crash: the next job of the library runs in-process again and goes on from the parts
    already written."""
    videos = tmp_path / "videos"
    videos.mkdir()
    # slow to decode (one keyframe, ~0.3 s each): the job is still decoding when Ctrl-C comes
    slow = write_frames(videos / "0.mp4", pattern_frames(300, 160, 120, "noise", 5), 6, gop=300)
    for i in range(1, 8):
        shutil.copy(slow, videos / f"{i}.mp4")
    library = tmp_path / "library"
    env = cli_env() | {"TMPDIR": str(tmp_path / "tmp")}
    (tmp_path / "tmp").mkdir()
    job = subprocess.Popen(
        videosearch("embed", videos, library, "--model", tiny_model),
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own process group, which a terminal's Ctrl-C signals
    )
    markers = tmp_path / "tmp" / "videosearch"
    deadline = time.monotonic() + 60
    while not (markers.is_dir() and any(markers.iterdir())) and time.monotonic() < deadline:
        time.sleep(0.005)
    os.killpg(job.pid, signal.SIGINT)
    _, stderr = job.communicate(timeout=60)
    assert job.returncode == 130, stderr[-2000:]
    assert "Traceback" not in stderr
    assert stderr.strip().splitlines()[-1].startswith("videosearch embed: interrupted; nothing was published")
    assert not any(markers.iterdir())  # not taken for a crash: the next job needs no Ray
    rerun = subprocess.run(
        videosearch("embed", videos, library, "--model", tiny_model, "--json"),
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    summary = json.loads(rerun.stdout)
    assert (summary["executor"], summary["ok"]) == ("in-process", 8)


def test_in_process_jobs_write_parts_of_part_rows_holding_every_video_once(
    library: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    videos = videos_and_a_broken_file(tmp_path, 5)
    monkeypatch.setattr(in_process, "PART_ROWS", 2)  # parts of 2 rows: 6 objects make 3 parts
    monkeypatch.setattr(in_process, "usable_cpus", lambda: 3)
    threads: list[int] = []

    def recorded(calls, count, depth, ctrl_c):  # the real pool, its thread count noted
        threads.append(count)
        return in_parallel(calls, count, depth, ctrl_c)

    monkeypatch.setattr(in_process, "in_parallel", recorded)
    summary = embed(str(videos), library, EmbedOptions())
    assert threads == [3]  # a decoding thread per CPU
    assert (summary.executor, summary.ok, summary.failed) == ("in-process", 5, 1)
    assert summary.placement == {"decode": {"this process": 1}, "encode": {"this process": 1}}
    current = Library.open(library)
    assert [part["rows"] for part in current.manifest["parts"]] == [2, 2, 2]
    rows = current.table(["uri", "error"]).to_pylist()
    assert sorted(row["uri"] for row in rows) == sorted(str(p) for p in videos.iterdir())
    assert [row["uri"] for row in rows if row["error"]] == [str(videos / "broken.mp4")]
    assert not InFlightMarker(library).path.exists()


def test_a_job_larger_than_a_small_change_decodes_in_worker_processes_and_stores_what_threads_store(
    library: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    videos = videos_and_a_broken_file(tmp_path, 4)
    monkeypatch.setattr(in_process, "usable_cpus", lambda: 2)
    small = embed(str(videos), library, EmbedOptions())
    assert small.placement["decode"] == {"this process": 1}  # threads: 5 objects are a small change
    monkeypatch.setattr(in_process, "IN_PROCESS_MAX_OBJECTS", 4)
    large = embed(str(videos), library + "-large", EmbedOptions())
    assert (large.executor, large.ok, large.failed) == ("in-process", 4, 1)
    assert large.placement["decode"] == {"decoder processes": 2}
    assert "ran on this machine without Ray (2 decoder processes)" in large.text()
    on_threads, in_processes = (
        Library.open(path).table(["uri", "error", "embedding", "thumbnail"]).sort_by("uri")
        for path in (library, library + "-large")
    )
    assert on_threads.to_pylist() == in_processes.to_pylist()


def test_decoding_in_parallel_keeps_the_order_raises_in_place_and_stops_with_its_consumer() -> None:
    started: list[int] = []
    together = threading.Barrier(2, timeout=10)

    def call(i: int, fail: bool = False, meet: bool = False):
        def run() -> int:
            started.append(i)
            if meet:
                together.wait()  # returns only when two calls run at once
            if fail:
                raise OSError(f"broken at {i}")
            return i

        return run

    assert list(in_parallel((call(i, meet=i < 2) for i in range(100)), 2, 2)) == list(range(100))
    got = []
    with pytest.raises(OSError, match="broken at 5"):
        for i in in_parallel((call(i, fail=i == 5) for i in range(100)), 2, 2):
            got.append(i)
    assert got == [0, 1, 2, 3, 4]  # everything before the failure, in order, then the failure itself

    started.clear()
    for i in in_parallel((call(i) for i in range(100)), 2, 2):
        if i == 3:
            break
    assert len(started) <= 4 + 2 + 2  # the calls consumed and the window (threads + depth): then it stops


def test_large_jobs_share_the_cpus_between_decoding_threads_and_the_encoder_by_measured_costs(
    tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    video = tmp_path / "clip.mp4"
    write_video(video, 24, 64, 48, fps=8, seed=1)
    model = load_model(str(tiny_model))
    settings = DecodeSettings(model.num_frames, model.preprocessor)
    options = EmbedOptions(model=str(tiny_model))
    few = [{"uri": str(video), "size": video.stat().st_size, "etag": None, "mtime": 0.0}] * (TIMED_FROM - 1)
    monkeypatch.setattr(in_process, "usable_cpus", lambda: 4)
    timed = functools.partial(encode_cpu_s, model)
    assert encoder_threads(few, settings, options, timed, on_gpu=False) is None  # not worth timing
    many = few * 2
    assert encoder_threads(many, settings, options, timed, on_gpu=True) is None  # the encoder is a GPU
    assert 1 <= encoder_threads(many, settings, options, timed, on_gpu=False) <= 4  # measured
    monkeypatch.setattr(in_process, "time_decode", lambda *args: 0.07)
    settled, stopped_at = [], []

    def clip_costs(first: float, warm: float) -> Callable[[Callable, Callable], float]:
        """A clip's timing whose first run costs ``first`` CPU-s and a warm one ``warm``, stopped (as
        :func:`encode_cpu_s` stops it) at the first tenth of a millisecond that is ``enough``."""

        def timed(settles: Callable[[float], bool], enough: Callable[[float], bool]) -> float:
            so_far = next((t / 1e4 for t in range(round(first * 1e4)) if enough(t / 1e4)), first)
            stopped_at.append(so_far)
            settled.append(settles(so_far))
            return so_far if settled[-1] else warm

        return timed

    # decode-bound (a tiny model): torch gets one thread, a thread per CPU decodes; the first run settles it
    assert encoder_threads(many, settings, options, clip_costs(0.02, 0.014), on_gpu=False) == 1
    assert stopped_at[-1] == 0.02  # never enough to stop early
    # encode-bound (base-patch32): the encoder gets every core, by the first run, stopped early: decoding
    # costs 0.07 CPU-s, so from 0.21 CPU-s of warm encoding on the encoder gets 4 threads of 4 CPUs, and a
    # first run may cost up to COLD_OVER_WARM times a warm one
    assert encoder_threads(many, settings, options, clip_costs(1.2, 1.0), on_gpu=False) == 4
    assert settled == [True, True] and 0.42 <= stopped_at[-1] < 0.43
    # near a boundary the first run may be mostly one-time cost: the warm run decides (2 threads, not 3)
    assert encoder_threads(many, settings, options, clip_costs(0.08, 0.04), on_gpu=False) == 2
    assert settled[-1] is False and stopped_at[-1] == 0.08


def test_an_encoder_of_several_threads_encodes_batches_side_by_side_and_writes_the_same_library(
    tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    videos = tmp_path / "videos"
    videos.mkdir()
    for i in range(9):
        write_video(videos / f"{i}.mp4", 12, 48, 40, fps=6, seed=i)
    threads_of_calls: list[str] = []
    encode = EncodeFrames._encode

    together = threading.Barrier(3, timeout=30)  # passed only by three sub-batches encoding at once

    def noting_the_thread(self: EncodeFrames, videos: np.ndarray) -> tuple:
        threads_of_calls.append(threading.current_thread().name)
        if self.lanes > 1 and len(threads_of_calls) <= 3:
            together.wait()  # the first call's three sub-batches
        return encode(self, videos)

    monkeypatch.setattr(EncodeFrames, "_encode", noting_the_thread)
    libraries, callers = {}, torch.get_num_threads()
    for lanes in (1, 3):  # the encoder's CPU share, as the job measures it for a large job
        monkeypatch.setattr(in_process, "encoder_threads", lambda *args, lanes=lanes: lanes)
        threads_of_calls.clear()
        libraries[lanes] = str(tmp_path / f"library-{lanes}")
        options = EmbedOptions(model=str(tiny_model), batch_size=2, executor="in-process")
        assert embed(str(videos), libraries[lanes], options).ok == 9
        assert len(threads_of_calls) == 5  # 9 videos in sub-batches of 2 (a call takes one per lane)
        on_lanes = {name for name in threads_of_calls if name.startswith("videosearch-encode")}
        assert len(on_lanes) == (0 if lanes == 1 else 3), threads_of_calls
        assert torch.get_num_threads() == callers  # the caller's again, whatever the lanes were given
    one, three = (Library.open(libraries[n]) for n in (1, 3))
    assert [p.rows for p in one.snapshot.parts] == [p.rows for p in three.snapshot.parts]
    rows = [lib.table(["id", "uri", "embedding"]) for lib in (one, three)]
    assert rows[0]["uri"].to_pylist() == rows[1]["uri"].to_pylist()  # the same order: ids follow it
    assert rows[0]["id"].to_pylist() == rows[1]["id"].to_pylist()
    np.testing.assert_allclose(
        np.stack(rows[1]["embedding"].to_numpy(zero_copy_only=False)),
        np.stack(rows[0]["embedding"].to_numpy(zero_copy_only=False)),
        atol=1e-6,
    )
    # at most 4 lanes (each holds a batch's activations), dividing the encoder's threads between them
    shares = [None, 1, 2, 3, 4, 6, 8, 16, 7]
    assert [encoder_lanes(threads, compiled=False) for threads in shares] == [1, 1, 2, 3, 4, 3, 4, 4, 1]
    assert encoder_lanes(8, compiled=True) == 1  # one compiled graph, one batch at a time


def test_ray_encoders_of_several_threads_encode_in_lanes_and_write_what_one_lane_writes(
    tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    videos = videos_and_a_broken_file(tmp_path, 7)
    options = EmbedOptions(model=str(tiny_model), batch_size=2, gpus_per_encoder=0)
    one = embed(str(videos), str(tmp_path / "one-lane"), dataclasses.replace(options, executor="in-process"))
    # the tiny model's share of the CPUs is under one; a model whose encoding dominates gets the cores
    monkeypatch.setattr(on_ray, "torch_threads", lambda cpus: 2)
    caplog.set_level(logging.INFO, logger="pipeline.embed.on_ray")
    try:
        lanes = embed(str(videos), str(tmp_path / "lanes"), dataclasses.replace(options, executor="ray"))
    finally:
        ray.shutdown()  # the module's later jobs find no Ray to join
    plan = next(r for r in caplog.records if r.getMessage().startswith("plan:"))
    assert (plan.encoder_threads, plan.encoder_lanes) == (2, 2)  # two lanes of one torch thread each
    assert "2 lane(s) of 2 video(s)" in plan.getMessage()
    assert (one.executor, lanes.executor) == ("in-process", "ray")
    assert (lanes.ok, lanes.failed) == (one.ok, one.failed) == (7, 1)
    rows = [
        Library.open(str(tmp_path / name)).table(["uri", "error", "embedding"]).sort_by("uri")
        for name in ("one-lane", "lanes")
    ]
    assert rows[0]["uri"].to_pylist() == rows[1]["uri"].to_pylist()
    assert rows[0]["error"].to_pylist() == rows[1]["error"].to_pylist()
    ok = pc.is_null(rows[0]["error"])
    np.testing.assert_allclose(
        *(np.stack(r.filter(ok)["embedding"].to_numpy(zero_copy_only=False)) for r in rows), atol=1e-6
    )


def test_a_job_with_compile_on_encodes_through_one_compiled_graph_and_stores_the_eager_embeddings(
    tiny_model: Path, tmp_path: Path
) -> None:
    videos = tmp_path / "videos"
    videos.mkdir()
    for i in range(3):
        write_video(videos / f"{i}.mp4", 12, 48, 40, fps=6, seed=i)
    stats = compiled_graphs_from_here()
    libraries = {}
    for mode in ("off", "on"):
        libraries[mode] = str(tmp_path / f"library-{mode}")
        options = EmbedOptions(model=str(tiny_model), compile=mode, batch_size=2, executor="in-process")
        summary = embed(str(videos), libraries[mode], options)
        assert summary.ok == 3 and summary.compiled == (mode == "on")
        assert ("ran compiled (torch.compile)" in summary.text()) == (mode == "on")
    assert stats["unique_graphs"] == 1  # "on" only; its 2 + 1 padded to 2
    eager, compiled = (
        Library.open(libraries[m]).table(["uri", "embedding"]).sort_by("uri") for m in libraries
    )
    assert eager["uri"].to_pylist() == compiled["uri"].to_pylist()
    np.testing.assert_allclose(
        np.stack(compiled["embedding"].to_numpy(zero_copy_only=False)),
        np.stack(eager["embedding"].to_numpy(zero_copy_only=False)),
        atol=1e-5,
    )


def test_a_job_in_bf16_stores_bfloat16_embeddings_and_a_refresh_may_mix_precisions(
    tiny_model: Path, tmp_path: Path, library: str
) -> None:
    videos = tmp_path / "videos"
    videos.mkdir()
    for i in range(3):
        write_video(videos / f"{i}.mp4", 12, 48, 40, fps=6, seed=i)
    embeddings = {}
    for precision in ("fp32", "bf16"):
        options = EmbedOptions(model=str(tiny_model), precision=precision, executor="in-process")
        assert embed(str(videos), f"{library}-{precision}", options).ok == 3
        table = Library.open(f"{library}-{precision}").table(["uri", "embedding"]).sort_by("uri")
        embeddings[precision] = np.stack(table["embedding"].to_numpy(zero_copy_only=False))
    cosine = (embeddings["fp32"] * embeddings["bf16"]).sum(axis=1)
    assert cosine.min() > 0.999 and np.abs(embeddings["fp32"] - embeddings["bf16"]).max() > 1e-4

    # the rows of either precision mix: a refresh in float32 adds to the bfloat16 library
    write_video(videos / "3.mp4", 12, 48, 40, fps=6, seed=3)
    options = EmbedOptions(model=str(tiny_model), precision="fp32", executor="in-process")
    summary = refresh(str(videos), f"{library}-bf16", options)
    assert summary.changes["new"] == 1 and summary.ok == 4

    # a job large enough to share the CPUs times a clip in the encoder's dtype
    model = load_model(str(tiny_model)).to(dtype=torch.bfloat16)
    assert encode_cpu_s(model) > 0
