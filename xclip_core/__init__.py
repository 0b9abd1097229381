"""X-CLIP (Ni et al. 2022) in plain PyTorch: models, tokenizer, preprocessing and checkpoints.

As with ``transformers``: ``from xclip_core import XCLIPModel, XCLIPProcessor, CLIPTokenizer``. Each is
imported on first use, so that the torch-free modules (``xclip_core.sampling``, the frame resize of
``xclip_core.video_transforms``) stay light in the pipeline's decoder processes.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "PRESETS": ".config",
    "CLIPTokenizer": ".tokenizer",
    "ModelIdentity": ".identity",
    "TextConfig": ".config",
    "VideoFeatures": ".model",
    "VideoPreprocessor": ".video_transforms",
    "VisionConfig": ".config",
    "XCLIPConfig": ".config",
    "XCLIPModel": ".model",
    "XCLIPOutput": ".model",
    "XCLIPProcessor": ".processor",
    "preset": ".config",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'xclip_core' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name], __name__), name)
