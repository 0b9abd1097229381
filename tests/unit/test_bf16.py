"""bfloat16 on CPUs: the CPU's bfloat16 instructions read from /proc/cpuinfo, and training's warning where
``--precision bf16`` is asked of a CPU without them (the encoder's: ``test_encode_write.py``)."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline import bf16
from pipeline.bf16 import cpu_bf16_instructions
from pipeline.models import load_model
from pipeline.train.config import TrainConfig
from pipeline.train.trainer import Trainer

CPUINFO = {  # /proc/cpuinfo's lines that name a CPU's features, on x86 and on Arm
    "Zen 4": "processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512_bf16 avx512_vnni\n",
    "Sapphire Rapids": "flags\t\t: fpu avx2 avx512f avx512_bf16 amx_bf16 amx_tile\n",
    "Cascade Lake": "flags\t\t: fpu sse2 avx2 avx512f avx512bw avx512_vnni\n",
    "Graviton 3": "processor\t: 0\nFeatures\t: fp asimd sve bf16 i8mm\n",
    "Graviton 2": "Features\t: fp asimd crc32 atomics\n",
}


def test_a_cpus_bfloat16_instructions_are_read_from_cpuinfo():
    found = {cpu: cpu_bf16_instructions(text) for cpu, text in CPUINFO.items()}
    assert found == {
        "Zen 4": ["avx512_bf16"],
        "Sapphire Rapids": ["avx512_bf16", "amx_bf16"],
        "Cascade Lake": [],
        "Graviton 3": ["bf16"],
        "Graviton 2": [],
    }
    assert cpu_bf16_instructions("processor\t: 0\n") is None  # says nothing: no warning either way


@pytest.mark.parametrize(("instructions", "warned"), [([], True), (["avx512_bf16"], False), (None, False)])
def test_training_in_bf16_on_a_cpu_without_bfloat16_instructions_is_warned_of(
    tiny_model: Path, monkeypatch, caplog, instructions, warned
):
    monkeypatch.setattr(bf16, "cpu_bf16_instructions", lambda: instructions)
    model = load_model(tiny_model)
    with caplog.at_level("WARNING", logger=bf16.__name__):
        Trainer(model, config=TrainConfig(precision="bf16"))
        Trainer(model, config=TrainConfig(precision="auto"))  # float32 on a CPU
    assert ("training runs at" in caplog.text) == warned
    assert len(caplog.records) == warned
