"""The in-process executor: when a job runs its stages without Ray, and that it writes what Ray would."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import write_video

from pipeline.embed import in_process
from pipeline.embed.in_process import InFlightMarker, ahead, runs_in_process
from pipeline.embed.job import embed
from pipeline.embed.options import IN_PROCESS_MAX_BYTES, IN_PROCESS_MAX_OBJECTS, EmbedOptions
from pipeline.library import Library


def listed(count: int, size: int = 1000) -> list[dict]:
    return [{"uri": f"/videos/{i}.mp4", "size": size, "etag": None, "mtime": 0.0} for i in range(count)]


def dead_pid() -> int:
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True)
    return int(done.stdout)


@pytest.fixture
def library(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(in_process.tempfile, "gettempdir", lambda: str(tmp_path / "tmp"))
    return str(tmp_path / "library")


def test_auto_runs_a_small_change_in_process_when_there_is_no_cluster_to_join(
    library: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    auto = EmbedOptions()
    assert runs_in_process(listed(3), auto, library)
    assert runs_in_process(listed(IN_PROCESS_MAX_OBJECTS), EmbedOptions(address="local"), library)
    assert not runs_in_process(listed(IN_PROCESS_MAX_OBJECTS + 1), auto, library)
    assert not runs_in_process(listed(2, size=IN_PROCESS_MAX_BYTES), auto, library)
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

    # the process died while decoding it
    marker.path.write_text(json.dumps({"uri": "/videos/bad.mp4", "tries": 1, "pid": dead_pid()}))
    assert marker.left_behind() == "/videos/bad.mp4"
    assert not runs_in_process(listed(3), EmbedOptions(), library)
    assert runs_in_process(listed(3), EmbedOptions(), library + "-other")  # another library's marker
    # forced in-process, the video's crashed tries are counted, as the decoder's crash ledger wants
    assert marker.begin("/videos/bad.mp4") == 1
    marker.end("/videos/bad.mp4")
    assert marker.left_behind() is None


def test_in_process_jobs_write_parts_of_part_rows_holding_every_video_once(
    library: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    videos = tmp_path / "videos"
    videos.mkdir()
    for i in range(5):
        write_video(videos / f"{i}.mp4", 12, 48, 40, fps=6, seed=i)
    (videos / "broken.mp4").write_bytes(b"not a video")
    monkeypatch.setattr(in_process, "PART_ROWS", 2)  # parts of 2 rows: 6 objects make 3 parts
    summary = embed(str(videos), library, EmbedOptions())
    assert (summary.executor, summary.ok, summary.failed) == ("in-process", 5, 1)
    assert summary.placement == {"decode": {"this process": 1}, "encode": {"this process": 1}}
    current = Library.open(library)
    assert [part["rows"] for part in current.manifest["parts"]] == [2, 2, 2]
    rows = current.table(["uri", "error"]).to_pylist()
    assert sorted(row["uri"] for row in rows) == sorted(str(p) for p in videos.iterdir())
    assert [row["uri"] for row in rows if row["error"]] == [str(videos / "broken.mp4")]
    assert not InFlightMarker(library).path.exists()


def test_decoding_ahead_keeps_the_order_raises_in_place_and_stops_with_its_consumer() -> None:
    produced: list[int] = []

    def items(fail_at: int | None = None):
        for i in range(100):
            if i == fail_at:
                raise OSError(f"broken at {i}")
            produced.append(i)
            yield i

    assert list(ahead(items(), 2)) == list(range(100))
    got = []
    with pytest.raises(OSError, match="broken at 5"):
        for i in ahead(items(fail_at=5), 2):
            got.append(i)
    assert got == [0, 1, 2, 3, 4]  # everything before the failure, in order, then the failure itself

    produced.clear()
    for i in ahead(items(), 2):
        if i == 3:
            break
    assert len(produced) <= 3 + 1 + 2 + 1  # the items consumed, the slots, the one being put: then it stops
