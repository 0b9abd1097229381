"""EVL (Lin et al. 2022, "Frozen CLIP Models are Efficient Video Learners"): a frozen CLIP image encoder, a
temporal decoder reading its last layers, and a linear classifier.

``from xclip_core.evl import EVLModel, EVLConfig, evl_preset``; ``EVLModel.from_original`` converts the
original release (github.com/OpenGVLab/efficient-video-recognition).
"""

from .config import PRESETS, EVLConfig, EVLDecoderConfig, EVLVisionConfig, evl_preset
from .model import EVLModel

__all__ = ["PRESETS", "EVLConfig", "EVLDecoderConfig", "EVLModel", "EVLVisionConfig", "evl_preset"]
