"""Numerical parity of xclip_core.XCLIPModel with transformers.XCLIPModel (the reference).

Each config is a small random X-CLIP saved by the reference with ``save_pretrained``; every parameter is
perturbed away from the reference's init (LayerNorm weights of 1, zero biases...) so that a mis-wired
parameter cannot hide. The bound is 1e-4 max abs error in float32.
"""

from __future__ import annotations

import pytest
import torch
import transformers
from helpers import reference_model

from xclip_core import XCLIPConfig, XCLIPModel
from xclip_core.checkpoints import hf_to_original

TOL = 1e-4

CONFIGS = {
    "patch8-3frames": dict(
        text=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4),
        vision=dict(
            hidden_size=48,
            intermediate_size=96,
            num_hidden_layers=2,
            num_attention_heads=4,
            image_size=32,
            patch_size=8,
            num_frames=3,
            mit_hidden_size=32,
            mit_intermediate_size=64,
            mit_num_hidden_layers=1,
            mit_num_attention_heads=4,
        ),
        projection_dim=32,
        prompt_layers=2,
        prompt_num_attention_heads=4,
    ),
    "patch16-8frames-deep-mit": dict(
        text=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2),
        vision=dict(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=3,
            num_attention_heads=8,
            image_size=48,
            patch_size=16,
            num_frames=8,
            mit_hidden_size=48,
            mit_intermediate_size=96,
            mit_num_hidden_layers=3,
            mit_num_attention_heads=6,
        ),
        projection_dim=48,
        prompt_layers=1,
        prompt_num_attention_heads=3,
    ),
    "patch14-2frames-no-prompt-layers-gelu": dict(
        text=dict(
            hidden_size=48,
            intermediate_size=80,
            num_hidden_layers=2,
            num_attention_heads=3,
            hidden_act="gelu",
        ),
        vision=dict(
            hidden_size=32,
            intermediate_size=40,
            num_hidden_layers=1,
            num_attention_heads=2,
            image_size=28,
            patch_size=14,
            num_frames=2,
            mit_hidden_size=24,
            mit_intermediate_size=48,
            mit_num_hidden_layers=2,
            mit_num_attention_heads=2,
        ),
        projection_dim=24,
        prompt_layers=0,
        prompt_num_attention_heads=2,
        prompt_alpha=0.3,
    ),
    # original-release geometry rule: every block has heads of width 64, so a .pth alone defines the model
    "heads-of-64": dict(
        text=dict(hidden_size=64, intermediate_size=96, num_hidden_layers=1, num_attention_heads=1),
        vision=dict(
            hidden_size=128,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=32,
            patch_size=16,
            num_frames=4,
            mit_hidden_size=64,
            mit_intermediate_size=32,
            mit_num_hidden_layers=1,
            mit_num_attention_heads=1,
        ),
        projection_dim=64,
        prompt_layers=2,
        prompt_num_attention_heads=1,
    ),
}
VOCAB, CONTEXT = 1000, 16


def reference_for(spec: dict, seed: int) -> transformers.XCLIPModel:
    text = dict(spec["text"], vocab_size=VOCAB, max_position_embeddings=CONTEXT)
    others = {k: v for k, v in spec.items() if k not in ("text", "vision")}
    return reference_model(text, spec["vision"], seed, **others)


def inputs(spec: dict, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Three videos; four texts of different lengths, padded two ways (eot id and zero)."""
    gen = torch.Generator().manual_seed(seed)
    vision = spec["vision"]
    size = vision["image_size"]
    pixel_values = torch.randn(3, vision["num_frames"], 3, size, size, generator=gen)
    eot = VOCAB - 1
    input_ids = torch.randint(1, eot - 1, (4, CONTEXT), generator=gen)
    mask = torch.ones_like(input_ids)
    for row, (length, pad) in enumerate([(CONTEXT, None), (5, eot), (9, 0), (2, eot)]):
        input_ids[row, length - 1] = eot
        if pad is not None:
            input_ids[row, length:] = pad
            mask[row, length:] = 0
    return pixel_values, input_ids, mask


def assert_parity(ours: XCLIPModel, reference: transformers.XCLIPModel, spec: dict, seed: int) -> None:
    pixel_values, input_ids, mask = inputs(spec, seed)
    with torch.no_grad():
        ref_video = reference.get_video_features(pixel_values=pixel_values).pooler_output
        ref_text = reference.get_text_features(input_ids=input_ids, attention_mask=mask).pooler_output
        ref = reference(input_ids=input_ids, pixel_values=pixel_values, attention_mask=mask)
        out = ours(input_ids, pixel_values, mask)
        torch.testing.assert_close(ours.get_video_features(pixel_values), ref_video, atol=TOL, rtol=0)
        torch.testing.assert_close(ours.get_text_features(input_ids, mask), ref_text, atol=TOL, rtol=0)
        torch.testing.assert_close(out.logits_per_video, ref.logits_per_video, atol=TOL, rtol=0)
        torch.testing.assert_close(out.logits_per_text, ref.logits_per_text, atol=TOL, rtol=0)
        # the index path: stored features + text embeddings give the same full X-CLIP logits
        stored = ours.encode_videos(pixel_values)
        torch.testing.assert_close(stored.video_embeds, ref_video, atol=TOL, rtol=0)
        logits = ours.logits(
            stored.video_embeds, stored.prompt_features, ours.get_text_features(input_ids, mask)
        )
        torch.testing.assert_close(logits, ref.logits_per_video, atol=TOL, rtol=0)
    # the check is not vacuous: the videos and texts are told apart
    assert ref.logits_per_video.std() > 1e-3


@pytest.fixture(params=list(CONFIGS), scope="module")
def case(request, tmp_path_factory):
    spec = CONFIGS[request.param]
    seed = list(CONFIGS).index(request.param)
    reference = reference_for(spec, seed)
    directory = tmp_path_factory.mktemp(request.param)
    reference.save_pretrained(directory / "hf")
    return spec, seed, reference, directory, request.param


def test_hugging_face_checkpoint(case):
    spec, seed, reference, directory, _ = case
    assert_parity(XCLIPModel.from_pretrained(directory / "hf"), reference, spec, seed)


def test_original_release_checkpoint(case):
    spec, seed, reference, directory, name = case
    state = hf_to_original(reference.state_dict())
    torch.save({"model": state, "epoch": 30}, directory / "best.pth")
    if name == "heads-of-64":  # geometry inferred from the tensor shapes, as for a downloaded original .pth
        config = None
    else:  # other head widths: the user names the geometry
        config = XCLIPConfig.from_dict(reference.config.to_dict())
    assert_parity(XCLIPModel.from_pretrained(directory / "best.pth", config=config), reference, spec, seed)


def test_our_save_pretrained_round_trip(case):
    spec, seed, reference, directory, _ = case
    XCLIPModel.from_pretrained(directory / "hf").save_pretrained(directory / "ours")
    assert_parity(XCLIPModel.from_pretrained(directory / "ours"), reference, spec, seed)
    # and the reference reads what we wrote
    again = transformers.XCLIPModel.from_pretrained(directory / "ours").eval()
    assert_parity(XCLIPModel.from_pretrained(directory / "hf"), again, spec, seed)


def test_wrong_frame_count_is_a_clear_error(case):
    spec, _, _, directory, _ = case
    model = XCLIPModel.from_pretrained(directory / "hf")
    vision = spec["vision"]
    size = vision["image_size"]
    with pytest.raises(ValueError, match=f"takes {vision['num_frames']} frames"):
        model.get_video_features(torch.zeros(1, vision["num_frames"] + 1, 3, size, size))
    with pytest.raises(ValueError, match="preprocess"):
        model.get_video_features(torch.zeros(1, vision["num_frames"], 3, size + 1, size + 1))


def test_sharded_checkpoint(case):
    spec, seed, reference, directory, _ = case
    reference.save_pretrained(directory / "sharded", max_shard_size="20KB")
    assert (directory / "sharded" / "model.safetensors.index.json").exists()
    assert_parity(XCLIPModel.from_pretrained(directory / "sharded"), reference, spec, seed)
