"""The model used when none is named: small enough for a laptop CPU, and never downloaded.

Until the trained default model ships as package data (``xclip_core/data/default-model``), the default is the
``videosearch-tiny`` geometry with seeded random weights, materialized once in a local cache directory.
Such a model runs the whole pipeline end to end, but its rankings carry no meaning: a warning says so.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch

from .config import TextConfig, VisionConfig, XCLIPConfig
from .model import XCLIPModel
from .processor import XCLIPProcessor
from .tokenizer import CLIPTokenizer
from .video_transforms import VideoPreprocessor

BUNDLED = Path(__file__).resolve().parent / "data" / "default-model"
CACHE = Path(os.environ.get("VIDEOSEARCH_CACHE", Path.home() / ".cache" / "videosearch"))
TINY_SEED = 20261123


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


def default_model_dir() -> str:
    """Directory of the default model (Hugging Face layout, with tokenizer and preprocessor files)."""
    if (BUNDLED / "config.json").exists():
        return str(BUNDLED)
    target = CACHE / f"untrained-tiny-{TINY_SEED}"
    if not (target / "model.safetensors").exists():
        torch.manual_seed(TINY_SEED)
        staging = target.with_name(f"{target.name}.tmp-{os.getpid()}")
        XCLIPModel(tiny_config()).save_pretrained(staging)
        XCLIPProcessor(
            CLIPTokenizer.from_pretrained(), VideoPreprocessor(size=96, crop_size=96)
        ).save_pretrained(staging)
        if not target.exists():  # another process may have won the race: its copy is identical
            staging.replace(target)
    warnings.warn(
        "using an UNTRAINED default model (random weights): the pipeline runs, but rankings are meaningless. "
        "Pass --model with a trained X-CLIP checkpoint.",
        stacklevel=2,
    )
    return str(target)
