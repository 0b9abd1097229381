"""What every model family of ``xclip_core`` is as a checkpoint: where it was loaded from, its identity, its
tokenizer and video preprocessing, and how it is saved. X-CLIP and EVL derive from :class:`CheckpointedModel`.
"""

from __future__ import annotations

import os
from functools import cached_property
from typing import Any

from torch import nn

from . import checkpoints
from .identity import ModelIdentity
from .processor import XCLIPProcessor
from .sources import ModelSource
from .tokenizer import CLIPTokenizer
from .video_transforms import VideoPreprocessor
from .weights_hash import weights_sha256


class CheckpointedModel(nn.Module):
    """A family's module with ``config`` (``to_json_string``, ``vision_config.image_size``) and ``family``.
    ``source`` and ``storage_options`` are set by the family's loaders: where the weights came from and how
    to read more files there (its tokenizer and preprocessor files)."""

    family: str
    config: Any

    def __init__(self) -> None:
        super().__init__()
        self.source: str | None = None
        self.storage_options: dict[str, Any] | None = None
        self.sha256_as_loaded: str | None = None  # set by the loaders: the weights hash as they loaded them

    @cached_property
    def identity(self) -> ModelIdentity:
        """Source and weights hash: the weights as loaded (``sha256_as_loaded``), or for a model built in
        memory as they are at first use."""
        sha256 = self.sha256_as_loaded or self.weights_sha256()
        return ModelIdentity(self.source or "<in memory>", sha256, self.family)

    @cached_property
    def processor(self) -> XCLIPProcessor:
        """The tokenizer and video preprocessor: the checkpoint's own files, else the bundled vocabulary and
        X-CLIP's preprocessing at the model's image size (:meth:`XCLIPProcessor.for_model`)."""
        return XCLIPProcessor.for_model(
            self.source, self.config.vision_config.image_size, self.storage_options
        )

    @property
    def tokenizer(self) -> CLIPTokenizer:
        return self.processor.tokenizer

    @property
    def preprocessor(self) -> VideoPreprocessor:
        return self.processor.video_preprocessor

    def save_pretrained(
        self, directory: str | os.PathLike, storage_options: dict[str, Any] | None = None
    ) -> None:
        """Write the Hugging Face layout: ``config.json`` and ``model.safetensors``, to a local directory or
        fsspec URL."""
        target = ModelSource(directory, storage_options)
        target.fs.makedirs(target.root, exist_ok=True)
        with target.fs.open(target.path("config.json"), "w") as f:
            f.write(self.config.to_json_string())
        checkpoints.save_safetensors(self.state_dict(), target.fs, target.path("model.safetensors"))

    def weights_sha256(self) -> str:
        """:func:`xclip_core.weights_hash.weights_sha256` of this model as it is now: the same hash for every
        family."""
        return weights_sha256(self)
