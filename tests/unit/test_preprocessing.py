"""Frame sampling, video preprocessing and the processor, checked against X-CLIP's original sampling code and
against ``transformers.XCLIPProcessor`` (PIL backend) on real H.264 / MPEG-4 videos decoded with decord."""

from __future__ import annotations

import json

import fsspec
import numpy as np
import pytest
import torch
import transformers
from helpers import decode_frames, write_video
from transformers.models.videomae.image_processing_pil_videomae import VideoMAEImageProcessorPil

from xclip_core.processor import XCLIPProcessor
from xclip_core.sampling import segment_frame_indices, segments
from xclip_core.video_transforms import VideoPreprocessor, resize_center_crop

# Our resize is Pillow's uint8 bilinear resize, as the reference's, so pixel values can only differ by float
# rounding in rescale/normalize, which also follows transformers' dtypes step by step (measured: exactly 0).
# 1e-5 is far below one uint8 step after normalization (1 / 255 / 0.229 ~ 0.017).
ATOL = 1e-5
TEXTS = ["a person playing guitar", "Cooking   SPAGHETTI!", "", "word " * 100]


def original_test_frame_indices(total_frames: int, num_clips: int) -> list[int]:
    """X-CLIP's ``SampleFrames(clip_len=1, frame_interval=1, num_clips, test_mode=True)`` with start_index 0,
    transcribed from X-CLIP/datasets/pipeline.py (``_get_test_clips`` then the 'loop' out-of-bound option)."""
    clip_len, frame_interval = 1, 1
    ori_clip_len = clip_len * frame_interval
    avg_interval = (total_frames - ori_clip_len + 1) / float(num_clips)
    if total_frames > ori_clip_len - 1:
        base_offsets = np.arange(num_clips) * avg_interval
        clip_offsets = (base_offsets + avg_interval / 2.0).astype(int)
    else:
        clip_offsets = np.zeros((num_clips,), dtype=int)
    frame_inds = clip_offsets[:, None] + np.arange(clip_len)[None, :] * frame_interval
    frame_inds = np.mod(np.concatenate(frame_inds).reshape((-1, clip_len)), total_frames)
    return np.concatenate(frame_inds).tolist()


# ------------------------------------------------------------------------------------------------ sampling
@pytest.mark.parametrize("num_frames", [1, 2, 3, 7, 8, 16, 32])
def test_sampling_matches_original_formula(num_frames: int) -> None:
    for total in range(1, 400):
        assert segment_frame_indices(total, num_frames) == original_test_frame_indices(total, num_frames)


def test_sampling_short_video_repeats_frames() -> None:
    assert segment_frame_indices(3, 8) == [0, 0, 0, 1, 1, 2, 2, 2]
    assert segment_frame_indices(1, 4) == [0, 0, 0, 0]
    assert segment_frame_indices(100, 8) == [6, 18, 31, 43, 56, 68, 81, 93]


def test_sampling_within_a_frame_range() -> None:
    expected = [100 + i for i in original_test_frame_indices(150, 8)]
    assert segment_frame_indices(1000, 8, start=100, end=250) == expected
    assert segment_frame_indices(1000, 8, start=990) == [990 + i for i in original_test_frame_indices(10, 8)]
    # an end past the decoded frame count (e.g. from timestamps) is clipped to it
    assert segment_frame_indices(100, 8, 90, 200) == segment_frame_indices(100, 8, 90, 100)
    for bad in [dict(start=100), dict(start=5, end=5), dict(start=-1)]:
        with pytest.raises(ValueError, match="empty frame range"):
            segment_frame_indices(100, 8, **bad)
    with pytest.raises(ValueError, match="num_frames"):
        segment_frame_indices(100, 0)


def test_segments_cover_the_video() -> None:
    assert segments(10.0, 3.0) == [(0.0, 3.0), (3.0, 6.0), (6.0, 9.0), (9.0, 10.0)]
    assert segments(10.0, 2.5) == [(0.0, 2.5), (2.5, 5.0), (5.0, 7.5), (7.5, 10.0)]
    assert segments(2.0, 5.0) == [(0.0, 2.0)]
    assert len(segments(0.3, 0.1)) == 3 and len(segments(0.7, 0.1)) == 7  # float ratios just off an integer
    rng = np.random.default_rng(0)
    for duration, length in zip(rng.uniform(0.01, 500, 500), rng.uniform(0.01, 60, 500), strict=True):
        windows = segments(float(duration), float(length))
        assert windows[0][0] == 0.0 and windows[-1][1] == duration
        assert all(end > start for start, end in windows)
        assert all(a[1] == b[0] for a, b in zip(windows, windows[1:], strict=False))
        assert all(end - start <= length * (1 + 1e-9) for start, end in windows[:-1])
    with pytest.raises(ValueError):
        segments(0.0, 1.0)


# ---------------------------------------------------------------------------------- parity with transformers
def save_and_load_reference(processor: XCLIPProcessor, directory) -> transformers.XCLIPProcessor:
    """Save ours and load it with transformers: proves save_pretrained is HF-readable, gives the reference."""
    processor.save_pretrained(directory)
    reference = transformers.XCLIPProcessor.from_pretrained(directory, backend="pil")
    assert isinstance(reference.image_processor, VideoMAEImageProcessorPil)
    return reference


@pytest.fixture(scope="module")
def processors(tmp_path_factory) -> tuple[XCLIPProcessor, transformers.XCLIPProcessor]:
    ours = XCLIPProcessor.from_pretrained()
    return ours, save_and_load_reference(ours, tmp_path_factory.mktemp("processor"))


# (width, height, codec, pattern): landscape, portrait, odd sizes, upscaled, exact; H.264 and MPEG-4
VIDEOS = [
    (480, 270, "libx264", "shapes"),
    (270, 480, "libx264", "shapes"),
    (333, 199, "mpeg4", "shapes"),
    (199, 333, "libx264", "shapes"),
    (160, 120, "mpeg4", "shapes"),
    (224, 224, "libx264", "shapes"),
    (480, 270, "mpeg4", "noise"),
]


@pytest.mark.parametrize(("width", "height", "codec", "pattern"), VIDEOS)
def test_pixel_values_match_transformers(processors, tmp_path, width, height, codec, pattern) -> None:
    ours, reference = processors
    path = write_video(
        tmp_path / "clip.mp4", 12, width, height, codec=codec, pattern=pattern, seed=width + height
    )
    frames = decode_frames(path, segment_frame_indices(12, 8))
    assert frames.shape == (8, height, width, 3)
    expected = reference(videos=list(frames), return_tensors="pt")["pixel_values"]
    got = ours(videos=frames)["pixel_values"]
    assert got.shape == expected.shape == (1, 8, 3, 224, 224) and got.dtype == torch.float32
    assert (got - expected).abs().max().item() <= ATOL


@pytest.mark.parametrize(
    ("config", "frame_shapes"),
    [
        (dict(size=200, crop_size=(230, 180)), [(500, 210), (120, 160)]),  # vertical pass first; zero padding
        (dict(size=62, crop_size=62), [(386, 184), (184, 386)]),
        (dict(size=256), [(720, 1280), (6, 7)]),  # not (3, W): transformers would take it as channels-first
        (dict(do_resize=False, crop_size=(100, 120)), [(90, 160)]),
        (dict(do_center_crop=False, do_normalize=False), [(270, 480)]),
    ],
)
def test_configs_match_transformers(tmp_path, config, frame_shapes) -> None:
    ours = XCLIPProcessor(XCLIPProcessor.from_pretrained().tokenizer, VideoPreprocessor(**config))
    reference = save_and_load_reference(ours, tmp_path)
    rng = np.random.default_rng(0)
    for height, width in frame_shapes:
        frames = rng.integers(0, 256, (2, height, width, 3), dtype=np.uint8)
        expected = reference(videos=list(frames), return_tensors="pt")["pixel_values"]
        got = ours(videos=torch.from_numpy(frames))["pixel_values"]
        assert got.shape == expected.shape and got.dtype == expected.dtype == torch.float32
        assert (got - expected).abs().max().item() <= ATOL


def test_text_and_batch_match_transformers(processors) -> None:
    ours, reference = processors
    videos = [np.random.default_rng(i).integers(0, 256, (4, 90, 120, 3), dtype=np.uint8) for i in range(2)]
    expected = reference(
        text=TEXTS, videos=videos, return_tensors="pt", padding="max_length", truncation=True
    )
    got = ours(text=TEXTS, videos=videos)
    assert set(got) == {"input_ids", "attention_mask", "pixel_values"}
    assert torch.equal(got["input_ids"], expected["input_ids"])
    assert torch.equal(got["attention_mask"], expected["attention_mask"])
    assert got["pixel_values"].shape == (2, 4, 3, 224, 224)
    assert (got["pixel_values"] - expected["pixel_values"]).abs().max().item() <= ATOL


# ------------------------------------------------------------------------------------------ our own API
def test_decoder_step_then_normalize_is_the_call() -> None:
    preprocessor = VideoPreprocessor()
    frames = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (3, 270, 480, 3), dtype=np.uint8))
    small = preprocessor.resize_crop(frames)  # numpy, for the decoders, from a tensor or an array
    assert small.dtype == np.uint8 and small.shape == (3, 224, 224, 3)
    np.testing.assert_array_equal(small, resize_center_crop(frames.numpy(), 224, (224, 224)))
    pixel_values = preprocessor.normalize(small)
    assert pixel_values.dtype == torch.float32 and pixel_values.shape == (3, 3, 224, 224)
    assert torch.equal(preprocessor(frames)["pixel_values"][0], pixel_values)
    with pytest.raises(ValueError, match="uint8"):
        preprocessor(frames.float())
    with pytest.raises(ValueError, match="uint8"):
        preprocessor.resize_crop(frames.numpy()[0])


def test_processor_parts_and_round_trip(tmp_path) -> None:
    processor = XCLIPProcessor.from_pretrained()
    assert set(processor(text="a dog")) == {"input_ids", "attention_mask"}
    assert set(processor(videos=np.zeros((2, 32, 32, 3), np.uint8))) == {"pixel_values"}
    with pytest.raises(ValueError, match="text, videos"):
        processor()
    processor.save_pretrained(tmp_path)
    loaded = XCLIPProcessor.from_pretrained(tmp_path)
    assert loaded.video_preprocessor == processor.video_preprocessor
    assert torch.equal(loaded(text=TEXTS)["input_ids"], processor(text=TEXTS)["input_ids"])


# microsoft/xclip-base-patch32's preprocessor_config.json (legacy layout: int sizes, no crop_size, no rescale)
HUB_STYLE_CONFIG = {
    "do_center_crop": True,
    "do_normalize": True,
    "do_resize": True,
    "feature_extractor_type": "VideoMAEFeatureExtractor",
    "image_mean": [0.485, 0.456, 0.406],
    "image_std": [0.229, 0.224, 0.225],
    "processor_class": "XCLIPProcessor",
    "resample": 2,
    "size": 224,
}


def test_preprocessor_from_memory_url() -> None:
    fs = fsspec.filesystem("memory")
    fs.pipe("/xclip-prep/legacy/preprocessor_config.json", json.dumps(HUB_STYLE_CONFIG).encode())
    loaded = VideoPreprocessor.from_pretrained("memory://xclip-prep/legacy")
    assert loaded == VideoPreprocessor()

    config = {**HUB_STYLE_CONFIG, "size": {"shortest_edge": 256}, "crop_size": {"height": 224, "width": 200}}
    fs.pipe("/xclip-prep/v5/processor_config.json", json.dumps({"image_processor": config}).encode())
    loaded = VideoPreprocessor.from_pretrained("memory://xclip-prep/v5")
    assert (loaded.size, loaded.crop_size) == (256, (224, 200))

    loaded.save_pretrained("memory://xclip-prep/saved")
    assert VideoPreprocessor.from_pretrained("memory://xclip-prep/saved") == loaded
    with pytest.raises(FileNotFoundError):
        VideoPreprocessor.from_pretrained("memory://xclip-prep/missing")


def test_hub_config_matches_transformers(tmp_path) -> None:
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(HUB_STYLE_CONFIG))
    XCLIPProcessor.from_pretrained().tokenizer.save_pretrained(tmp_path)
    ours = XCLIPProcessor.from_pretrained(tmp_path)
    assert ours.video_preprocessor == VideoPreprocessor()
    reference = transformers.XCLIPProcessor.from_pretrained(tmp_path, backend="pil")
    frames = np.random.default_rng(0).integers(0, 256, (2, 300, 400, 3), dtype=np.uint8)
    expected = reference(videos=list(frames), return_tensors="pt")["pixel_values"]
    assert (ours(videos=frames)["pixel_values"] - expected).abs().max().item() <= ATOL


def test_unsupported_configs_are_rejected() -> None:
    with pytest.raises(ValueError, match=r"unsupported resample=3.*only 2 \(PIL bilinear\)"):
        VideoPreprocessor.from_dict({**HUB_STYLE_CONFIG, "resample": 3})
    with pytest.raises(ValueError, match="shortest_edge"):
        VideoPreprocessor.from_dict({**HUB_STYLE_CONFIG, "size": {"height": 224, "width": 224}})
