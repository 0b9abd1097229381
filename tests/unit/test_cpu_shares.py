"""A CPU-only cluster is shared between decoding and encoding by the measured cost of one video in each."""

from __future__ import annotations

import itertools

import pytest
import torch

from pipeline.embed.resources import (
    FALLBACK_DECODE_S,
    encode_cpu_s,
    share_cpus,
    time_decode,
    time_encode,
    torch_threads,
    warm_seconds,
)
from pipeline.embed.stages.decode import DecodeSettings
from pipeline.embed.stages.list import list_objects
from pipeline.samples.synthetic import sample_scenes, write_dataset
from pipeline.storage import StorageOptions
from xclip_core import XCLIPModel
from xclip_core.video_transforms import VideoPreprocessor


def test_a_cheap_encoder_leaves_the_cores_to_decoders_and_an_expensive_one_takes_them() -> None:
    tiny = share_cpus(2, decode_s=0.075, encode_s=0.025, reserved=0.1)  # the bundled model on 360p clips
    assert tiny.decoders == 2 and tiny.cpus_per_encoder == pytest.approx(0.5)
    base = share_cpus(2, decode_s=0.075, encode_s=2.0, reserved=0.1)  # base-patch32
    assert base.decoders == 1 and base.cpus_per_encoder == pytest.approx(1.8)
    assert share_cpus(16, 0.1, 0.1, encoders=2, decoders=3).decoders == 3  # what the user asked for


def test_an_encoders_share_of_cpus_runs_that_many_torch_threads_rounded_up() -> None:
    assert [torch_threads(cpus) for cpus in (0.3, 1.0, 1.8, 2.0)] == [1, 1, 2, 2]
    four = share_cpus(4.2, decode_s=0.1, encode_s=100.0, decoders=1, reserved=0.1).cpus_per_encoder
    assert four != 4.0 and four == pytest.approx(4.0)  # a float sum that should be whole: not 5 threads
    assert torch_threads(four) == 4


@pytest.mark.parametrize(
    ("cpus", "decode_s", "encode_s", "encoders"),
    list(itertools.product([1, 2, 8, 64], [0.001, 0.1, 5.0], [0.001, 0.1, 5.0], [1, 3])),
)
def test_shares_never_exceed_the_cluster_and_every_actor_gets_some(
    cpus, decode_s, encode_s, encoders
) -> None:
    shares = share_cpus(cpus, decode_s, encode_s, encoders, reserved=0.1)
    used = shares.decoders * shares.cpus_per_decoder + encoders * shares.cpus_per_encoder
    assert used <= max(cpus - 0.1, 0.5 * encoders + 0.1) + 1e-9
    assert shares.cpus_per_decoder > 0 and shares.cpus_per_encoder >= 0.5
    assert shares.decoders <= max(1, cpus)


def test_timings_come_from_a_real_video_and_the_model(tmp_path, tiny_model) -> None:
    write_dataset(tmp_path / "good", sample_scenes(1, seed=0), seconds=1.0, fps=8)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "x.mp4").write_bytes(b"not a video")
    preprocessor = VideoPreprocessor(size=32, crop_size=32)
    options = StorageOptions()
    bad = list_objects(str(tmp_path / "bad"), options)
    assert time_decode(bad, DecodeSettings(4, preprocessor), options) == FALLBACK_DECODE_S
    good = [row for row in list_objects(str(tmp_path / "good"), options) if row["uri"].endswith(".mp4")]
    assert 0 < time_decode(bad + good, DecodeSettings(4, preprocessor), options) < 10
    model = XCLIPModel.from_pretrained(tiny_model)
    assert 0 < time_encode(model) < 10 and 0 < encode_cpu_s(model) < 10


def test_a_timing_stops_inside_the_model_once_its_seconds_so_far_are_enough(tiny_model) -> None:
    model = XCLIPModel.from_pretrained(tiny_model)
    clip = torch.rand(1, model.num_frames, 3, *model.preprocessor.crop_size)
    with torch.inference_mode():
        expected = model.encode_videos(clip).video_embeds
    ran: list[torch.nn.Module] = []
    counting = [m.register_forward_pre_hook(lambda module, _: ran.append(module)) for m in model.modules()]
    encode_cpu_s(model, settled=lambda first: True)
    whole_run = len(ran)
    ran.clear()
    assert encode_cpu_s(model, settled=lambda first: True, enough=lambda so_far: True) < 0.5
    assert len(ran) == 1 < whole_run  # stopped before the first module's work
    ran.clear()
    encode_cpu_s(model, settled=lambda first: True, enough=lambda so_far: False)  # never enough: a whole run
    assert len(ran) == whole_run
    for hook in counting:
        hook.remove()
    assert not any(module._forward_pre_hooks for module in model.modules())  # the timing's hooks are gone
    with torch.inference_mode():
        torch.testing.assert_close(
            model.encode_videos(clip).video_embeds, expected
        )  # and the model is as it was


def test_a_first_run_that_settles_the_question_is_not_repeated() -> None:
    runs = []
    clock = iter(range(100)).__next__  # every reading one second after the last
    assert warm_seconds(lambda: runs.append(1), clock) == 1 and len(runs) == 2  # the second run's seconds
    assert warm_seconds(lambda: runs.append(1), clock, settled=lambda first: first > 5) == 1
    assert len(runs) == 4  # one second did not settle it: run again
    assert warm_seconds(lambda: runs.append(1), clock, settled=lambda first: first < 5) == 1
    assert len(runs) == 5  # settled by the first run
