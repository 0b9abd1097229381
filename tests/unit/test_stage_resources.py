"""How the embed plan shares a cluster between the decode and encode stages (plan.stage_resources)."""

from __future__ import annotations

import pytest

from pipeline.embed.options import EmbedOptions
from pipeline.embed.resources import GPU_ENCODER_CPUS, stage_resources

OPTIONS = EmbedOptions(model="unused")


def not_timed() -> tuple[float, float]:
    raise AssertionError("a GPU plan needs no CPU timings")


def test_a_gpu_encoder_leaves_every_other_cpu_to_decoders() -> None:
    stages = stage_resources(16, 1, objects=1000, options=OPTIONS, timings=not_timed)
    assert (stages.encoders, stages.gpus_per_encoder, stages.encoder_device) == (1, 1, "cuda")
    assert stages.cpus_per_encoder == GPU_ENCODER_CPUS and stages.cpus_per_decoder == 1
    assert stages.decoders == 14  # 16 CPUs - 1 for the encoder - 0.1 for the writer, whole decoders


def test_one_encoder_per_gpu_share() -> None:
    four = stage_resources(32, 4, objects=1000, options=OPTIONS, timings=not_timed)
    assert (four.encoders, four.decoders) == (4, 27)
    halves = EmbedOptions(model="unused", gpus_per_encoder=0.5)
    assert stage_resources(32, 4, objects=1000, options=halves, timings=not_timed).encoders == 8


def test_gpus_per_encoder_zero_plans_cpu_encoders_where_gpus_exist() -> None:
    timed = []

    def timings() -> tuple[float, float]:
        timed.append(True)
        return 0.1, 0.1

    options = EmbedOptions(model="unused", gpus_per_encoder=0)
    stages = stage_resources(8, 1, objects=1000, options=options, timings=timings)
    assert timed and stages.encoder_device == "cpu" and stages.gpus_per_encoder == 0
    assert stages.decoders * stages.cpus_per_decoder + stages.encoders * stages.cpus_per_encoder <= 8


@pytest.mark.parametrize("gpus", [0, 1])
def test_never_more_decoders_than_objects(gpus: int) -> None:
    stages = stage_resources(16, gpus, objects=3, options=OPTIONS, timings=lambda: (0.1, 0.01))
    assert stages.decoders == 3
    asked = EmbedOptions(model="unused", decoders=8)
    assert stage_resources(16, gpus, objects=5, options=asked, timings=lambda: (0.1, 0.01)).decoders == 5
    assert stage_resources(16, gpus, objects=50, options=asked, timings=lambda: (0.1, 0.01)).decoders == 8
