"""When an embed job compiles its encoder: --compile on/off as asked; auto only for a long CPU share."""

from __future__ import annotations

import pytest

from pipeline.embed.compiling import COMPILE_AFTER_S, COMPILE_FROM_VIDEOS, compiles
from pipeline.embed.options import EmbedOptions


def never_timed() -> float:
    raise AssertionError("the encoder was timed where the rule needs no timing")


@pytest.mark.parametrize("on_gpu", [False, True])
def test_on_and_off_are_obeyed_without_timing(on_gpu):
    assert compiles("on", on_gpu, 1, never_timed)
    assert not compiles("off", on_gpu, 10**6, never_timed)


def test_auto_compiles_a_cpu_encoder_with_a_long_share_of_the_job():
    videos = 2 * COMPILE_FROM_VIDEOS
    assert compiles("auto", False, videos, lambda: COMPILE_AFTER_S / videos)
    assert not compiles("auto", False, videos, lambda: 0.9 * COMPILE_AFTER_S / videos)


def test_auto_leaves_short_shares_and_gpu_encoders_eager_without_timing():
    assert not compiles("auto", False, COMPILE_FROM_VIDEOS - 1, never_timed)
    assert not compiles("auto", True, 10**6, never_timed)


def test_an_unknown_mode_is_refused_before_any_work():
    with pytest.raises(ValueError, match="--compile must be one of auto, on, off, got 'always'"):
        EmbedOptions(compile="always")
