"""Tests for ``xclip_core.evl``: EVL (Lin et al. 2022) against a reference written here from the paper's
equations, loading of the original release's files, round trips, the frozen backbone and bad files.

The reference shares no code with the model: its LayerNorm, softmax, attention and QuickGELU are written out
with ``torch.einsum`` and explicit formulas, and it reads the original layouts' raw tensors (OpenAI CLIP's
``visual.*`` names, EVL's ``decoder.*`` / ``proj.*`` names) directly.
"""

from __future__ import annotations

import math
import os
import pickle
import uuid
import zipfile
from collections import OrderedDict
from dataclasses import replace
from pathlib import Path

import fsspec
import pytest
import safetensors.torch
import torch
from torch import nn

from xclip_core.checkpoints import CheckpointError, hf_to_original
from xclip_core.config import TextConfig, VisionConfig, XCLIPConfig
from xclip_core.evl import PRESETS, EVLConfig, EVLDecoderConfig, EVLModel, EVLVisionConfig, evl_preset
from xclip_core.evl.torchscript import read_torchscript
from xclip_core.model import XCLIPModel
from xclip_core.sources import ModelSource

TOLERANCE = 1e-4

# ---- Random weights in the original layouts ---------------------------------------------------------------


def clip_visual(width: int, layers: int, patch: int, image: int, seed: int) -> dict[str, torch.Tensor]:
    """A random CLIP image encoder in OpenAI's names, without the ``visual.`` prefix."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape: int, scale: float = 0.2) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * scale

    sd = {
        "class_embedding": r(width),
        "positional_embedding": r((image // patch) ** 2 + 1, width),
        "conv1.weight": r(width, 3, patch, patch, scale=(3 * patch * patch) ** -0.5),
        "ln_pre.weight": 1 + r(width),
        "ln_pre.bias": r(width),
        "ln_post.weight": 1 + r(width),  # unused by EVL
        "ln_post.bias": r(width),
        "proj": r(width, 16),
    }
    for i in range(layers):
        p = f"transformer.resblocks.{i}."
        sd |= {
            p + "attn.in_proj_weight": r(3 * width, width, scale=width**-0.5),
            p + "attn.in_proj_bias": r(3 * width),
            p + "attn.out_proj.weight": r(width, width, scale=width**-0.5),
            p + "attn.out_proj.bias": r(width),
            p + "ln_1.weight": 1 + r(width),
            p + "ln_1.bias": r(width),
            p + "mlp.c_fc.weight": r(4 * width, width, scale=width**-0.5),
            p + "mlp.c_fc.bias": r(4 * width),
            p + "mlp.c_proj.weight": r(width, 4 * width, scale=(4 * width) ** -0.5),
            p + "mlp.c_proj.bias": r(width),
            p + "ln_2.weight": 1 + r(width),
            p + "ln_2.bias": r(width),
        }
    return sd


def evl_decoder(
    width: int, grid: int, frames: int, layers: int, qkv: int, classes: int, temporal: str, seed: int
) -> dict[str, torch.Tensor]:
    """A random EVL decoder and head as the original ``EVLTransformer.state_dict()`` names them (frozen
    backbone: no ``backbone.*``). ``temporal``: the modules on (c conv, p pos. embed, a cross-attention)."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape: int, scale: float = 0.2) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * scale

    hidden = 4 * width
    sd = {"decoder.cls_token": r(width)}
    for i in range(layers):
        p = f"decoder.decoder_layers.{i}."
        for name in "qkv":
            sd |= {
                p + f"attn.{name}_proj.weight": r(qkv, width, scale=width**-0.5),
                p + f"attn.{name}_proj.bias": r(qkv),
            }
        sd |= {p + "attn.out_proj.weight": r(width, qkv, scale=qkv**-0.5), p + "attn.out_proj.bias": r(width)}
        for norm in ("norm1", "norm2", "norm3"):
            sd |= {p + f"{norm}.weight": 1 + r(width), p + f"{norm}.bias": r(width)}
        sd |= {
            p + "mlp.fc1.weight": r(hidden, width, scale=width**-0.5),
            p + "mlp.fc1.bias": r(hidden),
            p + "mlp.fc2.weight": r(width, hidden, scale=hidden**-0.5),
            p + "mlp.fc2.bias": r(width),
        }
        if "c" in temporal:
            sd |= {
                f"decoder.temporal_conv.{i}.weight": r(width, 1, 3),
                f"decoder.temporal_conv.{i}.bias": r(width),
            }
        if "p" in temporal:
            sd[f"decoder.temporal_pos_embed.{i}"] = r(frames, width)
        if "a" in temporal:
            positions = (2 * grid - 1) ** 2
            sd |= {
                f"decoder.cross_attention.{i}.w1": r(positions, width, scale=1.0),
                f"decoder.cross_attention.{i}.w2": r(positions, width, scale=1.0),
            }
    sd |= {
        "proj.0.weight": 1 + r(width),
        "proj.0.bias": r(width),
        "proj.2.weight": r(classes, width, scale=width**-0.5),
        "proj.2.bias": r(classes),
    }
    return sd


def save_evl_checkpoint(path: str, decoder: dict[str, torch.Tensor]) -> None:
    """As ``checkpoint.save_checkpoint`` writes it under DistributedDataParallel."""
    model = {f"module.{k}": v for k, v in decoder.items()}
    optimizer = {"state": {0: {"step": torch.tensor(3.0)}}, "param_groups": [{"lr": 4e-4, "params": [0]}]}
    torch.save({"model": model, "optimizer": optimizer, "lr_sched": {"last_epoch": 3}, "next_step": 3}, path)


def save_tensors(path: str, state: dict[str, torch.Tensor]) -> None:
    if path.endswith(".safetensors"):
        safetensors.torch.save_file({k: v.contiguous() for k, v in state.items()}, path)
    else:
        torch.save(state, path)


# ---- The reference: the paper's equations, in einsum form -------------------------------------------------


def ref_layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + 1e-5) * weight + bias


def ref_softmax(x: torch.Tensor, dim: int) -> torch.Tensor:
    e = torch.exp(x - x.amax(dim, keepdim=True))
    return e / e.sum(dim, keepdim=True)


def ref_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    return torch.einsum("...i,oi->...o", x, weight) + bias


def ref_quick_gelu(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(1.702 * x)


def ref_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    return x.reshape(*x.shape[:-1], heads, x.shape[-1] // heads)  # (..., L, H, d)


def ref_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v per head; (N, Lq, A), (N, Lk, A) -> (N, Lq, A)."""
    q, k, v = ref_heads(q, heads), ref_heads(k, heads), ref_heads(v, heads)
    weights = ref_softmax(torch.einsum("nqhd,nkhd->nqkh", q, k) / math.sqrt(q.shape[-1]), dim=2)
    return torch.einsum("nqkh,nkhd->nqhd", weights, v).flatten(-2)


def ref_backbone(
    clip: dict[str, torch.Tensor], frames: torch.Tensor, heads: int, patch_bias: torch.Tensor | None = None
) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """CLIP ViT on (N, 3, H, W), ln_pre, no ln_post: per block (output, q, k), q and k in heads, unscaled."""
    width, channels, p, _ = clip["conv1.weight"].shape
    n, _, height, _ = frames.shape
    grid = height // p
    pixels = frames.reshape(n, channels, grid, p, grid, p)
    x = torch.einsum("ncipjq,dcpq->nijd", pixels, clip["conv1.weight"]).reshape(n, grid * grid, width)
    if patch_bias is not None:
        x = x + patch_bias
    x = torch.cat([clip["class_embedding"].expand(n, 1, width), x], dim=1) + clip["positional_embedding"]
    x = ref_layer_norm(x, clip["ln_pre.weight"], clip["ln_pre.bias"])
    blocks = []
    for i in range(len({k.split(".")[2] for k in clip if k.startswith("transformer.resblocks.")})):
        b = {k.removeprefix(f"transformer.resblocks.{i}."): v for k, v in clip.items()}
        y = ref_layer_norm(x, b["ln_1.weight"], b["ln_1.bias"])
        wq, wk, wv = b["attn.in_proj_weight"].chunk(3)
        bq, bk, bv = b["attn.in_proj_bias"].chunk(3)
        q, k, v = ref_linear(y, wq, bq), ref_linear(y, wk, bk), ref_linear(y, wv, bv)
        x = x + ref_linear(ref_attention(q, k, v, heads), b["attn.out_proj.weight"], b["attn.out_proj.bias"])
        y = ref_layer_norm(x, b["ln_2.weight"], b["ln_2.bias"])
        hidden = ref_quick_gelu(ref_linear(y, b["mlp.c_fc.weight"], b["mlp.c_fc.bias"]))
        x = x + ref_linear(hidden, b["mlp.c_proj.weight"], b["mlp.c_proj.bias"])
        blocks.append((x, ref_heads(q, heads), ref_heads(k, heads)))
    return blocks


def ref_relative_index(grid: int) -> torch.Tensor:
    index = torch.zeros(grid * grid, grid * grid, dtype=torch.long)
    for a in range(grid * grid):
        for b in range(grid * grid):
            (ai, aj), (bi, bj) = divmod(a, grid), divmod(b, grid)
            index[a, b] = (ai - bi + grid - 1) * (2 * grid - 1) + (aj - bj + grid - 1)
    return index


def ref_evl(
    clip: dict[str, torch.Tensor],
    evl: dict[str, torch.Tensor],
    video: torch.Tensor,
    backbone_heads: int,
    decoder_heads: int,
    patch_bias: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits, video feature) of videos (B, T, 3, H, W)."""
    batch, frames = video.shape[:2]
    depth = len({k.split(".")[2] for k in evl if k.startswith("decoder.decoder_layers.")})
    blocks = ref_backbone(clip, video.flatten(0, 1), backbone_heads, patch_bias)[-depth:]
    width = evl["decoder.cls_token"].shape[0]
    x = evl["decoder.cls_token"].expand(batch, 1, width)
    for i, (out, q, k) in enumerate(blocks):
        out, q, k = (t.reshape(batch, frames, *t.shape[1:]) for t in (out, q, k))  # (B, T, L, ...)
        tokens = out.clone()
        if f"decoder.temporal_conv.{i}.weight" in evl:  # y[t] = w0 x[t-1] + w1 x[t] + w2 x[t+1] + b
            w, bias = evl[f"decoder.temporal_conv.{i}.weight"][:, 0], evl[f"decoder.temporal_conv.{i}.bias"]
            zero = torch.zeros_like(out[:, :1])
            before, after = torch.cat([zero, out[:, :-1]], 1), torch.cat([out[:, 1:], zero], 1)
            tokens = tokens + before * w[:, 0] + out * w[:, 1] + after * w[:, 2] + bias
        if f"decoder.temporal_pos_embed.{i}" in evl:
            tokens = tokens + evl[f"decoder.temporal_pos_embed.{i}"][None, :, None, :]
        if f"decoder.cross_attention.{i}.w1" in evl:
            grid = math.isqrt(out.shape[2] - 1)
            index = ref_relative_index(grid)
            for t in range(frames):
                for other, name in ((t - 1, "w1"), (t + 1, "w2")):
                    if not 0 <= other < frames:
                        continue
                    qt, ko = q[:, t, 1:], k[:, other, 1:]  # patches only: (B, P, H, d)
                    scores = torch.einsum("nqhd,nkhd->nqkh", qt, ko) / math.sqrt(qt.shape[-1])
                    affinity = ref_softmax(scores, dim=2).mean(-1)  # (B, P, P)
                    table = evl[f"decoder.cross_attention.{i}.{name}"][index]  # (P, P, D)
                    added = torch.zeros_like(tokens)
                    added[:, t, 1:] = torch.einsum("nqk,qkc->nqc", affinity, table)
                    tokens = tokens + added
        d = {k.removeprefix(f"decoder.decoder_layers.{i}."): v for k, v in evl.items()}
        memory = ref_layer_norm(tokens.reshape(batch, -1, width), d["norm3.weight"], d["norm3.bias"])
        y = ref_layer_norm(x, d["norm1.weight"], d["norm1.bias"])
        attended = ref_attention(
            ref_linear(y, d["attn.q_proj.weight"], d["attn.q_proj.bias"]),
            ref_linear(memory, d["attn.k_proj.weight"], d["attn.k_proj.bias"]),
            ref_linear(memory, d["attn.v_proj.weight"], d["attn.v_proj.bias"]),
            decoder_heads,
        )
        x = x + ref_linear(attended, d["attn.out_proj.weight"], d["attn.out_proj.bias"])
        y = ref_layer_norm(x, d["norm2.weight"], d["norm2.bias"])
        x = x + ref_linear(
            ref_quick_gelu(ref_linear(y, d["mlp.fc1.weight"], d["mlp.fc1.bias"])),
            d["mlp.fc2.weight"],
            d["mlp.fc2.bias"],
        )
    feature = x[:, 0]
    head = ref_layer_norm(feature, evl["proj.0.weight"], evl["proj.0.bias"])
    return ref_linear(head, evl["proj.2.weight"], evl["proj.2.bias"]), feature


# ---- Geometries --------------------------------------------------------------------------------------------

# width, backbone layers, patch, image, frames, decoder layers, decoder qkv width, decoder heads (None: the
# default width // 64), temporal modules on (c conv, p pos. embed, a cross-attn), backbone file layout
CASES = {
    "w64-p8-all": (64, 3, 8, 32, 4, 2, 64, 4, "cpa", "visual.pth"),
    "w128-p16-conv-attn": (128, 2, 16, 64, 3, 2, 96, 3, "ca", "bare.safetensors"),
    "w32-p8-pos": (32, 3, 8, 48, 2, 3, 32, None, "p", "visual.safetensors"),
    "w64-p16-none-8f": (64, 2, 16, 32, 8, 1, 64, 2, "", "bare.pth"),
    "w64-p8-attn-1layer-backbone": (64, 1, 8, 24, 5, 1, 128, None, "a", "visual.pth"),
}


def write_case(tmp_path, name: str, seed: int = 0):
    width, layers, patch, image, frames, depth, qkv, heads, temporal, layout = CASES[name]
    clip = clip_visual(width, layers, patch, image, seed)
    evl = evl_decoder(width, image // patch, frames, depth, qkv, 7, temporal, seed + 1)
    prefix, ext = layout.split(".")
    backbone, checkpoint = tmp_path / f"clip.{ext}", tmp_path / "evl.pth"
    save_tensors(str(backbone), {f"visual.{k}" if prefix == "visual" else k: v for k, v in clip.items()})
    save_evl_checkpoint(str(checkpoint), evl)
    video = torch.randn(2, frames, 3, image, image, generator=torch.Generator().manual_seed(seed + 2))
    expected = ref_evl(clip, evl, video, max(1, width // 64), heads or max(1, qkv // 64))
    return backbone, checkpoint, heads, video, expected


def load_case(tmp_path, name: str) -> tuple[EVLModel, torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    backbone, checkpoint, heads, video, expected = write_case(tmp_path, name)
    return (
        EVLModel.from_original(backbone=backbone, checkpoint=checkpoint, decoder_num_heads=heads),
        video,
        expected,
    )


def assert_close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    assert actual.shape == expected.shape
    assert (actual - expected).abs().max().item() < TOLERANCE


# ---- Fidelity ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", CASES)
def test_from_original_matches_the_reference(tmp_path, name):
    model, video, (logits, feature) = load_case(tmp_path, name)
    width, layers, patch, image, frames, depth, qkv, heads, temporal, _ = CASES[name]
    config = model.config
    assert (config.vision_config.hidden_size, config.vision_config.num_hidden_layers) == (width, layers)
    assert (config.vision_config.patch_size, config.vision_config.image_size) == (patch, image)
    assert (config.decoder_config.num_layers, config.decoder_config.attention_dim) == (depth, qkv)
    assert config.decoder_config.num_attention_heads == (heads or max(1, qkv // 64))
    assert config.decoder_config.temporal_conv == ("c" in temporal)
    assert config.decoder_config.temporal_position_embedding == ("p" in temporal)
    assert config.decoder_config.temporal_cross_attention == ("a" in temporal)
    assert config.num_classes == 7
    if "p" in temporal:
        assert config.num_frames == frames
    with torch.no_grad():
        assert_close(model(video), logits)
        assert_close(model.get_video_features(video), feature)


def test_without_temporal_position_embedding_any_frame_count_works(tmp_path):
    model, video, _ = load_case(tmp_path, "w128-p16-conv-attn")
    with torch.no_grad():
        assert model(video[:, :2]).shape == (2, 7)
    model, video, _ = load_case(tmp_path, "w64-p8-all")
    with pytest.raises(ValueError, match="takes 4 frames per video"):
        model(video[:, :2])


def test_fine_tuned_backbone_in_the_checkpoint_wins(tmp_path):
    """``--finetune_backbone`` checkpoints also hold EVL's own ViT (``backbone.*``): it is used."""
    width, patch, image = 64, 8, 32
    clip = clip_visual(width, 2, patch, image, seed=5)
    evl = evl_decoder(width, image // patch, 3, 2, width, 4, "cpa", seed=6)
    patch_bias = torch.randn(width) * 0.2  # trainable in EVL's ViT, zero when converted from CLIP
    backbone = {
        "backbone.cls_token": clip["class_embedding"],
        "backbone.pos_embed": clip["positional_embedding"],
        "backbone.patch_embed.proj.weight": clip["conv1.weight"].flatten(1),
        "backbone.patch_embed.proj.bias": patch_bias,
        "backbone.ln_pre.weight": clip["ln_pre.weight"],
        "backbone.ln_pre.bias": clip["ln_pre.bias"],
    }
    for i in range(2):
        c, e = f"transformer.resblocks.{i}.", f"backbone.blocks.{i}."
        for qkv, w, b in zip(
            "qkv",
            clip[c + "attn.in_proj_weight"].chunk(3),
            clip[c + "attn.in_proj_bias"].chunk(3),
            strict=True,
        ):
            backbone |= {e + f"attn.{qkv}_proj.weight": w, e + f"attn.{qkv}_proj.bias": b}
        for ours, theirs in [
            ("attn.out_proj", "attn.out_proj"),
            ("norm1", "ln_1"),
            ("norm2", "ln_2"),
            ("mlp.fc1", "mlp.c_fc"),
            ("mlp.fc2", "mlp.c_proj"),
        ]:
            backbone |= {e + f"{ours}.{p}": clip[c + f"{theirs}.{p}"] for p in ("weight", "bias")}
    checkpoint = str(tmp_path / "finetuned.pth")
    save_evl_checkpoint(checkpoint, evl | backbone)
    other = str(tmp_path / "other.pth")
    torch.save(clip_visual(width, 2, patch, image, seed=99), other)
    video = torch.randn(2, 3, 3, image, image)
    logits, _ = ref_evl(clip, evl, video, 1, 1, patch_bias)

    with pytest.warns(UserWarning, match="fine-tuned backbone.*is not read"):
        model = EVLModel.from_original(backbone=other, checkpoint=checkpoint)
    with torch.no_grad():
        assert_close(model(video), logits)
    model = EVLModel.from_original(backbone=None, checkpoint=checkpoint)
    with torch.no_grad():
        assert_close(model(video), logits)

    del backbone["backbone.blocks.1.norm2.bias"]
    save_evl_checkpoint(checkpoint, evl | backbone)
    with pytest.raises(CheckpointError, match=r"missing: backbone\.blocks\.1\.norm2\.bias"):
        EVLModel.from_original(backbone=None, checkpoint=checkpoint)


def test_xclip_checkpoints_as_backbone(tmp_path):
    """X-CLIP's vision tower less its message tensors, from our directory layout or the original .pth."""
    torch.manual_seed(3)
    config = XCLIPConfig(
        text_config=TextConfig(
            vocab_size=50, hidden_size=64, intermediate_size=256, num_hidden_layers=1, num_attention_heads=1
        ),
        vision_config=VisionConfig(
            hidden_size=64,
            intermediate_size=256,
            num_hidden_layers=2,
            num_attention_heads=1,
            mit_hidden_size=32,
            mit_intermediate_size=64,
            mit_num_attention_heads=1,
            image_size=32,
            patch_size=8,
            num_frames=3,
        ),
        projection_dim=32,
        prompt_layers=1,
        prompt_num_attention_heads=1,
    )
    xclip = XCLIPModel(config)
    directory = tmp_path / "xclip"
    xclip.save_pretrained(directory)
    original = hf_to_original(xclip.state_dict())
    assert any(".message_attn." in key for key in original)
    torch.save({"model": original, "epoch": 3}, tmp_path / "xclip.pth")
    hf_clip = {  # Hugging Face CLIP's names (pre_layrnorm) for the same tower
        k.replace("pre_layernorm", "pre_layrnorm"): v
        for k, v in xclip.state_dict().items()
        if k.startswith("vision_model.") and ".message_" not in k
    }
    safetensors.torch.save_file(hf_clip, tmp_path / "hf_clip.safetensors")

    evl = evl_decoder(64, 4, 3, 2, 64, 5, "cpa", seed=4)
    checkpoint = str(tmp_path / "evl.pth")
    save_evl_checkpoint(checkpoint, evl)
    clip = {k.removeprefix("visual."): v for k, v in original.items() if k.startswith("visual.")}
    video = torch.randn(1, 3, 3, 32, 32)
    logits, _ = ref_evl(clip, evl, video, 1, 1)
    for backbone in (directory, tmp_path / "xclip.pth", tmp_path / "hf_clip.safetensors"):
        model = EVLModel.from_original(backbone=backbone, checkpoint=checkpoint)
        with torch.no_grad():
            assert_close(model(video), logits)


# ---- OpenAI's TorchScript release --------------------------------------------------------------------------


class ResidualAttentionBlock(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.attn = nn.MultiheadAttention(width, heads)
        self.ln_1 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(
            OrderedDict(
                [
                    ("c_fc", nn.Linear(width, 4 * width)),
                    ("gelu", nn.GELU()),
                    ("c_proj", nn.Linear(4 * width, width)),
                ]
            )
        )
        self.ln_2 = nn.LayerNorm(width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.ln_1(x)
        x = x + self.attn(y, y, y, need_weights=False)[0]
        return x + self.mlp(self.ln_2(x))


class ClipTransformer(nn.Module):
    def __init__(self, width: int, layers: int, heads: int):
        super().__init__()
        self.resblocks = nn.Sequential(*[ResidualAttentionBlock(width, heads) for _ in range(layers)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.resblocks(x)


class VisionTransformer(nn.Module):  # the attribute names of OpenAI's clip/model.py
    def __init__(self, width: int, layers: int, patch: int, image: int):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, patch, patch, bias=False)
        self.class_embedding = nn.Parameter(torch.zeros(width))
        self.positional_embedding = nn.Parameter(torch.zeros((image // patch) ** 2 + 1, width))
        self.ln_pre = nn.LayerNorm(width)
        self.transformer = ClipTransformer(width, layers, max(1, width // 64))
        self.ln_post = nn.LayerNorm(width)
        self.proj = nn.Parameter(torch.zeros(width, 16))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x).flatten(2).permute(2, 0, 1)
        x = (
            torch.cat([self.class_embedding.expand(1, x.shape[1], -1), x])
            + self.positional_embedding[:, None]
        )
        x = self.transformer(self.ln_pre(x))
        return self.ln_post(x[0]) @ self.proj


class CLIP(nn.Module):
    def __init__(self, width: int, layers: int, patch: int, image: int):
        super().__init__()
        self.visual = VisionTransformer(width, layers, patch, image)
        self.logit_scale = nn.Parameter(torch.ones([]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.visual(x) * self.logit_scale


@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::torch.jit.TracerWarning")
def test_torchscript_backbone_is_read_without_running_it(tmp_path):
    width, layers, patch, image = 64, 2, 8, 32
    clip = clip_visual(width, layers, patch, image, seed=7)
    module = CLIP(width, layers, patch, image)
    module.visual.load_state_dict(clip)
    traced = torch.jit.trace(module.eval(), torch.randn(1, 3, image, image)).half()  # OpenAI ships fp16
    path = str(tmp_path / "ViT-test.pt")
    torch.jit.save(traced, path)

    tensors = read_torchscript(ModelSource(path))
    loaded = torch.jit.load(path).state_dict()  # the file is ours: running it is fine here
    assert tensors.keys() == loaded.keys()
    assert all(torch.equal(tensors[k], loaded[k]) for k in loaded)

    evl = evl_decoder(width, image // patch, 3, 2, width, 5, "cpa", seed=8)
    checkpoint = str(tmp_path / "evl.pth")
    save_evl_checkpoint(checkpoint, evl)
    video = torch.randn(2, 3, 3, image, image)
    logits, _ = ref_evl({k: v.half().float() for k, v in clip.items()}, evl, video, 1, 1)
    model = EVLModel.from_original(backbone=path, checkpoint=checkpoint)
    with torch.no_grad():
        assert_close(model(video), logits)

    short = tmp_path / "short.pt"  # one storage cut short
    with zipfile.ZipFile(path) as archive, zipfile.ZipFile(short, "w") as copy:
        for member in archive.namelist():
            data = archive.read(member)
            copy.writestr(member, data[:-2] if member.endswith("/data/0") else data)
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        EVLModel.from_original(backbone=short, checkpoint=checkpoint)
    cut = tmp_path / "cut.pt"  # a download that stopped half way
    cut.write_bytes(Path(path).read_bytes()[:-300])
    with pytest.raises(CheckpointError, match="truncated, corrupt or not a checkpoint"):
        EVLModel.from_original(backbone=cut, checkpoint=checkpoint)


class RunsCode:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_torchscript_archive_that_would_run_code_is_refused(tmp_path):
    marker = tmp_path / "ran"
    path = tmp_path / "evil.pt"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("evil/data.pkl", pickle.dumps(RunsCode(str(marker)), protocol=2))
        archive.writestr("evil/constants.pkl", pickle.dumps((), protocol=2))
    evl = str(tmp_path / "evl.pth")
    save_evl_checkpoint(evl, evl_decoder(64, 4, 3, 1, 64, 5, "", seed=0))
    with pytest.raises(CheckpointError, match=r"refused to load: its pickle calls posix\.system"):
        EVLModel.from_original(backbone=path, checkpoint=evl)
    assert not marker.exists()


# ---- Checkpoints of our own --------------------------------------------------------------------------------


def test_save_pretrained_round_trip_local_and_memory(tmp_path):
    model, video, (logits, _) = load_case(tmp_path, "w64-p8-all")
    model.save_pretrained(tmp_path / "saved")
    assert EVLConfig.from_json_file(tmp_path / "saved" / "config.json") == model.config
    root = f"memory://evl-{uuid.uuid4().hex}/model"
    model.save_pretrained(root)
    try:
        for src in (tmp_path / "saved", root):
            loaded = EVLModel.from_pretrained(src)
            assert loaded.config == model.config
            assert loaded.weights_sha256() == model.weights_sha256()
            assert loaded.identity.family == "evl"
            with torch.no_grad():
                assert_close(loaded(video), logits)
    finally:
        fsspec.filesystem("memory").rm(root.removeprefix("memory://").split("/")[0], recursive=True)
    half = EVLModel.from_pretrained(tmp_path / "saved", dtype=torch.bfloat16)
    with torch.inference_mode():
        out = half(video.bfloat16())
    assert out.dtype == torch.bfloat16 and (out.float() - logits).abs().max() < 0.5
    with pytest.raises(FileNotFoundError, match="from_original"):
        EVLModel.from_pretrained(tmp_path / "evl.pth")


def tiny_config(**decoder: object) -> EVLConfig:
    return EVLConfig(
        vision_config=EVLVisionConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=32,
            patch_size=8,
        ),
        decoder_config=EVLDecoderConfig(
            num_layers=2, attention_dim=32, num_attention_heads=2, intermediate_size=64, **decoder
        ),
        num_frames=3,
        num_classes=5,
    )


def test_backbone_is_frozen_and_gets_no_gradients(tmp_path):
    model = EVLModel(tiny_config()).train()
    model.save_pretrained(tmp_path / "m")
    for candidate in (model, EVLModel.from_pretrained(tmp_path / "m").train()):
        trainable = [name for name, p in candidate.named_parameters() if p.requires_grad]
        assert trainable and all(name.startswith(("decoder.", "head.")) for name in trainable)
        assert not any(p.requires_grad for p in candidate.vision_model.parameters())
        candidate(torch.randn(2, 3, 3, 32, 32)).logsumexp(-1).sum().backward()
        assert all(p.grad is None for p in candidate.vision_model.parameters())
        assert all(p.grad is not None for p in candidate.decoder.parameters())
        assert all(p.grad is not None for p in candidate.head.parameters())


def test_initialization_follows_the_original():
    model = EVLModel(tiny_config())
    assert not model.decoder.query_token.any()  # the original never calls its normal init
    temporal = model.decoder.temporal[0]
    assert not temporal.position_embedding.any()
    assert (
        not temporal.cross_attn.previous_frame_weight.any()
        and not temporal.cross_attn.next_frame_weight.any()
    )
    assert not model.decoder.layers[0].cross_attn.q_proj.bias.any()
    assert model.decoder.layers[0].mlp.fc1.bias.abs().max() < 1e-4
    off = EVLModel(
        tiny_config(temporal_conv=False, temporal_position_embedding=False, temporal_cross_attention=False)
    )
    assert not any(".temporal." in key for key in off.state_dict())


# ---- Config ------------------------------------------------------------------------------------------------


def test_config_round_trip_presets_and_validation():
    config = tiny_config()
    data = config.to_dict()
    assert data["model_type"] == "evl"
    assert EVLConfig.from_dict(data) == config
    with pytest.raises(ValueError, match="not an EVL config"):
        EVLConfig.from_dict({**data, "model_type": "xclip"})
    assert len(PRESETS) == 6
    large = evl_preset("k400_vitl14_16f_dec4x1024.pth")
    assert (large.vision_config.hidden_size, large.vision_config.patch_size, large.num_frames) == (
        1024,
        14,
        16,
    )
    assert (large.decoder_config.num_attention_heads, large.decoder_config.num_layers) == (16, 4)
    base = evl_preset("k400_vitb16_32f_dec4x768")
    assert (base.vision_config.num_hidden_layers, base.decoder_config.attention_dim) == (12, 768)
    with pytest.raises(KeyError, match="unknown EVL preset"):
        evl_preset("k400_vith14")
    bad = {
        "divisible by its num_attention_heads": dict(
            decoder_config=replace(config.decoder_config, attention_dim=33)
        ),
        "multiple of patch_size": dict(vision_config=replace(config.vision_config, image_size=36)),
        "last 3 layers, but the backbone has 2": dict(
            decoder_config=replace(config.decoder_config, num_layers=3)
        ),
        "num_frames must be a positive integer": dict(num_frames=0),
        r"classifier_dropout must be in \[0, 1\)": dict(classifier_dropout=1.0),
        "hidden_act 'tanh'": dict(vision_config=replace(config.vision_config, hidden_act="tanh")),
    }
    for message, change in bad.items():
        with pytest.raises(ValueError, match=message):
            replace(config, **change)


# ---- Bad files ---------------------------------------------------------------------------------------------


def rewrite(path: Path, change) -> None:
    state = torch.load(path, weights_only=True)
    change(state.get("model", state))
    torch.save(state, path)


def test_bad_tensors_are_named(tmp_path):
    backbone, checkpoint, heads, _, _ = write_case(tmp_path, "w64-p8-all")
    load = lambda: EVLModel.from_original(backbone=backbone, checkpoint=checkpoint, decoder_num_heads=heads)  # noqa: E731
    pristine = checkpoint.read_bytes()

    rewrite(
        checkpoint,
        lambda sd: sd.__setitem__("module.decoder.decoder_layers.0.mlp.fc2.weight", torch.zeros(3, 3)),
    )
    with pytest.raises(CheckpointError, match=r"mis-shaped: decoder\.decoder_layers\.0\.mlp\.fc2\.weight"):
        load()
    checkpoint.write_bytes(pristine)
    rewrite(checkpoint, lambda sd: sd.pop("module.decoder.decoder_layers.1.norm3.bias"))
    with pytest.raises(
        CheckpointError, match=r"(?s)evl\.pth: .*missing: decoder\.decoder_layers\.1\.norm3\.bias"
    ):
        load()
    checkpoint.write_bytes(pristine)
    rewrite(checkpoint, lambda sd: sd.__setitem__("module.decoder.extra", torch.zeros(1)))
    with pytest.raises(CheckpointError, match=r"unexpected: decoder\.extra"):
        load()
    checkpoint.write_bytes(pristine)
    rewrite(checkpoint, lambda sd: sd.__setitem__("module.decoder.cross_attention.1.w2", torch.zeros(9, 64)))
    with pytest.raises(
        CheckpointError, match=r"decoder\.cross_attention\.1\.w2 \(expected \(49, 64\), got \(9, 64\)\)"
    ):
        load()
    checkpoint.write_bytes(pristine)

    pristine_backbone = backbone.read_bytes()
    rewrite(backbone, lambda sd: sd.pop("visual.transformer.resblocks.0.attn.out_proj.bias"))
    with pytest.raises(
        CheckpointError,
        match=r"(?s)clip\.pth: .*missing: visual\.transformer\.resblocks\.0\.attn\.out_proj\.bias",
    ):
        load()
    backbone.write_bytes(pristine_backbone)
    rewrite(backbone, lambda sd: sd.__setitem__("visual.transformer.resblocks.1.ln_2.weight", torch.zeros(5)))
    with pytest.raises(CheckpointError, match=r"mis-shaped: visual\.transformer\.resblocks\.1\.ln_2\.weight"):
        load()
    torch.save(clip_visual(32, 3, 8, 32, 0), backbone)  # another backbone than the one trained on
    with pytest.raises(CheckpointError, match="decoder is 64 wide.*is 32 wide"):
        load()
    backbone.write_bytes(pristine_backbone)

    with pytest.raises(CheckpointError, match="trained for 4 frames"):
        EVLModel.from_original(backbone=backbone, checkpoint=checkpoint, num_frames=8)
    with pytest.raises(CheckpointError, match="pass backbone= the CLIP weights"):
        EVLModel.from_original(backbone=None, checkpoint=checkpoint)
    with pytest.raises(CheckpointError, match="not an EVL checkpoint"):
        EVLModel.from_original(backbone=backbone, checkpoint=backbone)
    with pytest.raises(CheckpointError, match="not a CLIP image encoder"):
        EVLModel.from_original(backbone=checkpoint, checkpoint=checkpoint)
    with pytest.raises(CheckpointError, match="attention_dim .64. must be divisible"):
        EVLModel.from_original(backbone=backbone, checkpoint=checkpoint, decoder_num_heads=5)
    with pytest.raises(FileNotFoundError):
        EVLModel.from_original(backbone=tmp_path / "nowhere.pt", checkpoint=checkpoint)


def test_unsafe_truncated_and_garbage_files_are_refused(tmp_path):
    backbone, checkpoint, heads, _, _ = write_case(tmp_path, "w64-p8-all")
    marker = tmp_path / "ran"
    evil = tmp_path / "evil.pth"
    torch.save({"model": {"module.decoder.cls_token": torch.zeros(64)}, "hook": RunsCode(str(marker))}, evil)
    with pytest.raises(CheckpointError, match="refused to load.*would run code"):
        EVLModel.from_original(backbone=backbone, checkpoint=evil)
    with pytest.raises(CheckpointError, match="refused to load.*would run code"):
        EVLModel.from_original(backbone=evil, checkpoint=checkpoint)
    assert not marker.exists()

    data = checkpoint.read_bytes()
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(data[: len(data) // 2])
    garbage = tmp_path / "garbage.xyz"
    garbage.write_bytes(os.urandom(4096))
    bad_safetensors = tmp_path / "garbage.safetensors"
    bad_safetensors.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}......")
    for bad in (truncated, garbage, bad_safetensors):
        with pytest.raises(CheckpointError, match="truncated, corrupt or not a checkpoint"):
            EVLModel.from_original(backbone=backbone, checkpoint=bad)
        with pytest.raises(CheckpointError, match="truncated, corrupt or not a checkpoint"):
            EVLModel.from_original(backbone=bad, checkpoint=checkpoint)


def test_forward_rejects_bad_inputs(tmp_path):
    model = EVLModel(tiny_config())
    with pytest.raises(ValueError, match=r"\(batch, frames, 3, H, W\)"):
        model(torch.randn(3, 3, 32, 32))
    with pytest.raises(ValueError, match="3 channels"):
        model(torch.randn(1, 3, 4, 32, 32))
    with pytest.raises(ValueError, match="frames are 24x24"):
        model(torch.randn(1, 3, 3, 24, 24))
