"""A new EVL model over the frozen towers of a CLIP or X-CLIP checkpoint, to train: a classifier of given
labels, or the text-aligned variant that search uses.

The backbone is the checkpoint's vision tower (any layout :func:`~xclip_core.evl.original.read_backbone`
reads). The text-aligned variant also takes the checkpoint's text tower and text projection, frozen, and
starts its video projection from the checkpoint's own (``post_layernorm`` and ``visual_projection``: CLIP's
image embedding of a class token, here of the decoder's query): from a Hugging Face-layout X-CLIP or CLIP
checkpoint directory (its ``config.json`` gives the text tower's geometry; the bundled model is one) or
OpenAI's CLIP (a state dict, or the TorchScript release, read without running it). The
decoder and the classifier start from EVL's own initialization; the tokenizer and the video preprocessing are
the checkpoint's.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from ..checkpoints import CheckpointError, load_tensors, original_to_hf
from ..config import TextConfig, known_fields
from ..model import WEIGHT_FILES
from ..processor import XCLIPProcessor
from ..sources import ModelSource
from .config import EVLConfig, EVLDecoderConfig
from .model import EVLModel
from .original import read_backbone, vision_config_of
from .torchscript import is_torchscript, read_torchscript

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
    text_num_heads: int | None = None,
) -> EVLModel:
    """A new EVL model over ``clip``'s frozen towers: a classifier of ``labels``, or (``labels`` None) the
    text-aligned variant. ``num_frames`` and the backbone's head count come from the checkpoint's config.json
    where it has one (else 8, and heads of 64 channels); ``num_frames`` overrides;
    ``decoder`` defaults to the paper's: :data:`DECODER_LAYERS` layers as wide as the
    backbone, heads of 64 channels, MLP factor 4, every temporal module on. Random parts draw from torch's
    global generator (seed it for a reproducible start). ``text_num_heads``: the text tower's head count where
    the checkpoint's files do not say it (OpenAI's layout; default width / 64, CLIP's)."""
    backbone = read_backbone(clip, storage_options)
    vision_state = backbone.to_ours(backbone.tensors)
    vision_json = _config_json(clip, storage_options).get("vision_config", {})
    vision = vision_config_of(vision_state, backbone.where, vision_json.get("num_attention_heads"))
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
        alignment, text_config, projection_dim = _text_tower(clip, storage_options, text_num_heads)
    config = EVLConfig(
        vision_config=vision,
        decoder_config=decoder,
        num_frames=num_frames or int(vision_json.get("num_frames", EVLConfig.num_frames)),
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


def _config_json(clip: str | os.PathLike, storage_options: dict[str, Any] | None) -> dict[str, Any]:
    """A Hugging Face-layout checkpoint's config.json (what the tensors cannot tell: head counts, frames);
    empty for a single weights file."""
    source = ModelSource(clip, storage_options)
    if source.is_file() or not source.exists("config.json"):
        return {}
    return source.read_json("config.json")


def _text_tower(
    clip: str | os.PathLike, storage_options: dict[str, Any] | None, num_heads: int | None
) -> tuple[dict[str, torch.Tensor], TextConfig, int]:
    """The text tower, its projection and the image-embedding head of a CLIP/X-CLIP checkpoint, in our names;
    the text tower's geometry; the embedding width.

    A Hugging Face-layout directory gives the geometry in its ``config.json``; OpenAI's layout (a whole CLIP
    state dict, or its TorchScript release) gives it by the tensors' shapes; the head count, which no shape
    tells, is ``num_heads`` (default: heads of 64 channels, as in every CLIP).
    """
    source = ModelSource(clip, storage_options)
    if source.is_file():
        state = read_torchscript(source) if is_torchscript(source) else load_tensors(source)
        if "token_embedding.weight" not in state or "text_projection" not in state:
            raise CheckpointError(
                f"{source.uri}: a text-aligned EVL model takes its text tower from a CLIP or X-CLIP "
                "checkpoint: an OpenAI CLIP state dict (token_embedding.weight, text_projection...) or a "
                "Hugging Face-layout directory; this file has no text tower (pass labels for a classifier)"
            )
        config = _openai_text_config(state, source.uri, num_heads)
        projection_dim = state["text_projection"].shape[1]
        state = original_to_hf(state)
    else:
        name = source.first_existing(*WEIGHT_FILES) if source.exists("") else None
        if name is None or not source.exists("config.json"):
            raise CheckpointError(
                f"{source.uri}: a text-aligned EVL model takes its text tower from a CLIP or X-CLIP "
                "checkpoint: a Hugging Face-layout directory (config.json and weights) or an OpenAI CLIP file"
            )
        data = source.read_json("config.json")
        if "text_config" not in data or "projection_dim" not in data:
            raise CheckpointError(
                f"{source.uri}/config.json has no text_config and projection_dim: no text tower"
            )
        config = TextConfig(**known_fields(TextConfig, data["text_config"]))
        projection_dim, state = int(data["projection_dim"]), load_tensors(source, name)
    tensors = {}
    for key, tensor in state.items():
        for theirs, ours in _ALIGNMENT.items():
            if key.startswith(theirs) and not key.endswith("position_ids"):
                tensors[ours + key[len(theirs) :]] = tensor
    return tensors, config, projection_dim


def _openai_text_config(state: dict[str, torch.Tensor], where: str, num_heads: int | None) -> TextConfig:
    """The text tower's geometry from OpenAI CLIP's tensors."""
    vocab, width = state["token_embedding.weight"].shape
    layers = len({k.split(".")[2] for k in state if k.startswith("transformer.resblocks.")})
    fc = state.get("transformer.resblocks.0.mlp.c_fc.weight")
    if fc is None or not layers:
        raise CheckpointError(f"{where}: an OpenAI CLIP text tower without transformer.resblocks")
    return TextConfig(
        vocab_size=vocab,
        hidden_size=width,
        intermediate_size=fc.shape[0],
        num_hidden_layers=layers,
        num_attention_heads=num_heads or max(1, width // 64),
        max_position_embeddings=state["positional_embedding"].shape[0],
    )
