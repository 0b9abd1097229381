"""X-CLIP (Ni et al. 2022) in plain PyTorch: models, tokenizer, preprocessing and checkpoints."""

from .config import PRESETS, TextConfig, VisionConfig, XCLIPConfig, preset
from .model import VideoFeatures, XCLIPModel, XCLIPOutput

__all__ = [
    "PRESETS",
    "TextConfig",
    "VideoFeatures",
    "VisionConfig",
    "XCLIPConfig",
    "XCLIPModel",
    "XCLIPOutput",
    "preset",
]
