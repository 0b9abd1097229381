"""Decoding in worker processes (the in-process executor's decoders for large jobs): what they decode, what a
worker's death costs, and that they never run the caller's script again."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import DecoderKiller, nvdec_available, pattern_frames, write_frames, write_video

from pipeline.embed.decoder_processes import DecoderProcesses, DecodeTimedOut
from pipeline.embed.stages.decode import DecodeSettings, DecodeVideos
from xclip_core.video_transforms import VideoPreprocessor

PRE = VideoPreprocessor(size=32, crop_size=32)
SETTINGS = DecodeSettings(4, PRE)
MAX_TRIES = 3


def listed(paths: list[Path]) -> dict[str, np.ndarray]:
    return {
        "uri": np.array([str(p) for p in paths], dtype=object),
        "size": np.array([p.stat().st_size for p in paths], dtype=np.int64),
        "etag": np.array([None] * len(paths), dtype=object),
        "mtime": np.array([0.0] * len(paths), dtype=np.float64),
    }


@pytest.fixture(scope="module")
def clips(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Six short videos and a file that is not one."""
    d = tmp_path_factory.mktemp("clips")
    paths = [Path(write_video(d / f"{i}.mp4", 12, 48, 40, fps=6, seed=i)) for i in range(6)]
    (d / "broken.mp4").write_bytes(b"not a video")
    return [*paths[:3], d / "broken.mp4", *paths[3:]]


def test_worker_processes_decode_what_the_stage_decodes_in_order(clips: list[Path]) -> None:
    batches = [listed(clips[i : i + 2]) for i in range(0, len(clips), 2)]
    with DecoderProcesses(SETTINGS, None, processes=2) as workers:
        decoded = list(workers.decoded(iter(batches), depth=1))
    here = DecodeVideos(SETTINGS)
    assert len(decoded) == len(batches)
    for batch, out in zip(batches, decoded, strict=True):
        (got,), expected = out, here.decode(batch)
        assert list(got["uri"]) == list(batch["uri"])
        assert list(got["error"]) == list(expected["error"])  # the broken file's error row as well
        np.testing.assert_array_equal(got["frames"], expected["frames"])
        assert list(got["thumbnail"]) == list(expected["thumbnail"])


def test_a_job_that_stops_early_stops_its_workers_mid_batch(clips: list[Path], tmp_path: Path) -> None:
    """Ctrl-C or an error in the job: the batches in flight are not decoded to their end (a long video's
    could take minutes), and no worker is restarted."""
    slow = Path(write_frames(tmp_path / "slow.mp4", pattern_frames(300, 160, 120, "noise", 5), 6, gop=300))
    copies = [slow] + [Path(shutil.copy(slow, tmp_path / f"slow-{i}.mp4")) for i in range(7)]
    with DecoderProcesses(SETTINGS, None, processes=1) as workers:
        decoded = workers.decoded(iter([listed(clips[:1]), listed(copies)]), depth=1)
        next(decoded)  # the first batch; the slow one is in flight
        worker = workers._all[0].process
        decoded.close()
        assert worker.poll() == -signal.SIGKILL  # stopped, not left to finish its batch
        assert workers._all[0].process is worker  # and not restarted


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="a named pipe is the hanging input")
def test_a_batch_past_the_time_limit_raises_and_its_worker_is_replaced(
    clips: list[Path], tmp_path: Path
) -> None:
    """A pool with a time limit (the service's, for uploads) kills a worker stuck on a video: here one that
    waits forever for a writer to open its named pipe; a new worker decodes the next batch."""
    os.mkfifo(stuck := tmp_path / "stuck.mp4")
    hanging = listed([clips[0]]) | {"uri": np.array([str(stuck)], dtype=object)}
    with DecoderProcesses(SETTINGS, None, processes=1, time_limit_s=2.0) as workers:
        [fine] = workers.decode(listed(clips[:1]))  # started and warm: the limit counts the decode alone
        stuck_on = workers._all[0].process
        with pytest.raises(DecodeTimedOut, match="decoding took longer than 2 s"):
            workers.decode(hanging)
        assert stuck_on.poll() == -signal.SIGKILL
        [again] = workers.decode(listed(clips[:1]))
    assert workers._all[0].process is not stuck_on
    np.testing.assert_array_equal(again["frames"], fine["frames"])


def test_a_setting_a_worker_cannot_honour_is_raised_in_the_job() -> None:
    if nvdec_available():
        pytest.skip("this machine has NVDEC: the workers honour --decode-device cuda")
    cuda = DecodeSettings(4, PRE, device="cuda")
    with (
        DecoderProcesses(cuda, None, processes=1) as workers,
        pytest.raises(ValueError, match="--decode-device cuda: FFmpeg cannot open a CUDA device"),
    ):
        list(workers.decoded(iter([listed([])]), depth=0))


def test_a_worker_that_cannot_start_stops_the_job_and_fails_no_video(
    clips: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sys, "executable", shutil.which("false"))  # an interpreter that exits 1 at once
    with (
        DecoderProcesses(SETTINGS, None, processes=1) as workers,
        pytest.raises(RuntimeError, match=r"a decoder process failed to start \(exit code 1"),
    ):
        list(workers.decoded(iter([listed(clips[:1])]), depth=0))
    assert workers.crashes == {}


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="finds the decoders through /proc")
def test_a_video_that_kills_its_worker_becomes_an_error_row_and_costs_no_other_video(
    clips: list[Path], tmp_path: Path
) -> None:
    # with one keyframe: its worker keeps it open (~0.3 s) long enough to be seen and killed
    poison = Path(
        write_frames(tmp_path / "poison.mp4", pattern_frames(300, 160, 120, "noise", 22), 6, gop=300)
    )
    batch = listed([clips[0], poison, clips[1]])
    killer = DecoderKiller(poison, b"pipeline.embed.decode_worker")
    killer.start()
    try:
        with DecoderProcesses(SETTINGS, None, processes=2, max_tries=MAX_TRIES) as workers:
            redone, after = list(workers.decoded(iter([batch, listed(clips[2:3])]), depth=1))
            assert workers.crashes == {str(poison): MAX_TRIES}
    finally:
        killer.done.set()
        killer.join()
    # the batch's first try, then the poison alone until its count reached the limit
    assert len(killer.killed) == 1 + MAX_TRIES
    rows = {name: np.concatenate([part[name] for part in redone]) for name in redone[0]}
    assert list(rows["uri"]) == list(batch["uri"])
    assert list(rows["error"]) == [
        None,
        f"the decoder crashed on this video {MAX_TRIES} times; not retried",
        None,
    ]
    here = DecodeVideos(SETTINGS).decode(listed([clips[0], clips[1]]))
    np.testing.assert_array_equal(rows["frames"][[0, 2]], here["frames"])  # its neighbours, whole
    assert after[0]["error"][0] is None


def test_the_workers_never_run_the_callers_script_again(clips: list[Path], tmp_path: Path) -> None:
    """``multiprocessing`` would import the calling script in every worker: a script without
    ``if __name__ == "__main__":`` would then run its job again in each of them."""
    script = tmp_path / "script.py"
    runs = tmp_path / "runs.txt"
    script.write_text(
        "import numpy as np\n"
        "from pipeline.embed.decoder_processes import DecoderProcesses\n"
        "from pipeline.embed.stages.decode import DecodeSettings\n"
        "from xclip_core.video_transforms import VideoPreprocessor\n"
        f"with open({str(runs)!r}, 'a') as f:\n"
        "    f.write('ran\\n')\n"
        f"paths = {[str(p) for p in clips[:2]]!r}\n"
        "batch = {'uri': np.array(paths, dtype=object), 'size': np.array([1, 1]),\n"
        "         'etag': np.array([None, None], dtype=object), 'mtime': np.zeros(2)}\n"
        "with DecoderProcesses(DecodeSettings(4, VideoPreprocessor(size=32, crop_size=32)), None, 2) as w:\n"
        "    out = [b for bs in w.decoded(iter([batch, batch]), 1) for b in bs]\n"
        "print(sum(len(b['uri']) for b in out))\n"
    )
    env = os.environ | {"PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["4"]
    assert runs.read_text() == "ran\n"
