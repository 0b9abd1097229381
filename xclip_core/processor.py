"""``XCLIPProcessor``: the CLIP tokenizer and the video preprocessor behind one call, as in transformers."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import torch

from .tokenizer import CLIPTokenizer
from .video_transforms import VideoLike, VideoPreprocessor


class XCLIPProcessor:
    """Prepares text and/or videos for :class:`xclip_core.XCLIPModel`.

    Same call and output names as ``transformers.XCLIPProcessor``: ``input_ids`` and ``attention_mask`` for
    text, ``pixel_values`` (float32 ``(batch, frames, 3, H, W)``) for videos given as uint8 ``(T, H, W, 3)``.
    """

    def __init__(self, tokenizer: CLIPTokenizer, video_preprocessor: VideoPreprocessor):
        self.tokenizer = tokenizer
        self.video_preprocessor = video_preprocessor

    @classmethod
    def from_pretrained(
        cls, src: str | os.PathLike | None = None, storage_options: dict[str, Any] | None = None
    ) -> XCLIPProcessor:
        """Load the tokenizer and the preprocessor config of a checkpoint (local directory or fsspec URL).

        ``src=None`` gives the bundled CLIP vocabulary and the default 224-pixel preprocessor.
        """
        tokenizer = CLIPTokenizer.from_pretrained(src, storage_options)
        if src is None:
            return cls(tokenizer, VideoPreprocessor())
        return cls(tokenizer, VideoPreprocessor.from_pretrained(src, storage_options))

    @classmethod
    def for_model(
        cls, src: str | os.PathLike | None, image_size: int, storage_options: dict[str, Any] | None = None
    ) -> XCLIPProcessor:
        """The processor to use with the model at ``src``: the one rule for checkpoints that lack files.

        The checkpoint's own tokenizer files and ``preprocessor_config.json`` where it has them; else the
        bundled CLIP vocabulary and a preprocessor for ``image_size`` (shortest edge and crop, X-CLIP's mean
        and deviation). A single weights file (an original-release ``.pth``) or ``src=None`` (a model built in
        memory) has no files of its own.
        """
        try:
            tokenizer = CLIPTokenizer.from_pretrained(src, storage_options)
        except FileNotFoundError:
            tokenizer = CLIPTokenizer.from_pretrained()
        try:
            if src is None:
                raise FileNotFoundError("a model built in memory has no preprocessor config")
            preprocessor = VideoPreprocessor.from_pretrained(src, storage_options)
        except (FileNotFoundError, NotADirectoryError):
            preprocessor = VideoPreprocessor(size=image_size, crop_size=image_size)
        return cls(tokenizer, preprocessor)

    def save_pretrained(
        self, directory: str | os.PathLike, storage_options: dict[str, Any] | None = None
    ) -> None:
        """Write the tokenizer files and ``preprocessor_config.json`` (readable by transformers)."""
        self.tokenizer.save_pretrained(directory, storage_options)
        self.video_preprocessor.save_pretrained(directory, storage_options)

    def __call__(
        self,
        text: str | list[str] | None = None,
        videos: VideoLike | Sequence[VideoLike] | None = None,
        return_tensors: str = "pt",
        padding: bool | str = "max_length",
        truncation: bool = True,
        max_length: int | None = None,
    ) -> dict[str, torch.Tensor]:
        """Tokenize ``text`` and/or preprocess ``videos`` (one video or a list with equal frame counts).

        Text arguments mean what they mean for :class:`~xclip_core.tokenizer.CLIPTokenizer`; only
        ``return_tensors="pt"`` is supported.
        """
        if text is None and videos is None:
            raise ValueError("pass text, videos, or both")
        if return_tensors != "pt":
            raise ValueError(f"only return_tensors='pt' is supported, got {return_tensors!r}")
        out: dict[str, torch.Tensor] = {}
        if text is not None:
            out.update(self.tokenizer(text, padding=padding, truncation=truncation, max_length=max_length))
        if videos is not None:
            out.update(self.video_preprocessor(videos))
        return out
