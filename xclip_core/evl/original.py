"""Loading the original EVL release (github.com/OpenGVLab/efficient-video-recognition) into ``EVLModel``.

The release is two files. The EVL checkpoint: ``main.py`` trains ``EVLTransformer`` under
DistributedDataParallel and ``checkpoint.save_checkpoint`` writes ``{"model": state_dict, "optimizer",
"lr_sched", "loss_scaler", "next_step"}``, every key prefixed with ``module.``. With a frozen backbone (every
published checkpoint) ``EVLTransformer`` keeps the backbone out of its module tree (``self.backbone =
[backbone]``), so the checkpoint holds the decoder (``decoder.*``) and the head (``proj.*``) alone, and the
backbone is OpenAI's CLIP, read at training time from CLIP's release (``ViT-B-16.pt``, ``ViT-L-14.pt``):
that is the second file. A checkpoint trained with ``--finetune_backbone`` also holds its backbone
(``backbone.*``, EVL's own ViT layout); those tensors then win over ``backbone=``, which is not read, as in
the original, whose strict ``load_state_dict`` overwrites the CLIP weights the model was built from.

What the tensors fix is read from their shapes: widths, depths, patch and image size, the number of
decoder layers K, the attention and MLP widths, which temporal modules exist (their tensors are present), the
frame count (the temporal position embedding's length) and the number of classes. What they cannot tell is an
argument: the head counts (default ``width // 64``, as in CLIP and in the release's scripts: 12 heads for
ViT-B/16 and its 768-wide decoder, 16 for ViT-L/14 and its 1024-wide one) and, for a model without a temporal
position embedding, the frame count (default 8; any count then works).

Every file is read as tensors only (``checkpoints.load_tensors``: safetensors, or torch files with
``weights_only`` or a restricted unpickler; ``torchscript.read_torchscript`` for OpenAI's TorchScript
``.pt``), from a local path or any fsspec URL. Missing, unexpected and mis-shaped tensors are reported in the
file's own names.
"""

from __future__ import annotations

import math
import os
import re
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from ..checkpoints import (
    CheckpointError,
    Weights,
    check_state_dict,
    hf_to_original,
    load_tensors,
    original_to_hf,
)
from ..model import WEIGHT_FILES
from ..sources import ModelSource
from .config import EVLConfig, EVLDecoderConfig, EVLVisionConfig
from .torchscript import is_torchscript, read_torchscript

#: The EVL checkpoint's names -> ours. ``{i}`` is a layer number; entries ending in "." rename a prefix.
EVL_NAMES: tuple[tuple[str, str], ...] = (
    ("decoder.cls_token", "decoder.query_token"),
    ("decoder.decoder_layers.{i}.attn.", "decoder.layers.{i}.cross_attn."),  # {q,k,v,out}_proj
    ("decoder.decoder_layers.{i}.norm1.", "decoder.layers.{i}.layer_norm1."),  # on the query
    ("decoder.decoder_layers.{i}.norm3.", "decoder.layers.{i}.frames_layer_norm."),  # on the frame tokens
    ("decoder.decoder_layers.{i}.norm2.", "decoder.layers.{i}.layer_norm2."),  # before the MLP
    ("decoder.decoder_layers.{i}.mlp.", "decoder.layers.{i}.mlp."),  # fc1, fc2
    ("decoder.temporal_conv.{i}.", "decoder.temporal.{i}.conv."),
    ("decoder.temporal_pos_embed.{i}", "decoder.temporal.{i}.position_embedding"),
    ("decoder.cross_attention.{i}.w1", "decoder.temporal.{i}.cross_attn.previous_frame_weight"),
    ("decoder.cross_attention.{i}.w2", "decoder.temporal.{i}.cross_attn.next_frame_weight"),
    ("proj.0.", "head.layer_norm."),
    ("proj.2.", "head.fc."),
    # EVL's ViT, in the checkpoint only when trained with --finetune_backbone
    ("backbone.cls_token", "vision_model.embeddings.class_embedding"),
    ("backbone.pos_embed", "vision_model.embeddings.position_embedding.weight"),
    ("backbone.patch_embed.proj.", "vision_model.embeddings.patch_embedding."),  # see PATCH_WEIGHT
    ("backbone.ln_pre.", "vision_model.pre_layernorm."),
    ("backbone.blocks.{i}.attn.", "vision_model.encoder.layers.{i}.self_attn."),  # {q,k,v,out}_proj
    ("backbone.blocks.{i}.norm1.", "vision_model.encoder.layers.{i}.layer_norm1."),
    ("backbone.blocks.{i}.norm2.", "vision_model.encoder.layers.{i}.layer_norm2."),
    ("backbone.blocks.{i}.mlp.", "vision_model.encoder.layers.{i}.mlp."),  # fc1, fc2
)
#: EVL's patch embedding is a linear layer on flattened (channel, row, column) patches: (D, C*p*p) there,
#: our convolution's (D, C, p, p) here. Its bias is zero when converted from CLIP (whose conv1 has none).
PATCH_WEIGHT = "vision_model.embeddings.patch_embedding.weight"
PATCH_BIAS = "vision_model.embeddings.patch_embedding.bias"
#: EVL's patch embedding takes RGB frames (``PatchEmbed2D(in_channels=3)``).
EVL_CHANNELS = 3

#: CLIP tensors that EVL does not use: the pooled output's LayerNorm and projection (the decoder reads the
#: blocks' tokens), and X-CLIP's cross-frame message tensors.
_UNUSED_CLIP = re.compile(r"visual\.(ln_post\..*|proj|transformer\.resblocks\.\d+\.message_.*)")
_UNUSED_HF = re.compile(
    r"vision_model\.(post_layernorm\..*|embeddings\.position_ids|encoder\.layers\.\d+\.message_.*)"
)


def load_original(
    cls: Any,
    backbone: str | os.PathLike | None,
    checkpoint: str | os.PathLike,
    decoder_num_heads: int | None = None,
    backbone_num_heads: int | None = None,
    num_frames: int | None = None,
    storage_options: dict[str, Any] | None = None,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> Any:
    """Build ``cls`` (``EVLModel``, whose ``from_original`` calls this) from CLIP image-encoder weights and
    an EVL training checkpoint.

    ``checkpoint``: the EVL checkpoint (``{"model": {"module.decoder...": ...}}`` as ``main.py`` saves it; a
    bare state dict, with or without ``module.``, works too; ``.pth`` or ``.safetensors``).

    ``backbone``: the CLIP image encoder the checkpoint was trained on, in one of these layouts:

    - OpenAI CLIP: the TorchScript release (``ViT-B-16.pt``; read without running it), or a state dict
      (``.pth``/``.pt``/``.bin``/``.safetensors``) of the whole CLIP model (``visual.*``; the text tower is
      ignored) or of the image encoder alone (``conv1.weight``, ``transformer.resblocks.N...``);
    - an original-release X-CLIP ``.pth`` (``visual.*``; its cross-frame ``message_*`` tensors are dropped);
    - the Hugging Face layout (``vision_model.*``): an X-CLIP checkpoint directory or weights file (minus
      ``message_*``), or a CLIP one (its ``pre_layrnorm`` spelling is accepted).

    X-CLIP's vision tower was trained with its message tokens, so without them it is a CLIP ViT of
    X-CLIP's weights, not X-CLIP's video encoder. ``ln_post`` and the projection are never used. May be
    ``None`` when the checkpoint holds a fine-tuned backbone; it is ignored then (with a warning).

    Raises ``CheckpointError`` (naming the tensors, in the file's names) for missing, unexpected or
    mis-shaped tensors, unreadable files and pickles that would run code; ``FileNotFoundError`` for a missing
    file.
    """
    where = os.fspath(checkpoint)
    evl = load_tensors(ModelSource(checkpoint, storage_options))
    if not any(key.startswith("decoder.decoder_layers.") for key in evl):
        raise CheckpointError(
            f"{where}: not an EVL checkpoint: it has no decoder layers (decoder.decoder_layers.*); "
            f"its keys begin {sorted(evl)[:5]}"
        )
    evl_ours = {_evl_name(key, to_ours=True): tensor for key, tensor in evl.items()}
    weight = evl_ours.get(PATCH_WEIGHT)
    if weight is not None and weight.ndim == 2:  # a fine-tuned backbone: (D, C*p*p) -> (D, C, p, p)
        patch = math.isqrt(weight.shape[1] // EVL_CHANNELS)
        if EVL_CHANNELS * patch * patch == weight.shape[1]:  # else reported as mis-shaped below
            evl_ours[PATCH_WEIGHT] = weight.reshape(weight.shape[0], EVL_CHANNELS, patch, patch)

    if any(key.startswith("backbone.") for key in evl):
        if backbone is not None:
            warnings.warn(
                f"{where} holds a fine-tuned backbone (backbone.*), which the model uses; the backbone file "
                f"{os.fspath(backbone)} is not read",
                stacklevel=3,
            )
        clip = None
        vision_state = {k: v for k, v in evl_ours.items() if k.startswith("vision_model.")}
        vision_where = where
    elif backbone is None:
        raise CheckpointError(
            f"{where} holds the decoder and head only (the backbone was frozen in training, and a frozen "
            "backbone is not saved): pass backbone= the CLIP weights it was trained on (OpenAI's ViT-B-16.pt "
            "or ViT-L-14.pt)"
        )
    else:
        clip = read_backbone(backbone, storage_options)
        vision_state, vision_where = clip.to_ours(clip.tensors), clip.where

    config = _infer_config(
        vision_state, vision_where, evl, where, decoder_num_heads, backbone_num_heads, num_frames
    )
    with torch.device("meta"):
        expected = cls(config).state_dict()
    if clip is None:
        _check(where, expected, evl, _evl_names_of)
        state = evl_ours
    else:
        decoder_part = {k: v for k, v in expected.items() if not k.startswith("vision_model.")}
        _check(where, decoder_part, evl, _evl_names_of)
        vision_part = {k: v for k, v in expected.items() if k.startswith("vision_model.") and k != PATCH_BIAS}
        _check(clip.where + clip.note, vision_part, clip.tensors, clip.to_file)
        zero_bias = torch.zeros(config.vision_config.hidden_size)  # CLIP's conv1 has no bias
        state = {**evl_ours, **vision_state, PATCH_BIAS: zero_bias}
    return cls.from_weights(config, Weights.of(state), where, storage_options, dtype, device)


# ----------------------------------------------------------------------------------------------------
# Names
# ----------------------------------------------------------------------------------------------------


def _pattern(name: str) -> re.Pattern[str]:
    body = re.escape(name).replace(re.escape("{i}"), r"(?P<i>\d+)")
    return re.compile(body if name.endswith(".") else body + "$")


_EVL_PATTERNS = [(_pattern(original), _pattern(ours), original, ours) for original, ours in EVL_NAMES]


def _evl_name(key: str, to_ours: bool) -> str:
    """A key renamed by ``EVL_NAMES`` (either way); keys it does not cover keep their name."""
    for original_pattern, ours_pattern, original, ours in _EVL_PATTERNS:
        pattern, target = (original_pattern, ours) if to_ours else (ours_pattern, original)
        match = pattern.match(key)
        if match:
            return target.replace("{i}", match.groupdict().get("i") or "") + key[match.end() :]
    return key


def _evl_names_of(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our tensors (or meta tensors) in the EVL checkpoint's names and shapes."""
    out = {_evl_name(key, to_ours=False): tensor for key, tensor in state.items()}
    patch = _evl_name(PATCH_WEIGHT, to_ours=False)
    if patch in out:
        out[patch] = out[patch].flatten(1)
    return out


# ----------------------------------------------------------------------------------------------------
# The backbone file
# ----------------------------------------------------------------------------------------------------


@dataclass
class BackboneFile:
    """A backbone file's tensors in its own names, and the conversions between its layout and ours."""

    where: str
    tensors: dict[str, torch.Tensor]
    to_ours: Callable[[Mapping[str, torch.Tensor]], dict[str, torch.Tensor]]
    to_file: Callable[[Mapping[str, torch.Tensor]], dict[str, torch.Tensor]]
    note: str = ""  # said of the names in error messages


def read_backbone(src: str | os.PathLike, storage_options: dict[str, Any] | None = None) -> BackboneFile:
    """Read a CLIP image encoder's weights (the layouts of :func:`load_original`), tensors only."""
    source = ModelSource(src, storage_options)
    if source.is_file():
        state = read_torchscript(source) if is_torchscript(source) else load_tensors(source)
    elif source.exists(""):
        name = source.first_existing(*WEIGHT_FILES)
        if name is None:
            raise FileNotFoundError(f"{source.uri}: no weights found (looked for {', '.join(WEIGHT_FILES)})")
        state = load_tensors(source, name)
    else:
        raise FileNotFoundError(f"backbone weights {source.uri!r} not found")

    if any(key.startswith("vision_model.") for key in state):  # Hugging Face: X-CLIP or CLIP
        tensors = {
            key.replace("vision_model.pre_layrnorm.", "vision_model.pre_layernorm."): tensor
            for key, tensor in state.items()
            if key.startswith("vision_model.") and not _UNUSED_HF.fullmatch(key)
        }
        return BackboneFile(source.uri, tensors, dict, dict)
    if any(key.startswith("visual.") for key in state):  # OpenAI CLIP or X-CLIP, whole model
        tensors, note = {k: v for k, v in state.items() if k.startswith("visual.")}, ""
    elif "conv1.weight" in state:  # OpenAI CLIP's image encoder alone
        tensors, note = {f"visual.{k}": v for k, v in state.items()}, " (names shown with a 'visual.' prefix)"
    else:
        raise CheckpointError(
            f"{source.uri}: not a CLIP image encoder: expected OpenAI CLIP names (visual.conv1.weight or "
            f"conv1.weight, ...) or Hugging Face ones (vision_model.*); its keys begin {sorted(state)[:5]}"
        )
    tensors = {k: v for k, v in tensors.items() if not _UNUSED_CLIP.fullmatch(k)}
    return BackboneFile(source.uri, tensors, original_to_hf, hf_to_original, note)


# ----------------------------------------------------------------------------------------------------
# Geometry and checks
# ----------------------------------------------------------------------------------------------------


def _shape(state: Mapping[str, torch.Tensor], key: str, where: str, what: str) -> torch.Size:
    if key not in state:
        raise CheckpointError(f"{where}: {what}: it has no {key!r}")
    return state[key].shape


def _count(state: Mapping[str, torch.Tensor], prefix: str) -> int:
    return len({key[len(prefix) :].split(".")[0] for key in state if key.startswith(prefix)})


def _infer_config(
    vision: Mapping[str, torch.Tensor],
    vision_where: str,
    evl: Mapping[str, torch.Tensor],
    where: str,
    decoder_num_heads: int | None,
    backbone_num_heads: int | None,
    num_frames: int | None,
) -> EVLConfig:
    """The geometry the tensors fix (``vision`` in our names, ``evl`` in the checkpoint's), plus the
    arguments for what they cannot tell."""
    not_evl = "not an EVL checkpoint"
    width = _shape(vision, "vision_model.embeddings.class_embedding", vision_where, NOT_CLIP)[0]
    decoder_width = _shape(evl, "decoder.cls_token", where, not_evl)[0]
    if decoder_width != width:
        raise CheckpointError(
            f"{where}: its decoder is {decoder_width} wide (decoder.cls_token) but the backbone "
            f"{vision_where} is {width} wide: the checkpoint was trained on another backbone"
        )
    attention_dim = _shape(evl, "decoder.decoder_layers.0.attn.q_proj.weight", where, not_evl)[0]
    position_embedding = any(key.startswith("decoder.temporal_pos_embed.") for key in evl)
    if position_embedding:
        frames = _shape(evl, "decoder.temporal_pos_embed.0", where, not_evl)[0]
        if num_frames is not None and num_frames != frames:
            raise CheckpointError(
                f"{where}: the checkpoint is trained for {frames} frames (decoder.temporal_pos_embed.0), "
                f"not {num_frames}"
            )
    else:
        frames = num_frames or EVLConfig.num_frames
    vision_config = vision_config_of(vision, vision_where, backbone_num_heads)
    try:
        return EVLConfig(
            vision_config=vision_config,
            decoder_config=EVLDecoderConfig(
                num_layers=_count(evl, "decoder.decoder_layers."),
                attention_dim=attention_dim,
                num_attention_heads=decoder_num_heads or max(1, attention_dim // 64),
                intermediate_size=_shape(evl, "decoder.decoder_layers.0.mlp.fc1.weight", where, not_evl)[0],
                temporal_conv=any(key.startswith("decoder.temporal_conv.") for key in evl),
                temporal_position_embedding=position_embedding,
                temporal_cross_attention=any(key.startswith("decoder.cross_attention.") for key in evl),
            ),
            num_frames=frames,
            num_classes=_shape(evl, "proj.2.weight", where, not_evl)[0],
        )
    except ValueError as err:
        raise CheckpointError(f"{where} with backbone {vision_where}: {err}") from None


NOT_CLIP = "not a CLIP image encoder"


def vision_config_of(
    vision: Mapping[str, torch.Tensor], where: str, num_heads: int | None = None
) -> EVLVisionConfig:
    """The backbone geometry that CLIP ViT tensors (in our names) fix; ``num_heads`` by default
    ``width // 64``."""
    width = _shape(vision, "vision_model.embeddings.class_embedding", where, NOT_CLIP)[0]
    patch_shape = _shape(vision, PATCH_WEIGHT, where, NOT_CLIP)
    positions = _shape(vision, "vision_model.embeddings.position_embedding.weight", where, NOT_CLIP)[0]
    grid = math.isqrt(max(positions - 1, 0))
    if len(patch_shape) != 4 or patch_shape[2] != patch_shape[3] or grid * grid != positions - 1 or grid == 0:
        raise CheckpointError(
            f"{where}: not a square-patch CLIP ViT: patch embedding {tuple(patch_shape)}, "
            f"{positions} position embeddings (expected 1 + a square number)"
        )
    return EVLVisionConfig(
        hidden_size=width,
        intermediate_size=_shape(vision, "vision_model.encoder.layers.0.mlp.fc1.weight", where, NOT_CLIP)[0],
        num_hidden_layers=_count(vision, "vision_model.encoder.layers."),
        num_attention_heads=num_heads or max(1, width // 64),
        num_channels=patch_shape[1],
        image_size=grid * patch_shape[2],
        patch_size=patch_shape[2],
    )


def _check(
    where: str,
    expected: Mapping[str, torch.Tensor],
    found: Mapping[str, torch.Tensor],
    to_file: Callable[[Mapping[str, torch.Tensor]], Mapping[str, torch.Tensor]],
) -> None:
    """``check_state_dict`` in the file's names: ``expected`` (our meta tensors) converted by ``to_file``."""
    try:
        check_state_dict(
            {k: v.shape for k, v in to_file(expected).items()}, {k: v.shape for k, v in found.items()}
        )
    except CheckpointError as err:
        raise CheckpointError(f"{where}: {err}") from None
