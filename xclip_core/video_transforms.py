"""Frame preprocessing for X-CLIP, bit-exact with the Hugging Face ``XCLIPProcessor`` (PIL path), vectorised.

Layout: videos come in as uint8 ``(T, H, W, 3)`` RGB (what decord returns); :func:`resize_center_crop` keeps
that layout and dtype, :func:`normalize` turns it into float32 ``(T, 3, H, W)`` model input.

The reference resizes every frame with ``PIL.Image.resize(BILINEAR)``. Pillow's ``ImagingResample``
(``src/libImaging/Resample.c``) is separable: per axis it computes, in double precision, a triangle filter
whose support is widened by the scale factor when downscaling (antialiasing), normalises each output pixel's
weights by their sum and rounds them to fixed point with 22 fractional bits. It runs one pass, rounds to
uint8, then the other, each pixel being ``clip8((2**21 + sum(pixel * weight)) >> 22)``. The order matters for
the rounding: Pillow >= 13 runs the vertical pass first when the height loses more than twice as many pixels
as the width (python-pillow/Pillow#9549), horizontal first otherwise (Pillow < 13: always horizontal first).
Here each pass is one sparse matrix product over the whole clip viewed as a ``(T * H, W * 3)`` matrix: the
vertical operator ``kron(I_T, Wy)`` multiplies it on the left, the horizontal one ``kron(Wx, I_3)^T`` on the
right. They run in float64 with the weights scaled by 2**-22: every product and partial sum is a multiple of
2**-22 below 2**9, so float64 is exact and the result equals Pillow's byte for byte. The centre crop is folded
into the operators: only the kept output pixels are computed, only the input rows and columns they read are
converted, and zero rows give the zero padding of a crop larger than the image.
"""

from __future__ import annotations

import functools
import json
import math
import os
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from .sources import ModelSource

# X-CLIP normalises with the ImageNet statistics, not CLIP's (0.48145466, ...): the original code's
# img_norm_cfg (mean 123.675, 116.28, 103.53 / std 58.395, 57.12, 57.375 on 0-255) and the
# preprocessor_config.json of every microsoft/xclip-* checkpoint.
XCLIP_MEAN = (0.485, 0.456, 0.406)
XCLIP_STD = (0.229, 0.224, 0.225)
PIL_BILINEAR = 2
CONFIG_NAME = "preprocessor_config.json"

_PRECISION_BITS = 32 - 8 - 2  # Pillow's fixed-point precision for 8-bit images
_CHUNK_VALUES = 1 << 24  # frames are resized in chunks of at most this many input values (128 MiB as float64)

VideoLike = torch.Tensor | np.ndarray


def resize_output_size(height: int, width: int, shortest_edge: int) -> tuple[int, int]:
    """(height, width) after resizing the shorter side to ``shortest_edge``, as ``transformers`` computes it
    (``get_resize_output_image_size(default_to_square=False)``: the long side is truncated, not rounded)."""
    short, long = (width, height) if width <= height else (height, width)
    new_long = int(shortest_edge * long / short)
    return (new_long, shortest_edge) if width <= height else (shortest_edge, new_long)


def _bilinear_filter(x: float) -> float:
    x = abs(x)
    return 1.0 - x if x < 1.0 else 0.0


@functools.lru_cache(maxsize=256)
def _pillow_bilinear_weights(in_size: int, out_size: int) -> np.ndarray:
    """Pillow's fixed-point bilinear weights (``precompute_coeffs`` + ``normalize_coeffs_8bpc``) as an
    ``(out_size, in_size)`` integer matrix, for a full-image box."""
    scale = in_size / out_size
    filterscale = max(scale, 1.0)
    support = 1.0 * filterscale  # bilinear support is 1, widened when downscaling
    inv_filterscale = 1.0 / filterscale
    weights = np.zeros((out_size, in_size), dtype=np.int64)
    for xx in range(out_size):
        center = (xx + 0.5) * scale
        xmin = max(int(center - support + 0.5), 0)
        xmax = min(int(center + support + 0.5), in_size)
        ks = [_bilinear_filter((x - center + 0.5) * inv_filterscale) for x in range(xmin, xmax)]
        total = 0.0
        for k in ks:  # left-to-right like the C loop (builtin sum() compensates on Python >= 3.12)
            total += k
        if total != 0.0:
            ks = [k / total for k in ks]
        weights[xx, xmin:xmax] = [int(k * (1 << _PRECISION_BITS) + math.copysign(0.5, k)) for k in ks]
    return weights


@functools.lru_cache(maxsize=256)
def _axis_weights(in_size: int, out_size: int, crop: int) -> tuple[np.ndarray, int, int]:
    """Weights resizing one axis ``in_size -> out_size`` and centre-cropping it to ``crop``.

    Returns the ``(crop, hi - lo)`` fixed-point weights scaled by ``2**-22`` (float64, exact: a power of
    two) and the band ``[lo, hi)`` of input indices they read. The crop starts at ``(out_size - crop) // 2``;
    a crop larger than the image places it at ``ceil((crop - out_size) / 2)`` between zero rows, as
    ``transformers.image_transforms.center_crop`` pads with zeros.
    """
    weights = _pillow_bilinear_weights(in_size, out_size)
    if crop <= out_size:
        top = (out_size - crop) // 2
        matrix = weights[top : top + crop]
    else:
        pad = (crop - out_size + 1) // 2
        matrix = np.zeros((crop, in_size), dtype=np.int64)
        matrix[pad : pad + out_size] = weights
    used = np.flatnonzero(matrix.any(axis=0))
    lo, hi = int(used[0]), int(used[-1]) + 1
    return matrix[:, lo:hi] / (1 << _PRECISION_BITS), lo, hi


def _sparse(rows: np.ndarray, cols: np.ndarray, values: np.ndarray, shape: tuple[int, int]) -> torch.Tensor:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch labels sparse CSR "beta"
        return torch.sparse_coo_tensor(np.stack([rows, cols]), values, shape).coalesce().to_sparse_csr()


@functools.lru_cache(maxsize=64)
def _resize_operators(
    frames: int, height: int, width: int, out_h: int, out_w: int, crop_h: int, crop_w: int
) -> tuple[torch.Tensor, slice, torch.Tensor, slice]:
    """Sparse operators on a clip viewed as a ``(frames * h, w * 3)`` matrix, where ``h`` and ``w`` count the
    input rows and columns actually read (returned as slices).

    ``rows`` = ``kron(I_frames, Wy)`` multiplies on the left and resizes every frame vertically; ``cols`` =
    ``kron(Wx, I_3)`` transposed multiplies on the right and resizes horizontally, channels interleaved.
    """
    wy, y0, y1 = _axis_weights(height, out_h, crop_h)
    wx, x0, x1 = _axis_weights(width, out_w, crop_w)
    r, c = np.nonzero(wy)
    t = np.arange(frames)[:, None]
    shape = (frames * crop_h, frames * (y1 - y0))
    rows = _sparse((r + t * crop_h).ravel(), (c + t * (y1 - y0)).ravel(), np.tile(wy[r, c], frames), shape)
    r, c = np.nonzero(wx)
    ch = np.arange(3)[:, None]
    shape = ((x1 - x0) * 3, crop_w * 3)
    cols = _sparse((c * 3 + ch).ravel(), (r * 3 + ch).ravel(), np.tile(wx[r, c], 3), shape)
    return rows, slice(y0, y1), cols, slice(x0, x1)


def as_video(frames: VideoLike) -> torch.Tensor:
    """Check and convert one video to a uint8 ``(T, H, W, 3)`` tensor (no copy for torch input)."""
    video = torch.as_tensor(frames)
    if video.dtype != torch.uint8 or video.ndim != 4 or video.shape[-1] != 3:
        raise ValueError(f"expected a uint8 (T, H, W, 3) video, got {video.dtype} {tuple(video.shape)}")
    return video


def resize_center_crop(
    frames: VideoLike, size: int | None = 224, crop_size: tuple[int, int] | None = (224, 224)
) -> torch.Tensor:
    """Resize the shorter side to ``size`` (Pillow bilinear, bit-exact) and centre-crop to ``crop_size``.

    ``frames`` is uint8 ``(T, H, W, 3)``; the result is uint8 ``(T, crop_h, crop_w, 3)``, small enough to pass
    between processes. ``size=None`` skips the resize and ``crop_size=None`` the crop.
    """
    video = as_video(frames)
    num_frames, height, width, _ = video.shape
    out_h, out_w = resize_output_size(height, width, size) if size else (height, width)
    crop_h, crop_w = crop_size or (out_h, out_w)
    chunk = max(1, _CHUNK_VALUES // (height * width * 3))
    if num_frames > chunk:  # bound the float64 copy of the input
        return torch.cat([resize_center_crop(part, size, crop_size) for part in video.split(chunk)])
    rows, ys, cols, xs = _resize_operators(num_frames, height, width, out_h, out_w, crop_h, crop_w)
    x = video[:, ys, xs].to(torch.float64).flatten(2).flatten(0, 1)  # (T * h, w * 3)
    # With weights scaled by 2**-22, floor(acc + 0.5) is Pillow's (acc + 2**21) >> 22. No clamp is needed:
    # the weights are >= 0 and each row sums to 1 (to within 2**-23 per weight), so results stay in [0, 255].
    if height > out_h and height - out_h > 2 * (width - out_w):  # Pillow's pass order (see module doc)
        x = (rows @ x).add_(0.5).floor_() @ cols
    else:
        x = rows @ (x @ cols).add_(0.5).floor_()
    return x.add_(0.5).to(torch.uint8).view(num_frames, crop_h, crop_w, 3)  # float -> uint8 truncates


def normalize(
    frames: VideoLike,
    mean: Sequence[float] | None = XCLIP_MEAN,
    std: Sequence[float] | None = XCLIP_STD,
    rescale_factor: float | None = 1 / 255,
) -> torch.Tensor:
    """uint8 ``(T, H, W, 3)`` -> float32 ``(T, 3, H, W)`` pixel values ``(x * rescale_factor - mean) / std``,
    on the device the frames are on.

    Rounding follows ``transformers`` exactly: rescale in float64 then cast to float32, normalise in float32.
    ``rescale_factor=None`` skips the rescale, ``mean=None`` (or ``std=None``) the normalisation.
    """
    x = as_video(frames).permute(0, 3, 1, 2)
    x = (x.to(torch.float64) * rescale_factor).to(torch.float32) if rescale_factor else x.to(torch.float32)
    if mean is not None and std is not None:
        mean_t, std_t = (
            torch.tensor(v, dtype=torch.float32, device=x.device).view(3, 1, 1) for v in (mean, std)
        )
        x = (x - mean_t) / std_t
    return x.contiguous()


def _parse_size(value: int | dict[str, int]) -> int:
    if isinstance(value, dict):
        if set(value) != {"shortest_edge"}:
            raise ValueError(f"unsupported resize size {value}: only {{'shortest_edge': n}} (or an int) is")
        value = value["shortest_edge"]
    return int(value)


def _parse_crop_size(value: int | Sequence[int] | dict[str, int]) -> tuple[int, int]:
    if isinstance(value, dict):
        return int(value["height"]), int(value["width"])
    if isinstance(value, int):
        return value, value
    height, width = value
    return int(height), int(width)


@dataclass
class VideoPreprocessor:
    """The X-CLIP video preprocessor: shortest-edge resize, centre crop, rescale and normalise.

    Reads and writes the ``preprocessor_config.json`` of a Hugging Face X-CLIP checkpoint (a
    ``VideoMAEImageProcessor`` config); only bilinear resampling (``resample=2``) is supported.
    """

    size: int = 224
    crop_size: int | tuple[int, int] = (224, 224)  # (height, width); an int means a square
    image_mean: tuple[float, ...] = XCLIP_MEAN
    image_std: tuple[float, ...] = XCLIP_STD
    rescale_factor: float = 1 / 255
    do_resize: bool = True
    do_center_crop: bool = True
    do_rescale: bool = True
    do_normalize: bool = True

    def __post_init__(self) -> None:
        self.crop_size = _parse_crop_size(self.crop_size)
        self.image_mean = tuple(self.image_mean)
        self.image_std = tuple(self.image_std)

    @classmethod
    def from_dict(cls, config: dict[str, Any]) -> VideoPreprocessor:
        """Build from a Hugging Face image-processor dict (unknown keys ignored, missing ones defaulted)."""
        resample = config.get("resample", PIL_BILINEAR)
        if resample != PIL_BILINEAR:
            raise ValueError(
                f"unsupported resample={resample!r}: only {PIL_BILINEAR} (PIL bilinear) is implemented "
                "(bit-exact with the reference)"
            )
        kwargs = {k: config[k] for k in ("image_mean", "image_std", "rescale_factor") if k in config}
        flags = [name for name in cls.__dataclass_fields__ if name.startswith("do_") and name in config]
        kwargs.update({name: bool(config[name]) for name in flags})
        if "size" in config:
            kwargs["size"] = _parse_size(config["size"])
        if "crop_size" in config:
            kwargs["crop_size"] = _parse_crop_size(config["crop_size"])
        return cls(**kwargs)

    @classmethod
    def from_pretrained(
        cls, src: str | os.PathLike, storage_options: dict[str, Any] | None = None
    ) -> VideoPreprocessor:
        """Load ``preprocessor_config.json`` from a directory or fsspec URL (or, failing that, the
        ``image_processor`` entry of the ``processor_config.json`` that transformers v5 writes)."""
        source = ModelSource(src, storage_options)
        name = source.first_existing(CONFIG_NAME, "processor_config.json")
        if name is None:
            raise FileNotFoundError(f"{source.uri}: no {CONFIG_NAME} or processor_config.json")
        config = source.read_json(name)
        return cls.from_dict(config["image_processor"] if name == "processor_config.json" else config)

    def to_dict(self) -> dict[str, Any]:
        """The Hugging Face ``VideoMAEImageProcessor`` config equivalent to this preprocessor."""
        config = asdict(self)
        config.update(
            image_processor_type="VideoMAEImageProcessor",
            processor_class="XCLIPProcessor",
            resample=PIL_BILINEAR,
            size={"shortest_edge": self.size},
            crop_size={"height": self.crop_size[0], "width": self.crop_size[1]},
            image_mean=list(self.image_mean),
            image_std=list(self.image_std),
        )
        return config

    def save_pretrained(
        self, directory: str | os.PathLike, storage_options: dict[str, Any] | None = None
    ) -> None:
        """Write ``preprocessor_config.json`` into ``directory`` (a local path or an fsspec URL)."""
        target = ModelSource(directory, storage_options)
        target.fs.makedirs(target.root, exist_ok=True)
        text = json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"
        target.fs.pipe_file(target.path(CONFIG_NAME), text.encode("utf-8"))

    def resize_crop(self, frames: VideoLike) -> torch.Tensor:
        """Decoder-side step: uint8 ``(T, H, W, 3)`` -> uint8 ``(T, crop_h, crop_w, 3)``."""
        return resize_center_crop(
            frames, self.size if self.do_resize else None, self.crop_size if self.do_center_crop else None
        )

    def normalize(self, frames: VideoLike) -> torch.Tensor:
        """Model-side step: uint8 ``(T, H, W, 3)`` -> float32 ``(T, 3, H, W)`` pixel values."""
        return normalize(
            frames,
            self.image_mean if self.do_normalize else None,
            self.image_std if self.do_normalize else None,
            self.rescale_factor if self.do_rescale else None,
        )

    def __call__(self, videos: VideoLike | Sequence[VideoLike]) -> dict[str, torch.Tensor]:
        """One video or a list of videos (uint8 ``(T, H, W, 3)``, same ``T``) ->
        ``{"pixel_values": float32 (B, T, 3, crop_h, crop_w)}``."""
        if isinstance(videos, (torch.Tensor, np.ndarray)) and videos.ndim == 4:
            videos = [videos]
        return {"pixel_values": torch.stack([self.normalize(self.resize_crop(video)) for video in videos])}
