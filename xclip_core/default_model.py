"""The model used when none is named: small enough for a laptop CPU, and never downloaded.

``videosearch-tiny``, trained from scratch by this project on synthetic clips of coloured shapes
(``pipeline/samples/bundled_model.py``, ``make default-model``), ships as package data in
``data/default-model``.
"""

from __future__ import annotations

from pathlib import Path

from .config import TextConfig, VisionConfig, XCLIPConfig, preset

BUNDLED = Path(__file__).resolve().parent / "data" / "default-model"
TINY = "videosearch-tiny"  # the name of the bundled model's geometry


def tiny_config() -> XCLIPConfig:
    """The bundled model's geometry: 96 px, patch 16, 8 frames, 4 vision and 3 text layers 128 wide
    (8.8 M parameters, 6.3 M of them the token embeddings): about 0.02 s per video on a laptop CPU."""
    return XCLIPConfig(
        text_config=TextConfig(
            hidden_size=128, intermediate_size=512, num_hidden_layers=3, num_attention_heads=2
        ),
        vision_config=VisionConfig(
            hidden_size=128,
            intermediate_size=512,
            num_hidden_layers=4,
            num_attention_heads=2,
            image_size=96,
            patch_size=16,
            num_frames=8,
            mit_hidden_size=128,
            mit_intermediate_size=512,
            mit_num_attention_heads=2,
        ),
        projection_dim=128,
        prompt_num_attention_heads=2,
    )


def named_config(name: str) -> XCLIPConfig:
    """The geometry called ``name``: ``videosearch-tiny`` (the bundled model's) or a published checkpoint's
    preset (``KeyError`` naming the known presets otherwise)."""
    return tiny_config() if name == TINY else preset(name)


def default_model_dir() -> str:
    """Directory of the bundled model (Hugging Face layout, with tokenizer and preprocessor files)."""
    if not (BUNDLED / "model.safetensors").exists():
        raise FileNotFoundError(
            f"the bundled default model is missing from {BUNDLED}: rebuild it with `make default-model`, "
            "or pass --model with an X-CLIP checkpoint"
        )
    return str(BUNDLED)
