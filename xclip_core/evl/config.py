"""EVL configuration: the frozen CLIP image encoder, the temporal decoder on top of it, and the classifier.

The fields mirror the original code's arguments (github.com/OpenGVLab/efficient-video-recognition,
``EVLTransformer`` and ``vit_presets``) under Hugging Face-style names, so that one ``config.json`` says all
the tensors cannot: head counts, dropout rates, which temporal modules exist. ``PRESETS`` holds the published
Kinetics-400 geometries, named like the release's checkpoint files.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from ..config import TextConfig, known_fields
from ..transformer import ACTIVATIONS


@dataclass
class EVLVisionConfig:
    """The CLIP ViT image encoder, run per frame and frozen (``ln_pre`` and no ``ln_post``, as in EVL)."""

    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    num_channels: int = 3
    image_size: int = 224
    patch_size: int = 16
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5

    @property
    def grid_size(self) -> int:
        """Patches per side of a frame."""
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid_size**2


@dataclass
class EVLDecoderConfig:
    """The decoder: one learned query attends, layer by layer, to the tokens of the backbone's last
    ``num_layers`` layers, each enhanced by the temporal modules that are switched on.

    Its width is the backbone's (``hidden_size`` of :class:`EVLVisionConfig`); ``attention_dim`` is the
    width of the attention's q/k/v projections (the original's ``decoder_qkv_dim``).
    """

    num_layers: int = 4
    attention_dim: int = 768
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    mlp_dropout: float = 0.5
    temporal_conv: bool = True
    temporal_position_embedding: bool = True
    temporal_cross_attention: bool = True
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5


@dataclass
class EVLConfig:
    """The whole model: backbone, decoder, frames per video, and what the decoder's feature feeds.

    A classifier has ``num_classes`` (class names in ``labels`` where known). The text-aligned variant, for
    search, has ``text_config`` and ``projection_dim``: a frozen CLIP text tower, and the decoder's feature
    projected into its embedding space (trained contrastively). A model may have both."""

    vision_config: EVLVisionConfig = field(default_factory=EVLVisionConfig)
    decoder_config: EVLDecoderConfig = field(default_factory=EVLDecoderConfig)
    num_frames: int = 8
    num_classes: int = 400
    classifier_dropout: float = 0.5
    labels: list[str] | None = None  # the class names, by class index
    text_config: TextConfig | None = None
    projection_dim: int | None = None
    logit_scale_init_value: float = 2.6592  # log(1 / 0.07), CLIP's

    def __post_init__(self) -> None:
        if isinstance(self.vision_config, dict):
            self.vision_config = EVLVisionConfig(**known_fields(EVLVisionConfig, self.vision_config))
        if isinstance(self.decoder_config, dict):
            self.decoder_config = EVLDecoderConfig(**known_fields(EVLDecoderConfig, self.decoder_config))
        if isinstance(self.text_config, dict):
            self.text_config = TextConfig(**known_fields(TextConfig, self.text_config))
        self.validate()

    @property
    def text_aligned(self) -> bool:
        """Whether the model embeds videos in a CLIP text space (and so can be searched by text)."""
        return self.text_config is not None

    def validate(self) -> None:
        """Raise ``ValueError`` for a geometry the model cannot be built with."""
        vision, decoder = self.vision_config, self.decoder_config
        positive = {
            "vision hidden_size": vision.hidden_size,
            "vision intermediate_size": vision.intermediate_size,
            "vision num_hidden_layers": vision.num_hidden_layers,
            "vision num_attention_heads": vision.num_attention_heads,
            "num_channels": vision.num_channels,
            "patch_size": vision.patch_size,
            "decoder num_layers": decoder.num_layers,
            "decoder attention_dim": decoder.attention_dim,
            "decoder num_attention_heads": decoder.num_attention_heads,
            "decoder intermediate_size": decoder.intermediate_size,
            "num_frames": self.num_frames,
        }
        if self.text_aligned:
            positive["projection_dim"] = self.projection_dim
        for what, value in positive.items():
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"invalid EVL config: {what} must be a positive integer, got {value!r}")
        if not isinstance(self.num_classes, int) or self.num_classes < 0:
            raise ValueError(f"invalid EVL config: num_classes must be 0 or more, got {self.num_classes!r}")
        if not self.num_classes and not self.text_aligned:
            raise ValueError(
                "invalid EVL config: the model needs a classifier (num_classes) or a text tower (text_config "
                "and projection_dim), or both"
            )
        if self.labels is not None and len(self.labels) != self.num_classes:
            raise ValueError(f"invalid EVL config: {len(self.labels)} labels for {self.num_classes} classes")
        checks = [
            (
                vision.hidden_size % vision.num_attention_heads == 0,
                f"vision hidden_size ({vision.hidden_size}) must be divisible by its "
                f"num_attention_heads ({vision.num_attention_heads})",
            ),
            (
                decoder.attention_dim % decoder.num_attention_heads == 0,
                f"decoder attention_dim ({decoder.attention_dim}) must be divisible by its "
                f"num_attention_heads ({decoder.num_attention_heads})",
            ),
            (
                vision.image_size >= vision.patch_size and vision.image_size % vision.patch_size == 0,
                f"image_size ({vision.image_size}) must be a multiple of patch_size ({vision.patch_size})",
            ),
            (
                decoder.num_layers <= vision.num_hidden_layers,
                f"the decoder reads the backbone's last {decoder.num_layers} layers, but the backbone has "
                f"{vision.num_hidden_layers}",
            ),
        ]
        for rate, what in (
            (decoder.mlp_dropout, "decoder mlp_dropout"),
            (self.classifier_dropout, "classifier_dropout"),
        ):
            checks.append((0.0 <= rate < 1.0, f"{what} must be in [0, 1), got {rate}"))
        for act, what in (
            (vision.hidden_act, "vision hidden_act"),
            (decoder.hidden_act, "decoder hidden_act"),
        ):
            checks.append((act in ACTIVATIONS, f"{what} {act!r} is not one of {', '.join(ACTIVATIONS)}"))
        for ok, message in checks:
            if not ok:
                raise ValueError(f"invalid EVL config: {message}")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EVLConfig:
        """Build from :meth:`to_dict`'s layout (unknown keys are ignored); refuses another model type."""
        model_type = data.get("model_type", "evl")
        if model_type != "evl":
            raise ValueError(f"not an EVL config: its model_type is {model_type!r}, not 'evl'")
        return cls(**known_fields(cls, data))

    def to_dict(self) -> dict[str, Any]:
        """The ``config.json`` layout: the fields, nested like the dataclasses, with ``model_type: "evl"``."""
        return {"architectures": ["EVLModel"], "model_type": "evl", **asdict(self)}

    @classmethod
    def from_json_file(cls, path: str | os.PathLike) -> EVLConfig:
        with open(path, encoding="utf-8") as f:
            return cls.from_dict(json.load(f))

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"


def _preset(large: bool, frames: int) -> EVLConfig:
    # ViT-B/16 with a 4 x 768 decoder, or ViT-L/14 with a 4 x 1024 decoder; 12 or 16 heads of 64 channels in
    # both (the release's scripts: --decoder_qkv_dim, --decoder_num_heads), MLP factor 4
    width, layers, patch = (1024, 24, 14) if large else (768, 12, 16)
    return EVLConfig(
        vision_config=EVLVisionConfig(
            hidden_size=width,
            intermediate_size=4 * width,
            num_hidden_layers=layers,
            num_attention_heads=width // 64,
            patch_size=patch,
        ),
        decoder_config=EVLDecoderConfig(
            attention_dim=width, num_attention_heads=width // 64, intermediate_size=4 * width
        ),
        num_frames=frames,
    )


#: Geometry of the published Kinetics-400 checkpoints, by their release file names (without ``.pth``).
PRESETS: dict[str, EVLConfig] = {
    f"k400_{name}_{frames}f_dec4x{width}": _preset(large, frames)
    for name, width, large in (("vitb16", 768, False), ("vitl14", 1024, True))
    for frames in (8, 16, 32)
}


def evl_preset(name: str) -> EVLConfig:
    """A copy of the named preset (``k400_vitb16_8f_dec4x768``...; a ``.pth`` suffix is accepted)."""
    key = name.removesuffix(".pth")
    if key not in PRESETS:
        raise KeyError(f"unknown EVL preset {name!r}; known: {', '.join(sorted(PRESETS))}")
    config = PRESETS[key]
    return replace(
        config, vision_config=replace(config.vision_config), decoder_config=replace(config.decoder_config)
    )
