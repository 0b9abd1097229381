"""Where a train run goes (``--executor``): Ray Train, or one worker in the job's own process."""

from __future__ import annotations

import pytest

from pipeline.embed.stages.decode import DecodeSettings
from pipeline.train.in_process import runs_in_process
from pipeline.train.options import IN_PROCESS_MAX_CLIP_BYTES, TrainOptions
from xclip_core.video_transforms import VideoPreprocessor

SETTINGS = DecodeSettings(8, VideoPreprocessor(size=224, crop_size=224))  # 8 x 224 x 224 x 3 bytes a clip
FIT = IN_PROCESS_MAX_CLIP_BYTES // (8 * 224 * 224 * 3)  # clips that fit the in-process limit


def options(**changes: object) -> TrainOptions:
    return TrainOptions(output="/tmp/run", model="some/checkpoint", **changes)  # type: ignore[arg-type]


@pytest.fixture(autouse=True)
def no_ray_address(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RAY_ADDRESS", raising=False)


def test_auto_trains_one_local_worker_of_clips_that_fit_in_process() -> None:
    assert runs_in_process(options(), FIT, SETTINGS)
    assert runs_in_process(options(address="local"), 10, SETTINGS)
    assert not runs_in_process(options(), FIT + 1, SETTINGS)  # the clips are held in memory
    assert not runs_in_process(options(workers=2), 10, SETTINGS)
    assert not runs_in_process(options(address="ray://head:10001"), 10, SETTINGS)


def test_auto_joins_the_cluster_that_ray_address_names(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")  # as inside a job submitted to a cluster
    assert not runs_in_process(options(), 10, SETTINGS)
    monkeypatch.setenv("RAY_ADDRESS", "local")
    assert runs_in_process(options(), 10, SETTINGS)


def test_an_executor_asked_for_is_used() -> None:
    assert runs_in_process(options(executor="in-process"), 10 * FIT, SETTINGS)
    assert not runs_in_process(options(executor="ray"), 10, SETTINGS)


def test_impossible_executors_are_refused_up_front() -> None:
    with pytest.raises(ValueError, match="in-process runs one worker: 2 workers need Ray"):
        options(executor="in-process", workers=2)
    with pytest.raises(ValueError, match="--executor must be one of auto, ray, in-process, got 'spark'"):
        options(executor="spark")
