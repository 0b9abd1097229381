"""Tests for ``xclip_core.checkpoints``: safe loading, original <-> Hugging Face layouts, validation, saving.

The mapping is checked against two references: ``transformers.XCLIPModel`` and a transcription of the original
release's modules (github.com/microsoft/VideoX, X-CLIP/models/{xclip,cct,mit,prompt}.py, clip/model.py), which
must accept the converted weights with ``strict=True`` and compute the same features.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import os
import pickle
import pickletools
import random
import re
import subprocess
import sys
import uuid
from collections import Counter, OrderedDict
from collections.abc import Iterator

import fsspec
import pytest
import s3fs
import safetensors.torch
import torch
from fault_proxy import FaultProxy
from torch import nn
from transformers import XCLIPConfig as HFXCLIPConfig
from transformers import XCLIPModel
from yacs.config import CfgNode

from xclip_core.checkpoints import (
    _RESTRICTED_PICKLE,
    _SAFE_FUNCTIONS,
    _SAFE_TYPES,
    CheckpointError,
    check_state_dict,
    config_from_original,
    hf_to_original,
    is_original_layout,
    load_tensors,
    original_to_hf,
    save_safetensors,
)
from xclip_core.config import XCLIPConfig
from xclip_core.model import XCLIPModel as OurModel
from xclip_core.sources import ModelSource

IMAGE, CONTEXT, VOCAB = 32, 16, 99

# Widths >= 64 give the original's width // 64 heads; the 32-wide one only exists in the HF layout (1 head).
GEOMETRIES = {
    "p16-w64": dict(
        text=64, text_layers=1, vision=64, vision_layers=1, patch=16, frames=2, mit=1, prompt=1, proj=64
    ),
    "p8-w128": dict(
        text=64, text_layers=2, vision=128, vision_layers=2, patch=8, frames=4, mit=2, prompt=2, proj=128
    ),
    "p8-w32": dict(
        text=32, text_layers=1, vision=32, vision_layers=2, patch=8, frames=3, mit=2, prompt=1, proj=32
    ),
}
ORIGINAL_COMPATIBLE = ["p16-w64", "p8-w128"]


def hf_config(g: dict) -> HFXCLIPConfig:
    heads = lambda width: max(1, width // 64)  # noqa: E731
    return HFXCLIPConfig(
        text_config=dict(
            vocab_size=VOCAB,
            hidden_size=g["text"],
            intermediate_size=4 * g["text"],
            num_hidden_layers=g["text_layers"],
            num_attention_heads=heads(g["text"]),
            max_position_embeddings=CONTEXT,
        ),
        vision_config=dict(
            hidden_size=g["vision"],
            intermediate_size=4 * g["vision"],
            num_hidden_layers=g["vision_layers"],
            num_attention_heads=heads(g["vision"]),
            image_size=IMAGE,
            patch_size=g["patch"],
            num_frames=g["frames"],
            mit_hidden_size=g["proj"],
            mit_intermediate_size=4 * g["proj"],
            mit_num_hidden_layers=g["mit"],
            mit_num_attention_heads=heads(g["proj"]),
        ),
        projection_dim=g["proj"],
        prompt_layers=g["prompt"],
        prompt_num_attention_heads=heads(g["proj"]),
    )


def hf_model(name: str) -> XCLIPModel:
    """A random model; every parameter is perturbed so that a swapped or untransposed tensor shows."""
    torch.manual_seed(0)
    model = XCLIPModel(hf_config(GEOMETRIES[name])).eval()
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.05 * torch.randn_like(param))
    return model


def inputs(model: XCLIPModel) -> tuple[torch.Tensor, torch.Tensor]:
    frames = model.config.vision_config.num_frames
    generator = torch.Generator().manual_seed(1)
    video = torch.randn(2, frames, 3, IMAGE, IMAGE, generator=generator)
    ids = torch.randint(1, VOCAB - 1, (3, CONTEXT), generator=generator)
    ids[torch.arange(3), torch.tensor([4, 9, CONTEXT - 1])] = VOCAB - 1  # end of text: the largest id
    return video, ids


def features(model: XCLIPModel, video: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, ...]:
    with torch.no_grad():
        return (
            model.get_video_features(pixel_values=video).pooler_output,
            model.get_text_features(input_ids=ids).pooler_output,
            model(input_ids=ids, pixel_values=video).logits_per_video,
        )


# ---- The original modules, transcribed (init, drop path and checkpointing left out) -----------------------


class QuickGELU(nn.Module):
    def forward(self, x):
        return x * torch.sigmoid(1.702 * x)


def clip_mlp(d: int) -> nn.Sequential:
    return nn.Sequential(
        OrderedDict([("c_fc", nn.Linear(d, d * 4)), ("gelu", QuickGELU()), ("c_proj", nn.Linear(d * 4, d))])
    )


class ResidualAttentionBlock(nn.Module):  # clip/model.py and models/mit.py
    def __init__(self, d_model, n_head, attn_mask=None):
        super().__init__()
        self.attn = nn.MultiheadAttention(d_model, n_head)
        self.ln_1 = nn.LayerNorm(d_model)
        self.mlp = clip_mlp(d_model)
        self.ln_2 = nn.LayerNorm(d_model)
        self.attn_mask = attn_mask

    def forward(self, x):
        y = self.ln_1(x)
        x = x + self.attn(y, y, y, need_weights=False, attn_mask=self.attn_mask)[0]
        return x + self.mlp(self.ln_2(x))


class CrossFramelAttentionBlock(nn.Module):  # models/cct.py
    def __init__(self, d_model, n_head, T):
        super().__init__()
        self.T = T
        self.message_fc = nn.Linear(d_model, d_model)
        self.message_ln = nn.LayerNorm(d_model)
        self.message_attn = nn.MultiheadAttention(d_model, n_head)
        self.attn = nn.MultiheadAttention(d_model, n_head)
        self.ln_1 = nn.LayerNorm(d_model)
        self.mlp = clip_mlp(d_model)
        self.ln_2 = nn.LayerNorm(d_model)

    def forward(self, x):
        l, bt, d = x.size()  # noqa: E741
        b = bt // self.T
        x = x.view(l, b, self.T, d)
        msg_token = self.message_fc(x[0, :, :, :])
        msg_token = msg_token.view(b, self.T, 1, d)
        msg_token = msg_token.permute(1, 2, 0, 3).view(self.T, b, d)
        m = self.message_ln(msg_token)
        msg_token = msg_token + self.message_attn(m, m, m, need_weights=False)[0]
        msg_token = msg_token.view(self.T, 1, b, d).permute(1, 2, 0, 3)
        x = torch.cat([x, msg_token], dim=0)
        x = x.view(l + 1, -1, d)
        y = self.ln_1(x)
        x = x + self.attn(y, y, y, need_weights=False)[0]
        x = x[:l, :, :]
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    def __init__(self, blocks):
        super().__init__()
        self.resblocks = nn.Sequential(*blocks)

    def forward(self, x):
        return self.resblocks(x)


class CrossFrameCommunicationTransformer(nn.Module):  # models/cct.py
    def __init__(self, input_resolution, patch_size, width, layers, heads, output_dim, T):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, kernel_size=patch_size, stride=patch_size, bias=False)
        self.class_embedding = nn.Parameter(torch.empty(width))
        self.positional_embedding = nn.Parameter(
            torch.empty((input_resolution // patch_size) ** 2 + 1, width)
        )
        self.ln_pre = nn.LayerNorm(width)
        self.transformer = Transformer([CrossFramelAttentionBlock(width, heads, T) for _ in range(layers)])
        self.ln_post = nn.LayerNorm(width)
        self.proj = nn.Parameter(torch.empty(width, output_dim))

    def forward(self, x):
        x = self.conv1(x)
        x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)
        cls = self.class_embedding + torch.zeros(x.shape[0], 1, x.shape[-1])
        x = torch.cat([cls, x], dim=1) + self.positional_embedding
        x = self.ln_pre(x)
        x = self.transformer(x.permute(1, 0, 2)).permute(1, 0, 2)
        cls_x = self.ln_post(x[:, 0, :]) @ self.proj
        return cls_x, x[:, 1:, :]


class MultiframeIntegrationTransformer(nn.Module):  # models/mit.py
    def __init__(self, T, embed_dim, layers):
        super().__init__()
        self.positional_embedding = nn.Parameter(torch.empty(1, T, embed_dim))
        self.resblocks = nn.Sequential(
            *[ResidualAttentionBlock(embed_dim, embed_dim // 64) for _ in range(layers)]
        )

    def forward(self, x):
        ori_x = x
        x = x + self.positional_embedding
        x = self.resblocks(x.permute(1, 0, 2)).permute(1, 0, 2)
        return (x + ori_x).mean(dim=1, keepdim=False)


class MulitHeadAttention(nn.Module):  # models/prompt.py
    def __init__(self, dim, num_heads):
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.q_proj = nn.Linear(dim, dim, bias=False)
        self.k_proj = nn.Linear(dim, dim, bias=False)
        self.v_proj = nn.Linear(dim, dim, bias=False)
        self.proj = nn.Linear(dim, dim)

    def forward(self, q, k, v):
        B, N, C = q.shape
        B, M, C = k.shape
        q = self.q_proj(q).reshape(B, N, self.num_heads, C // self.num_heads).permute(0, 2, 1, 3)
        k = self.k_proj(k).reshape(B, M, self.num_heads, C // self.num_heads).permute(0, 2, 1, 3)
        v = self.v_proj(v).reshape(B, M, self.num_heads, C // self.num_heads).permute(0, 2, 1, 3)
        attn = ((q @ k.transpose(-2, -1)) * self.scale).softmax(dim=-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(B, N, C))


class PromptGeneratorLayer(nn.Module):
    def __init__(self, d_model, nhead):
        super().__init__()
        self.cross_attn = MulitHeadAttention(d_model, nhead)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm3 = nn.LayerNorm(d_model)
        self.mlp = nn.Sequential(
            nn.Linear(d_model, d_model * 4), QuickGELU(), nn.Dropout(0.0), nn.Linear(d_model * 4, d_model)
        )

    def forward(self, x, visual):
        q = self.norm1(x)
        x = x + self.cross_attn(q, visual, visual)
        return x + self.mlp(self.norm3(x))


class VideoSpecificPrompt(nn.Module):
    def __init__(self, layers, embed_dim):
        super().__init__()
        self.norm = nn.LayerNorm(embed_dim)
        self.decoder = nn.ModuleList(
            [PromptGeneratorLayer(embed_dim, embed_dim // 64) for _ in range(layers)]
        )
        self.alpha = nn.Parameter(torch.empty(embed_dim))

    def forward(self, text, visual):
        visual = self.norm(visual)
        for layer in self.decoder:
            text = layer(text, visual)
        return self.alpha * text


class OriginalXCLIP(nn.Module):  # models/xclip.py
    def __init__(self, embed_dim, image_resolution, vision_layers, vision_width, vision_patch_size,
                 context_length, vocab_size, transformer_width, transformer_heads, transformer_layers,
                 T, mit_layers, prompts_layers):  # fmt: skip
        super().__init__()
        self.prompts_generator = VideoSpecificPrompt(prompts_layers, embed_dim)
        self.mit = MultiframeIntegrationTransformer(T, embed_dim, mit_layers)
        self.visual = CrossFrameCommunicationTransformer(
            image_resolution, vision_patch_size, vision_width, vision_layers, vision_width // 64, embed_dim, T
        )
        mask = torch.empty(context_length, context_length).fill_(float("-inf")).triu_(1)
        self.transformer = Transformer(
            [
                ResidualAttentionBlock(transformer_width, transformer_heads, mask)
                for _ in range(transformer_layers)
            ]
        )
        self.token_embedding = nn.Embedding(vocab_size, transformer_width)
        self.positional_embedding = nn.Parameter(torch.empty(context_length, transformer_width))
        self.ln_final = nn.LayerNorm(transformer_width)
        self.text_projection = nn.Parameter(torch.empty(transformer_width, embed_dim))
        self.logit_scale = nn.Parameter(torch.ones([]))
        self.prompts_visual_ln = nn.LayerNorm(vision_width)
        self.prompts_visual_proj = nn.Parameter(torch.empty(vision_width, embed_dim))

    def encode_text(self, text):
        x = self.token_embedding(text) + self.positional_embedding
        x = self.transformer(x.permute(1, 0, 2)).permute(1, 0, 2)
        x = self.ln_final(x)
        return x[torch.arange(x.shape[0]), text.argmax(dim=-1)] @ self.text_projection

    def encode_video(self, image):
        b, t, c, h, w = image.size()
        cls_features, img_features = self.visual(image.reshape(-1, c, h, w))
        img_features = self.prompts_visual_ln(img_features) @ self.prompts_visual_proj
        cls_features = cls_features.view(b, t, -1)
        img_features = img_features.view(b, t, -1, cls_features.shape[-1])
        return self.mit(cls_features), img_features

    def forward(self, image, text):
        b = image.shape[0]
        video_features, img_features = self.encode_video(image)
        img_features = img_features.mean(dim=1, keepdim=False)
        text_features = self.encode_text(text).unsqueeze(0).expand(b, -1, -1)
        text_features = text_features + self.prompts_generator(text_features, img_features)
        video_features = video_features / video_features.norm(dim=-1, keepdim=True)
        text_features = text_features / text_features.norm(dim=-1, keepdim=True)
        return torch.einsum("bd,bkd->bk", video_features, self.logit_scale.exp() * text_features)


def build_original(state_dict: dict, T: int, mit_layers: int, prompts_layers: int) -> OriginalXCLIP:
    """``build_model`` from models/xclip.py (ViT branch); T and the layer counts come from its yacs config."""
    vision_width = state_dict["visual.conv1.weight"].shape[0]
    vision_layers = len(
        [k for k in state_dict if k.startswith("visual.") and k.endswith(".attn.in_proj_weight")]
    )
    vision_patch_size = state_dict["visual.conv1.weight"].shape[-1]
    grid_size = round((state_dict["visual.positional_embedding"].shape[0] - 1) ** 0.5)
    transformer_width = state_dict["ln_final.weight"].shape[0]
    model = OriginalXCLIP(
        state_dict["text_projection"].shape[1],
        vision_patch_size * grid_size,
        vision_layers,
        vision_width,
        vision_patch_size,
        state_dict["positional_embedding"].shape[0],
        state_dict["token_embedding.weight"].shape[0],
        transformer_width,
        transformer_width // 64,
        len({k.split(".")[2] for k in state_dict if k.startswith("transformer.resblocks")}),
        T=T,
        mit_layers=mit_layers,
        prompts_layers=prompts_layers,
    )
    model.load_state_dict(state_dict, strict=True)
    return model.eval()


# ---- Layout conversion ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", GEOMETRIES)
def test_hf_original_round_trip_and_geometry(name):
    model = hf_model(name)
    hf = model.state_dict()
    original = hf_to_original(hf)
    back = original_to_hf(original)
    assert back.keys() == hf.keys()
    assert all(torch.equal(back[k], hf[k]) for k in hf)
    assert hf_to_original(back).keys() == original.keys()
    assert is_original_layout(original) and not is_original_layout(hf)
    assert config_from_original(original) == XCLIPConfig.from_dict(model.config.to_dict())


@pytest.mark.parametrize("name", GEOMETRIES)
def test_original_key_names(name):
    g = GEOMETRIES[name]
    original = hf_to_original(hf_model(name).state_dict())
    w, t, p, proj = g["vision"], g["text"], g["patch"], g["proj"]
    expected = {
        "visual.conv1.weight": (w, 3, p, p),
        "visual.class_embedding": (w,),
        "visual.positional_embedding": ((IMAGE // p) ** 2 + 1, w),
        "visual.transformer.resblocks.0.attn.in_proj_weight": (3 * w, w),
        "visual.transformer.resblocks.0.attn.in_proj_bias": (3 * w,),
        "visual.transformer.resblocks.0.message_attn.in_proj_weight": (3 * w, w),
        "visual.transformer.resblocks.0.message_fc.weight": (w, w),
        "visual.transformer.resblocks.0.mlp.c_fc.weight": (4 * w, w),
        "visual.proj": (w, proj),
        "transformer.resblocks.0.attn.in_proj_weight": (3 * t, t),
        "transformer.resblocks.0.ln_1.weight": (t,),
        "positional_embedding": (CONTEXT, t),
        "token_embedding.weight": (VOCAB, t),
        "text_projection": (t, proj),
        "mit.positional_embedding": (1, g["frames"], proj),
        "mit.resblocks.0.attn.in_proj_weight": (3 * proj, proj),
        "prompts_visual_ln.weight": (w,),
        "prompts_visual_proj": (w, proj),
        "prompts_generator.norm.weight": (proj,),
        "prompts_generator.alpha": (proj,),
        "prompts_generator.decoder.0.cross_attn.q_proj.weight": (proj, proj),
        "logit_scale": (),
    }
    assert {k: tuple(original[k].shape) for k in expected} == expected
    assert not any("q_proj" in k for k in original if not k.startswith("prompts_generator."))


@pytest.mark.parametrize("name", ORIGINAL_COMPATIBLE)
def test_mapping_matches_the_original_code(name):
    g = GEOMETRIES[name]
    model = hf_model(name)
    original = build_original(hf_to_original(model.state_dict()), g["frames"], g["mit"], g["prompt"])
    video, ids = inputs(model)
    hf_video, hf_text, hf_logits = features(model, video, ids)
    with torch.no_grad():
        torch.testing.assert_close(original.encode_video(video)[0], hf_video, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(original.encode_text(ids), hf_text, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(original(video, ids), hf_logits, atol=1e-4, rtol=1e-4)


def test_config_from_original_frames_and_errors():
    original = hf_to_original(hf_model("p16-w64").state_dict())
    assert config_from_original(original, num_frames=2).vision_config.num_frames == 2
    with pytest.raises(CheckpointError, match="trained for 2 frames"):
        config_from_original(original, num_frames=8)
    del original["ln_final.weight"]
    with pytest.raises(CheckpointError, match="ln_final.weight"):
        config_from_original(original)


def test_hf_to_original_needs_all_of_qkv():
    hf = hf_model("p16-w64").state_dict()
    del hf["mit.encoder.layers.0.self_attn.k_proj.bias"]
    with pytest.raises(CheckpointError, match=r"mit\.resblocks\.0\.attn.*k_proj"):
        hf_to_original(hf)


# ---- Loading original-release snapshots -------------------------------------------------------------------


def training_config(g: dict) -> CfgNode:
    """A config as X-CLIP's utils/config.py makes one: yacs defaults in nested nodes, cloned, the run's values
    merged in and the whole frozen. Each node holds an empty ``set`` (yacs' deprecated keys)."""
    defaults = CfgNode()
    defaults.BASE = [""]
    defaults.DATA = CfgNode()
    defaults.DATA.DATASET = "kinetics400"
    defaults.DATA.INPUT_SIZE = 224
    defaults.DATA.NUM_FRAMES = 8
    defaults.DATA.LABEL_LIST = "labels/kinetics_400_labels.csv"
    defaults.MODEL = CfgNode()
    defaults.MODEL.ARCH = "ViT-B/32"
    defaults.MODEL.DROP_PATH_RATE = 0.0
    defaults.MODEL.PRETRAINED = None
    defaults.MODEL.FIX_TEXT = True
    defaults.TRAIN = CfgNode()
    defaults.TRAIN.EPOCHS = 30
    defaults.TRAIN.WEIGHT_DECAY = 0.001
    defaults.TRAIN.LR = 8e-6
    defaults.TRAIN.OPTIMIZER = "adamw"
    defaults.OUTPUT = ""
    defaults.SEED = 1024
    config = defaults.clone()
    config.merge_from_list(["DATA.NUM_FRAMES", g["frames"], "DATA.INPUT_SIZE", IMAGE, "OUTPUT", "exp/k400"])
    config.LOCAL_RANK = 0
    config.freeze()
    return config


def train_one_step(
    model: OriginalXCLIP, video: torch.Tensor, ids: torch.Tensor
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """AdamW and a learning-rate schedule as X-CLIP's utils/optimizer.py sets them up (text encoder frozen,
    weight decay on matrices only), after one training step."""
    for name, param in model.named_parameters():
        param.requires_grad = name.startswith(("visual.", "mit.", "prompts"))
    trained = [param for param in model.parameters() if param.requires_grad]
    groups = [
        {"params": [p for p in trained if p.ndim > 1], "weight_decay": 0.001},
        {"params": [p for p in trained if p.ndim <= 1], "weight_decay": 0.0},
    ]
    optimizer = torch.optim.AdamW(groups, lr=8e-6, betas=(0.9, 0.98), eps=1e-8)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=30)
    model(video, ids).logsumexp(dim=-1).mean().backward()
    optimizer.step()
    scheduler.step()
    return optimizer, scheduler


def training_snapshot(model: XCLIPModel, name: str) -> dict:
    """What X-CLIP's utils/tools.py ``epoch_saving`` saves for ``model``: its weights in the original layout,
    the optimizer and scheduler of a run that trains it, and the run's yacs config."""
    g = GEOMETRIES[name]
    state_dict = hf_to_original(model.state_dict())
    # the run's model is a copy: its training step leaves the weights saved here as they are
    optimizer, scheduler = train_one_step(
        build_original(state_dict, g["frames"], g["mit"], g["prompt"]), *inputs(model)
    )
    return {
        "model": state_dict,
        "optimizer": optimizer.state_dict(),
        "lr_scheduler": scheduler.state_dict(),
        "max_accuracy": 81.3,
        "epoch": 29,
        "config": training_config(g),
    }


@pytest.fixture(params=["local", "memory"])
def snapshot_dir(request, tmp_path) -> Iterator[str]:
    """A directory for snapshots: a local one (memory-mapped) or an fsspec one in memory (read whole)."""
    if request.param == "local":
        yield str(tmp_path)
        return
    root = f"memory://snapshots-{uuid.uuid4().hex}"
    yield root
    fsspec.filesystem("memory").rm(root.removeprefix("memory://"), recursive=True)


@pytest.mark.parametrize("zipfile", [True, False], ids=["zip", "legacy"])
def test_load_original_snapshot_into_transformers(tmp_path, monkeypatch, zipfile):
    model = hf_model("p8-w128")
    path = tmp_path / "best.pth"
    torch.save(training_snapshot(model, "p8-w128"), path, _use_new_zipfile_serialization=zipfile)
    with pytest.raises(Exception, match="yacs"):  # the reason for the restricted loader
        torch.load(path, weights_only=True)

    with monkeypatch.context() as m:  # the config's class is never imported: importing yacs now fails
        m.setitem(sys.modules, "yacs", None)
        m.setitem(sys.modules, "yacs.config", None)
        loaded = load_tensors(path)
    assert is_original_layout(loaded)
    fresh = XCLIPModel(hf_config(GEOMETRIES["p8-w128"])).eval()
    fresh.load_state_dict(original_to_hf(loaded), strict=True)
    for ours, theirs in zip(features(fresh, *inputs(model)), features(model, *inputs(model)), strict=True):
        assert torch.equal(ours, theirs)


# Protocol 2 pickles the config's sets as calls of __builtin__.set, protocol 3 of builtins.set.
@pytest.mark.filterwarnings("ignore:Detected pickle protocol 3")
@pytest.mark.parametrize("protocol", [2, 3], ids=["__builtin__", "builtins"])
def test_from_pretrained_reads_an_original_training_snapshot(snapshot_dir, protocol):
    model = hf_model("p8-w128")
    with fsspec.open(f"{snapshot_dir}/best.pth", "wb") as f:
        torch.save(training_snapshot(model, "p8-w128"), f, pickle_protocol=protocol)
    ours = OurModel.from_pretrained(f"{snapshot_dir}/best.pth")
    video, ids = inputs(model)
    with torch.no_grad():
        found = ours.get_video_features(video), ours.get_text_features(ids), ours(ids, video).logits_per_video
    for ours_value, reference in zip(found, features(model, video, ids), strict=True):
        torch.testing.assert_close(ours_value, reference, atol=1e-4, rtol=0)  # test_model_parity's bound


#: Prints the peak memory that loading the checkpoint argv[2] adds to loading argv[1] first (which takes what
#: the first load costs: imports, torch's kernels). The peak is the process's VmHWM: unlike ru_maxrss, which
#: Linux carries over from the parent (pytest) through fork and exec, it starts anew in a new program.
MEASURE_LOAD = """
import sys
from xclip_core import XCLIPModel

def peak_mib():
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmHWM:")) / 1024

XCLIPModel.from_pretrained(sys.argv[1])
before = peak_mib()
XCLIPModel.from_pretrained(sys.argv[2])
print(peak_mib() - before)
"""


@pytest.mark.skipif(sys.platform != "linux", reason="reads the peak memory from Linux's /proc")
def test_loading_a_snapshot_does_not_read_its_optimizer_state(tmp_path):
    snapshot = training_snapshot(hf_model("p16-w64"), "p16-w64")
    torch.save(snapshot, tmp_path / "small.pth")
    optimizer_mib = 128
    moments = torch.ones(optimizer_mib * 2**20 // 8)  # float32: two of them make optimizer_mib
    snapshot["optimizer"]["state"][0].update(exp_avg=moments, exp_avg_sq=moments.clone())
    torch.save(snapshot, tmp_path / "best.pth")
    del snapshot, moments
    command = [sys.executable, "-c", MEASURE_LOAD, str(tmp_path / "small.pth"), str(tmp_path / "best.pth")]
    grown = float(subprocess.run(command, capture_output=True, text=True, check=True).stdout)
    assert grown < optimizer_mib / 4, f"peak memory grew {grown:.0f} MiB"


def test_tensors_read_from_a_memory_map_are_copies(tmp_path):
    weights = {"w": torch.arange(4096.0)}
    path = tmp_path / "pytorch_model.bin"
    torch.save(weights, path)
    loaded = load_tensors(path)
    with open(path, "r+b") as f:  # overwritten in place: a view of the mapped file would now read zeros
        f.write(bytes(path.stat().st_size))
    assert torch.equal(loaded["w"], weights["w"])


def test_state_dict_selection(tmp_path):
    weights = {"module.a": torch.ones(2), "module.b": torch.zeros(1)}
    torch.save({"state_dict": weights, "epoch": 1}, tmp_path / "a.pt")
    assert load_tensors(tmp_path / "a.pt").keys() == {"a", "b"}
    torch.save(weights, tmp_path / "b.bin")
    assert load_tensors(str(tmp_path), "b.bin").keys() == {"a", "b"}
    torch.save({"epoch": 1, "model": {"a": "not a tensor"}}, tmp_path / "c.pth")
    with pytest.raises(CheckpointError, match=r"c\.pth: no state dict found.*'epoch', 'model'"):
        load_tensors(tmp_path / "c.pth")


# ---- Restricted unpickling --------------------------------------------------------------------------------


class Call:
    """Pickles as ``function(*args)``: the call a pickle makes when it is loaded."""

    def __init__(self, function, *args):
        self.function, self.args = function, args

    def __call__(self):  # the pickler only saves callables; loading the pickle is what would call it
        raise AssertionError("never called")

    def __reduce__(self):
        return self.function, self.args


def code_runners(marker) -> dict[str, Call]:
    """Calls that would run code, by the name of what they call; most would create ``marker``."""
    python = f"open({str(marker)!r}, 'w').close()"
    return {
        "os.system": Call(os.system, f"touch {marker}"),
        "subprocess.Popen": Call(subprocess.Popen, ["touch", str(marker)]),
        "builtins.exec": Call(exec, python),
        "builtins.eval": Call(eval, python),
        # the way out of an allowed function: its globals hold modules such as os
        "builtins.getattr": Call(getattr, torch._utils._rebuild_tensor_v2, "__globals__"),
    }


@pytest.mark.filterwarnings("ignore:Detected pickle protocol 3")
@pytest.mark.parametrize("protocol", [2, 3])
@pytest.mark.parametrize("payload", list(code_runners("marker")))
def test_pickle_that_runs_code_is_refused(tmp_path, payload, protocol):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    exploit = code_runners(marker)[payload]
    torch.save({"model": {"w": torch.ones(2)}, "config": exploit}, path, pickle_protocol=protocol)
    # Named as pickled: os.system is posix.system; protocol 2 writes builtins as __builtin__ and subprocess
    # as commands (Python 2's names).
    [called] = pickled_globals(pickle.dumps(exploit.function, protocol))
    with pytest.raises(CheckpointError, match=rf"evil\.pth: refused to load: its pickle calls {called}\b"):
        load_tensors(path)
    assert not marker.exists()


def pickled_globals(data: bytes) -> set[str]:
    return {arg.replace(" ", ".") for op, arg, _ in pickletools.genops(data) if op.name == "GLOBAL"}


@pytest.mark.parametrize("protocol, builtins", [(2, "__builtin__"), (3, "builtins")])
def test_plain_data_loads_under_both_names_of_builtins(protocol, builtins):
    values = [{1, "a"}, frozenset({2.5}), b"\x00\xff", b"", bytearray(b"x"), 1 - 2j, Counter("abca")]
    data = pickle.dumps(values, protocol)
    assert {f"{builtins}.set", f"{builtins}.frozenset", f"{builtins}.complex"} <= pickled_globals(data)
    loaded = _RESTRICTED_PICKLE.load(io.BytesIO(data))
    assert loaded == values and list(map(type, loaded)) == list(map(type, values))


@pytest.mark.parametrize("qualified", sorted(_SAFE_TYPES | _SAFE_FUNCTIONS))
def test_restricted_unpickler_hands_out_nothing_a_pickle_can_modify(qualified):
    module, name = qualified.rsplit(".", 1)
    # GLOBAL module.name, then BUILD setting its attribute "patched" (a slot state).
    patch = f"\x80\x02c{module}\n{name}\nN}}X\x07\x00\x00\x00patchedK\x01s\x86b.".encode("latin-1")
    with contextlib.suppress(TypeError, AttributeError):  # C types and dtypes refuse new attributes
        _RESTRICTED_PICKLE.load(io.BytesIO(patch))  # a function is handed out as a wrapper, which takes it
    assert not hasattr({**_SAFE_TYPES, **_SAFE_FUNCTIONS}[qualified], "patched")


# ---- Corrupt files ----------------------------------------------------------------------------------------


def test_truncated_and_random_files(tmp_path):
    weights = {"w": torch.randn(64, 64), "b": torch.randn(64)}
    save_safetensors(weights, tmp_path / "model.safetensors")
    torch.save({"model": weights, "epoch": 1}, tmp_path / "zip.pth")
    torch.save({"model": weights, "epoch": 1}, tmp_path / "legacy.pth", _use_new_zipfile_serialization=False)
    for name in ("model.safetensors", "zip.pth", "legacy.pth"):
        data = (tmp_path / name).read_bytes()
        (tmp_path / name).write_bytes(data[: len(data) // 2])
        with pytest.raises(CheckpointError, match=rf"{re.escape(name)} is truncated, corrupt or not"):
            load_tensors(tmp_path / name)
    noise = random.Random(0).randbytes(4096)
    for name in ("noise.pth", "noise.safetensors"):
        (tmp_path / name).write_bytes(noise)
        with pytest.raises(CheckpointError, match="truncated, corrupt or not a checkpoint"):
            load_tensors(tmp_path / name)


def test_truncated_checkpoint_directory_fails_before_loading(tmp_path):
    hf_model("p16-w64").save_pretrained(tmp_path)
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])
    with pytest.raises(CheckpointError, match=r"model\.safetensors is truncated.*past the end"):
        OurModel.from_pretrained(tmp_path)


def test_safetensors_header_that_lies_about_a_tensor(tmp_path):
    data = bytearray(1024)
    header = b'{"w": {"dtype": "F32", "shape": [4, 4], "data_offsets": [0, 32]}}'
    path = tmp_path / "lies.safetensors"
    path.write_bytes(len(header).to_bytes(8, "little") + header + data)
    with pytest.raises(CheckpointError, match=r"tensor 'w': bytes 0\.\.32 do not hold a F32 \[4, 4\]"):
        load_tensors(path)


def test_every_safetensors_dtype_reads_back_exactly(tmp_path):
    from xclip_core.safetensors_reader import DTYPES

    torch.manual_seed(0)
    tensors = {name: (torch.randn(3, 5) * 100).to(dtype) for name, dtype in DTYPES.items()}
    tensors["empty"] = torch.zeros(0, 4)
    tensors["scalar"] = torch.tensor(2.5)
    save_safetensors(tensors, tmp_path / "all.safetensors")  # written by the safetensors library
    loaded = load_tensors(tmp_path / "all.safetensors")
    assert loaded.keys() == tensors.keys()
    for name, tensor in tensors.items():
        assert loaded[name].dtype == tensor.dtype and torch.equal(loaded[name], tensor), name


@pytest.mark.parametrize("stored, loaded", [(torch.float16, torch.float32), (torch.float32, torch.bfloat16)])
def test_weights_convert_to_the_requested_dtype(tmp_path, stored, loaded):
    hf_model("p16-w64").to(stored).save_pretrained(tmp_path)
    saved = load_tensors(tmp_path, "model.safetensors")
    assert next(iter(saved.values())).dtype == stored
    model = OurModel.from_pretrained(tmp_path, dtype=loaded)
    state = model.state_dict()
    assert all(state[k].dtype == loaded and torch.equal(state[k], v.to(loaded)) for k, v in saved.items())


# ---- Validation, saving, fsspec ---------------------------------------------------------------------------


def test_check_state_dict_names_each_problem():
    model = hf_model("p16-w64")
    expected = {k: v.shape for k, v in model.state_dict().items()}
    found = dict(expected)
    check_state_dict(expected, found)
    del found["logit_scale"]
    found["mit.extra.weight"] = torch.Size([1])
    found["visual_projection.weight"] = torch.Size([3, 5])
    with pytest.raises(CheckpointError) as err:
        check_state_dict(expected, found)
    message = str(err.value)
    assert "1 missing, 1 unexpected, 1 mis-shaped" in message
    assert "missing: logit_scale" in message
    assert "unexpected: mit.extra.weight" in message
    assert "visual_projection.weight (expected (64, 64), got (3, 5))" in message


def test_check_state_dict_truncates_and_hints_at_original_layout():
    model = hf_model("p8-w128")
    expected = {k: v.shape for k, v in model.state_dict().items()}
    original = {k: v.shape for k, v in hf_to_original(model.state_dict()).items()}
    with pytest.raises(CheckpointError) as err:
        check_state_dict(expected, original)
    message = str(err.value)
    assert "original_to_hf" in message
    assert f"... and {len(expected.keys() - original.keys()) - 20} more" in message
    assert len(message) < 6000


def test_memory_url_round_trip():
    root = f"memory://checkpoints-{uuid.uuid4().hex}"
    hf = original_to_hf(hf_to_original(hf_model("p16-w64").state_dict()))  # q/k/v share one storage each
    fs = fsspec.filesystem("memory")
    try:
        save_safetensors(hf, f"{root}/model.safetensors")
        save_safetensors(hf, fs, f"{root.removeprefix('memory://')}/sub/fs.safetensors")
        buffer = io.BytesIO()
        torch.save({"model": hf_to_original(hf), "epoch": 0}, buffer)
        with fsspec.open(f"{root}/original.pth", "wb") as f:
            f.write(buffer.getvalue())
        for loaded in (
            load_tensors(root, "model.safetensors"),
            load_tensors(f"{root}/model.safetensors"),
            load_tensors(ModelSource(f"{root}/sub"), "fs.safetensors"),
        ):
            assert loaded.keys() == hf.keys() and all(torch.equal(loaded[k], hf[k]) for k in hf)
        assert original_to_hf(load_tensors(f"{root}/original.pth")).keys() == hf.keys()
    finally:
        fs.rm(root.removeprefix("memory://"), recursive=True)


def test_a_checkpoint_on_s3_is_read_in_ranges_fetched_at_once(s3, bucket, tmp_path):
    generator = torch.Generator().manual_seed(0)
    saved = {
        name: torch.randn(n, generator=generator) for name, n in (("a", 5 << 20), ("b", 4 << 20), ("c", 7))
    }
    safetensors.torch.save_file(saved, tmp_path / "model.safetensors")  # 36 MiB: ranges of 32 and 4 MiB
    s3fs.S3FileSystem(**s3.options.for_protocol("s3")).put(
        str(tmp_path / "model.safetensors"), f"{bucket}/m/"
    )
    proxy = FaultProxy(s3.endpoint_url)
    try:
        options = dataclasses.replace(s3.options, endpoint_url=proxy.url).for_protocol("s3")
        loaded = load_tensors(ModelSource(f"s3://{bucket}/m", options), "model.safetensors")
    finally:
        proxy.close()
    assert loaded.keys() == saved.keys() and all(torch.equal(loaded[k], saved[k]) for k in saved)
    ranges = [r.removeprefix("bytes=").split("-") for method, _, r in proxy.faults.seen if method == "GET"]
    fetched = sum(int(end) + 1 - int(start) for start, end in ranges)
    size = (tmp_path / "model.safetensors").stat().st_size
    assert size < fetched <= size + (1 << 20)  # the file once, and a header block
    assert len(ranges) == 3 and proxy.faults.most_in_flight >= 2  # the header's, then two at once


def test_saved_safetensors_load_in_transformers(tmp_path):
    model = hf_model("p16-w64")
    save_safetensors(original_to_hf(hf_to_original(model.state_dict())), tmp_path / "model.safetensors")
    model.config.save_pretrained(tmp_path)
    reloaded = XCLIPModel.from_pretrained(tmp_path).eval()
    for ours, theirs in zip(features(reloaded, *inputs(model)), features(model, *inputs(model)), strict=True):
        assert torch.equal(ours, theirs)
