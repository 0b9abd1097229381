"""A new EVL model over the frozen towers of a CLIP or X-CLIP checkpoint, to train: a classifier of given
labels, or the text-aligned variant that search uses.

The backbone is the checkpoint's vision tower (any layout :func:`~xclip_core.evl.original.read_backbone`
reads). The text-aligned variant also takes the checkpoint's text tower and text projection, frozen, and
starts its video projection from the checkpoint's own (``post_layernorm`` and ``visual_projection``: CLIP's
image embedding of a class token, here of the decoder's query): it needs a Hugging Face-layout X-CLIP or CLIP
checkpoint directory, whose ``config.json`` gives the text tower's geometry (the bundled model is one). The
decoder and the classifier start from EVL's own initialization; the tokenizer and the video preprocessing are
the checkpoint's.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from ..checkpoints import CheckpointError, load_tensors
from ..config import TextConfig, known_fields
from ..model import WEIGHT_FILES
from ..processor import XCLIPProcessor
from ..sources import ModelSource
from .config import EVLConfig, EVLDecoderConfig
from .model import EVLModel
from .original import read_backbone, vision_config_of

DECODER_LAYERS = 4  # the paper's decoder depth (fewer when the backbone has fewer blocks)

#: The text-aligned variant's tensors, as named in a Hugging Face X-CLIP/CLIP checkpoint -> ours.
_ALIGNMENT = {
    "text_model.": "alignment.text_model.",
    "text_projection.weight": "alignment.text_projection.weight",
    "visual_projection.weight": "alignment.visual_projection.weight",
    "vision_model.post_layernorm.": "alignment.video_layernorm.",
}


def evl_over_clip(
    clip: str | os.PathLike,
    labels: list[str] | None = None,
    num_frames: int | None = None,
    decoder: EVLDecoderConfig | None = None,
    storage_options: dict[str, Any] | None = None,
) -> EVLModel:
    """A new EVL model over ``clip``'s frozen towers: a classifier of ``labels``, or (``labels`` None) the
    text-aligned variant. ``num_frames`` defaults to the checkpoint's (an X-CLIP config.json's), else 8;
    ``decoder`` defaults to the paper's: :data:`DECODER_LAYERS` layers as wide as the
    backbone, heads of 64 channels, MLP factor 4, every temporal module on. Random parts draw from torch's
    global generator (seed it for a reproducible start)."""
    backbone = read_backbone(clip, storage_options)
    vision_state = backbone.to_ours(backbone.tensors)
    vision = vision_config_of(vision_state, backbone.where)
    width = vision.hidden_size
    decoder = decoder or EVLDecoderConfig(
        num_layers=min(DECODER_LAYERS, vision.num_hidden_layers),
        attention_dim=width,
        num_attention_heads=max(1, width // 64),
        intermediate_size=4 * width,
    )
    alignment: dict[str, torch.Tensor] = {}
    text_config, projection_dim = None, None
    if labels is None:
        alignment, text_config, projection_dim = _text_tower(clip, storage_options)
    config = EVLConfig(
        vision_config=vision,
        decoder_config=decoder,
        num_frames=num_frames or _frames_of(clip, storage_options),
        num_classes=len(labels or []),
        labels=list(labels) if labels else None,
        text_config=text_config,
        projection_dim=projection_dim,
    )
    model = EVLModel(config)
    state = {**vision_state, **alignment}
    if "vision_model.embeddings.patch_embedding.bias" not in state:  # CLIP's conv1 has no bias
        state["vision_model.embeddings.patch_embedding.bias"] = torch.zeros(width)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or any(key.startswith(("vision_model.", "alignment.text")) for key in missing):
        raise CheckpointError(
            f"{backbone.where}: tensors that do not fit: {sorted(unexpected)[:5]} {missing[:5]}"
        )
    model.processor = XCLIPProcessor.for_model(os.fspath(clip), vision.image_size, storage_options)
    return model


def _frames_of(clip: str | os.PathLike, storage_options: dict[str, Any] | None) -> int:
    source = ModelSource(clip, storage_options)
    if source.is_file() or not source.exists("config.json"):
        return EVLConfig.num_frames
    return int(
        source.read_json("config.json").get("vision_config", {}).get("num_frames", EVLConfig.num_frames)
    )


def _text_tower(
    clip: str | os.PathLike, storage_options: dict[str, Any] | None
) -> tuple[dict[str, torch.Tensor], TextConfig, int]:
    """The text tower, its projection and the image-embedding head of a Hugging Face checkpoint directory,
    in our names; the text tower's geometry; the embedding width."""
    source = ModelSource(clip, storage_options)
    name = None if source.is_file() else source.first_existing(*WEIGHT_FILES)
    if name is None or not source.exists("config.json"):
        raise CheckpointError(
            f"{source.uri}: a text-aligned EVL model takes its text tower from a Hugging Face-layout X-CLIP "
            "or CLIP checkpoint directory (config.json and weights); pass one, or labels for a classifier"
        )
    config = source.read_json("config.json")
    if "text_config" not in config or "projection_dim" not in config:
        raise CheckpointError(
            f"{source.uri}/config.json has no text_config and projection_dim: no text tower"
        )
    tensors = {}
    for key, tensor in load_tensors(source, name).items():
        for theirs, ours in _ALIGNMENT.items():
            if key.startswith(theirs) and not key.endswith("position_ids"):
                tensors[ours + key[len(theirs) :]] = tensor
    return (
        tensors,
        TextConfig(**known_fields(TextConfig, config["text_config"])),
        int(config["projection_dim"]),
    )
