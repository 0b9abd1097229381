"""X-CLIP configuration: dataclasses that read and write the Hugging Face ``config.json`` layout.

Field names follow ``transformers.XCLIPConfig`` so that a published checkpoint's ``config.json`` loads here
unchanged and ours loads in ``transformers``. ``PRESETS`` holds the geometry of the published checkpoints.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any


def known_fields(cls: type, data: dict[str, Any]) -> dict[str, Any]:
    """The entries of ``data`` that are fields of the dataclass ``cls`` (a config.json's other keys are
    ignored)."""
    names = {f.name for f in fields(cls)}
    return {k: v for k, v in data.items() if k in names}


@dataclass
class TextConfig:
    """The CLIP text transformer (causal, pooled at the end-of-text token)."""

    vocab_size: int = 49408
    hidden_size: int = 512
    intermediate_size: int = 2048
    num_hidden_layers: int = 12
    num_attention_heads: int = 8
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5


@dataclass
class VisionConfig:
    """The CLIP vision transformer with cross-frame communication, and the MIT on top of it."""

    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    mit_hidden_size: int = 512
    mit_intermediate_size: int = 2048
    mit_num_hidden_layers: int = 1
    mit_num_attention_heads: int = 8
    num_channels: int = 3
    image_size: int = 224
    patch_size: int = 32
    num_frames: int = 8
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    drop_path_rate: float = 0.0

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


@dataclass
class XCLIPConfig:
    """The whole model: both towers, the projections, the MIT and the video-specific prompt generator."""

    text_config: TextConfig = field(default_factory=TextConfig)
    vision_config: VisionConfig = field(default_factory=VisionConfig)
    projection_dim: int = 512
    prompt_layers: int = 2
    prompt_alpha: float = 0.1
    prompt_hidden_act: str = "quick_gelu"
    prompt_num_attention_heads: int = 8
    logit_scale_init_value: float = 2.6592

    def __post_init__(self) -> None:
        if isinstance(self.text_config, dict):
            self.text_config = TextConfig(**known_fields(TextConfig, self.text_config))
        if isinstance(self.vision_config, dict):
            self.vision_config = VisionConfig(**known_fields(VisionConfig, self.vision_config))
        self.validate()

    def validate(self) -> None:
        """Raise ``ValueError`` for a geometry the model cannot be built with."""
        text, vision = self.text_config, self.vision_config
        checks = [
            (text.hidden_size % text.num_attention_heads == 0, "text hidden_size % num_attention_heads"),
            (
                vision.hidden_size % vision.num_attention_heads == 0,
                "vision hidden_size % num_attention_heads",
            ),
            (vision.mit_hidden_size % vision.mit_num_attention_heads == 0, "mit_hidden_size % heads"),
            (self.projection_dim % self.prompt_num_attention_heads == 0, "projection_dim % prompt heads"),
            (vision.image_size % vision.patch_size == 0, "image_size % patch_size"),
        ]
        for ok, what in checks:
            if not ok:
                raise ValueError(f"invalid X-CLIP config: {what} must be 0")
        if vision.mit_hidden_size != self.projection_dim:
            raise ValueError(
                "invalid X-CLIP config: the MIT runs on projected frame embeddings, so mit_hidden_size "
                f"({vision.mit_hidden_size}) must equal projection_dim ({self.projection_dim})"
            )

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> XCLIPConfig:
        """Build from a Hugging Face ``config.json`` dict (unknown keys are ignored).

        Older published configs carry ``text_config_dict`` / ``vision_config_dict``; those win, as in
        ``transformers``.
        """
        data = dict(data)
        for tower in ("text_config", "vision_config"):
            legacy = data.pop(f"{tower}_dict", None)
            if legacy:
                data[tower] = {**(data.get(tower) or {}), **legacy}
            data[tower] = data.get(tower) or {}
        return cls(**known_fields(cls, data))

    def to_dict(self) -> dict[str, Any]:
        """The Hugging Face ``config.json`` layout (loadable by ``transformers.XCLIPConfig``)."""
        data = asdict(self)
        data["text_config"]["model_type"] = "xclip_text_model"
        data["vision_config"]["model_type"] = "xclip_vision_model"
        return {"architectures": ["XCLIPModel"], "model_type": "xclip", **data}

    @classmethod
    def from_json_file(cls, path: str | os.PathLike) -> XCLIPConfig:
        with open(path, encoding="utf-8") as f:
            return cls.from_dict(json.load(f))

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"


def _preset(
    patch: int,
    frames: int,
    large: bool = False,
) -> XCLIPConfig:
    if not large:
        return XCLIPConfig(vision_config=VisionConfig(patch_size=patch, num_frames=frames))
    return XCLIPConfig(
        text_config=TextConfig(hidden_size=768, intermediate_size=3072, num_attention_heads=12),
        vision_config=VisionConfig(
            hidden_size=1024,
            intermediate_size=4096,
            num_hidden_layers=24,
            num_attention_heads=16,
            patch_size=patch,
            num_frames=frames,
            mit_hidden_size=768,
            mit_intermediate_size=3072,
            mit_num_attention_heads=12,
        ),
        projection_dim=768,
        prompt_num_attention_heads=12,
    )


#: Geometry of the published checkpoints, by their Hugging Face names (without ``microsoft/``).
#: A checkpoint's own ``config.json`` always wins; presets serve original-release ``.pth`` files.
PRESETS: dict[str, XCLIPConfig] = {
    "xclip-base-patch32": _preset(32, 8),
    "xclip-base-patch32-16-frames": _preset(32, 16),
    "xclip-base-patch16": _preset(16, 8),
    "xclip-base-patch16-16-frames": _preset(16, 16),
    "xclip-base-patch16-kinetics-600": _preset(16, 8),
    "xclip-base-patch16-kinetics-600-16-frames": _preset(16, 16),
    "xclip-base-patch16-zero-shot": _preset(16, 32),
    "xclip-large-patch14": _preset(14, 8, large=True),
    "xclip-large-patch14-16-frames": _preset(14, 16, large=True),
    "xclip-large-patch14-kinetics-600": _preset(14, 8, large=True),
    **{
        f"xclip-base-patch16-{data}-{shots}-shot": _preset(16, 32)
        for data in ("hmdb", "ucf")
        for shots in (2, 4, 8, 16)
    },
}


def preset(name: str) -> XCLIPConfig:
    """A copy of the named preset; ``microsoft/`` prefixes are accepted."""
    key = name.removeprefix("microsoft/")
    if key not in PRESETS:
        raise KeyError(f"unknown X-CLIP preset {name!r}; known: {', '.join(sorted(PRESETS))}")
    config = PRESETS[key]
    return replace(
        config,
        text_config=replace(config.text_config),
        vision_config=replace(config.vision_config),
    )
