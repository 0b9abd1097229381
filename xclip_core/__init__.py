"""X-CLIP (Ni et al. 2022) in plain PyTorch: models, tokenizer, preprocessing and checkpoints.

As with ``transformers``: ``from xclip_core import XCLIPModel, XCLIPProcessor, CLIPTokenizer``.
"""

from .config import PRESETS, TextConfig, VisionConfig, XCLIPConfig, preset
from .identity import ModelIdentity
from .model import VideoFeatures, XCLIPModel, XCLIPOutput
from .processor import XCLIPProcessor
from .tokenizer import CLIPTokenizer
from .video_transforms import VideoPreprocessor

__all__ = [
    "PRESETS",
    "CLIPTokenizer",
    "ModelIdentity",
    "TextConfig",
    "VideoFeatures",
    "VideoPreprocessor",
    "VisionConfig",
    "XCLIPConfig",
    "XCLIPModel",
    "XCLIPOutput",
    "XCLIPProcessor",
    "preset",
]
