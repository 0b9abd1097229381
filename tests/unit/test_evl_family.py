"""EVL as a model family of the pipeline: built over a checkpoint's frozen towers, loaded by ``load_model``,
searched by text (the text-aligned variant), trained by the same Trainer (backbone and text tower frozen)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import write_video

from pipeline.cli import main
from pipeline.embed.stages.decode import DecodeSettings, decode_video
from pipeline.models import VideoTextModel, load_model
from pipeline.samples.synthetic import render, sample_scenes
from pipeline.storage import Store
from pipeline.train.backbone_cache import COLUMN, BackboneFeatures, feature_bytes, from_stored, use_cache
from pipeline.train.config import TrainConfig
from pipeline.train.options import TrainOptions
from pipeline.train.trainer import Trainer
from xclip_core import XCLIPModel
from xclip_core.checkpoints import hf_to_original
from xclip_core.evl.build import evl_over_clip
from xclip_core.evl.model import EVLModel

LABELS = ["circle", "square", "triangle"]


@pytest.fixture(scope="module")
def batch(tiny_model: Path) -> tuple[torch.Tensor, list[str], list[str]]:
    """Six synthetic clips preprocessed for the tiny model (4 frames, 32 px), their captions and labels."""
    scenes = sample_scenes(6, seed=2)
    preprocessor = XCLIPModel.from_pretrained(tiny_model).preprocessor
    videos = [preprocessor(torch.from_numpy(render(s, 4, 64, 48)))["pixel_values"][0] for s in scenes]
    labels = [LABELS[i % 3] for i in range(6)]
    return torch.stack(videos), [s.caption for s in scenes], labels


def frozen_names(model: EVLModel) -> set[str]:
    return {n for n, _ in model.named_parameters() if n.startswith(("vision_model.", "alignment.text_"))}


def test_a_text_aligned_evl_model_is_searchable_through_the_model_interface(
    tiny_model: Path, tmp_path: Path, batch
) -> None:
    torch.manual_seed(0)
    model = evl_over_clip(tiny_model).eval()
    xclip = XCLIPModel.from_pretrained(tiny_model)
    assert isinstance(model, VideoTextModel)
    assert (model.num_frames, model.embedding_dim, model.rerank_shape) == (4, 32, None)
    # the text side is X-CLIP's own tower and projection, untouched; the backbone is X-CLIP's vision tower
    texts = ["a red circle", "two blue squares"]
    torch.testing.assert_close(model.encode_texts(texts), xclip.encode_texts(texts), rtol=0, atol=1e-6)
    assert torch.equal(
        model.vision_model.encoder.layers[0].self_attn.q_proj.weight,
        xclip.vision_model.encoder.layers[0].self_attn.q_proj.weight,
    )
    embedding, rerank = model.encode_videos(batch[0])
    assert embedding.shape == (6, 32) and rerank is None

    model.save_pretrained(tmp_path / "evl")
    model.processor.save_pretrained(tmp_path / "evl")
    loaded = load_model(str(tmp_path / "evl"))
    assert isinstance(loaded, EVLModel) and loaded.identity.family == "evl"
    assert loaded.preprocessor == xclip.preprocessor
    torch.testing.assert_close(loaded.encode_videos(batch[0])[0], embedding, rtol=0, atol=1e-6)


def test_a_classifier_says_it_cannot_be_searched(tiny_model: Path) -> None:
    model = evl_over_clip(tiny_model, labels=LABELS)
    assert model.config.num_classes == 3 and model.trains_on == "label"
    with pytest.raises(ValueError, match="cannot be searched by text.*--family evl"):
        model.encode_texts("a red circle")


@pytest.mark.parametrize("variant", ["classifier", "text-aligned"])
def test_training_moves_the_decoder_only_lowers_the_loss_and_resumes_exactly(
    tiny_model: Path, tmp_path: Path, batch, variant: str
) -> None:
    pixels, captions, labels = batch
    targets = labels if variant == "classifier" else captions
    torch.manual_seed(0)
    model = evl_over_clip(tiny_model, labels=LABELS if variant == "classifier" else None)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainer = Trainer(model, config=TrainConfig(3e-3, weight_decay=0.0))
    # the optimizer holds the decoder's parameters (and the head or the video projection) alone
    optimized = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    names = {n for n, p in model.named_parameters() if id(p) in optimized}
    assert names and not names & frozen_names(model)
    assert any(n.startswith("decoder.") for n in names)

    def loss() -> float:  # without dropout's noise
        with torch.no_grad():
            return model.eval().training_loss(model, pixels, targets, model.tokenizer).item()

    start = loss()
    trainer.fit([(pixels, targets)] * 12)
    assert loss() < 0.7 * start
    for name, value in model.state_dict().items():
        if name in frozen_names(model):
            assert torch.equal(value, before[name]), f"{name} moved"
        assert all(p.grad is None for n, p in model.named_parameters() if n in frozen_names(model))
    assert any(
        not torch.equal(v, before[k]) for k, v in model.state_dict().items() if k.startswith("decoder.")
    )

    checkpoint = trainer.save(str(tmp_path / "run"))
    trainer.fit([(pixels, targets)] * 2)
    resumed = Trainer.resume(checkpoint)
    assert isinstance(resumed.core, EVLModel) and resumed.step_count == 12
    resumed.fit([(pixels, targets)] * 2)
    for (name, a), b in zip(model.state_dict().items(), resumed.model.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("variant", ["classifier", "text-aligned"])
def test_training_from_cached_backbone_features_is_training_from_the_pixels(
    tiny_model: Path, batch, variant: str
) -> None:
    pixels, captions, labels = batch
    targets = labels if variant == "classifier" else captions
    models = []
    for _ in range(2):
        torch.manual_seed(0)
        models.append(evl_over_clip(tiny_model, labels=LABELS if variant == "classifier" else None))
    on_pixels, on_features = models
    features = on_features.backbone_features(pixels)
    vision, layers = on_features.config.vision_config, on_features.config.decoder_config.num_layers
    tokens = 1 + (vision.image_size // vision.patch_size) ** 2
    assert features.shape == (6, layers, 3, pixels.shape[1], tokens, vision.hidden_size)
    assert not features.requires_grad
    torch.testing.assert_close(
        on_features.eval().get_video_features(backbone_features=features),
        on_pixels.eval().get_video_features(pixels),
    )
    first = Trainer(on_pixels, config=TrainConfig(3e-3, weight_decay=0.0))
    second = Trainer(on_features, config=TrainConfig(3e-3, weight_decay=0.0))
    for step in range(3):
        torch.manual_seed(step)  # the same dropout draws
        loss = first.step(pixels, targets)
        torch.manual_seed(step)
        assert second.step(None, targets, backbone_features=features) == pytest.approx(loss, rel=1e-5)
    for (name, a), b in zip(on_pixels.state_dict().items(), on_features.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6, msg=name)
    with pytest.raises(ValueError, match=r"backbone_features must be \(batch, 2, 3, frames"):
        on_features.get_video_features(backbone_features=features[:, :1])
    with pytest.raises(ValueError, match="either pixel_values or backbone_features"):
        on_features.get_video_features(pixels, features)


def test_the_backbone_cache_stage_keeps_bfloat16_features_and_when_to_cache(tiny_model: Path, batch) -> None:
    pixels, _, labels = batch
    torch.manual_seed(0)
    model = evl_over_clip(tiny_model, labels=LABELS)
    scenes = sample_scenes(2, seed=2)
    frames = np.stack([render(s, 4, 32, 32) for s in scenes])  # decoded clips, uint8 (T, H, W, 3)
    stage = BackboneFeatures(lambda: model)
    out = stage({"uri": np.array(["a", "b"]), "frames": frames})
    assert set(out) == {"uri", COLUMN} and out[COLUMN].dtype == np.int16
    normalized = torch.stack([model.preprocessor.normalize(torch.from_numpy(f)) for f in frames])
    expected = model.backbone_features(normalized)
    torch.testing.assert_close(from_stored(out[COLUMN]), expected, rtol=2**-8, atol=1e-5)  # bfloat16

    per_clip = feature_bytes(model)
    assert per_clip == out[COLUMN][0].nbytes
    assert feature_bytes(XCLIPModel.from_pretrained(tiny_model)) is None
    assert use_cache("auto", per_clip, 100, 2, object_store_bytes=2 * 100 * per_clip)
    assert not use_cache("auto", per_clip, 100, 2, object_store_bytes=2 * 100 * per_clip - 1)  # half at most
    assert not use_cache("auto", per_clip, 100, 1, object_store_bytes=1e12)  # one epoch: nothing to reuse
    assert use_cache("on", per_clip, 100, 1, 0) and not use_cache("off", per_clip, 1, 9, 1e12)
    with pytest.raises(ValueError, match="no frozen backbone to cache"):
        use_cache("on", feature_bytes(XCLIPModel.from_pretrained(tiny_model)), 100, 2, 1e12)
    with pytest.raises(ValueError, match="--backbone-cache must be one of auto, on, off, got 'always'"):
        use_cache("always", per_clip, 100, 2, 1e12)


def test_a_family_train_cannot_start_is_refused_with_those_it_can() -> None:
    with pytest.raises(ValueError, match="--family must be one of xclip, evl, got 'clip'"):
        TrainOptions(output="/tmp/run", family="clip")


def test_labels_the_classifier_does_not_know_are_refused(tiny_model: Path, batch) -> None:
    trainer = Trainer(evl_over_clip(tiny_model, labels=LABELS))
    with pytest.raises(ValueError, match="no class for: \\['hexagon'\\]"):
        trainer.step(batch[0][:2], ["circle", "hexagon"])


def test_the_text_tower_comes_from_openai_clip_files_too(tmp_path: Path, tiny_model: Path) -> None:
    xclip = XCLIPModel.from_pretrained(tiny_model)
    # OpenAI's layout of the same CLIP towers: X-CLIP's own blocks left out
    openai = {
        key: value
        for key, value in hf_to_original(xclip.state_dict()).items()
        if not key.startswith(("mit.", "prompts_")) and ".message_" not in key
    }
    torch.save(openai, tmp_path / "clip.pth")
    heads = xclip.config.text_config.num_attention_heads  # a tiny tower: not CLIP's 64 channels per head
    model = evl_over_clip(tmp_path / "clip.pth", text_num_heads=heads).eval()
    assert model.config.text_aligned and model.config.projection_dim == xclip.config.projection_dim
    texts = ["a red circle", "two blue squares"]
    torch.testing.assert_close(model.encode_texts(texts), xclip.encode_texts(texts), rtol=0, atol=1e-6)
    torch.testing.assert_close(
        model.alignment.visual_projection.weight, xclip.visual_projection.weight, rtol=0, atol=0
    )

    xclip.save_pretrained(tmp_path / "copy")  # a single weights file in Hugging Face names: no geometry
    single = tmp_path / "copy" / "model.safetensors"
    assert evl_over_clip(single, labels=LABELS).config.num_classes == 3  # a classifier needs the vision tower
    with pytest.raises(ValueError, match="has no text tower \\(pass labels for a classifier\\)"):
        evl_over_clip(single)


def test_classify_uses_an_evl_classifiers_head_and_its_label_file(
    tiny_model: Path, tmp_path: Path, capsys
) -> None:
    torch.manual_seed(0)
    model = evl_over_clip(tiny_model, labels=LABELS).eval()
    model.save_pretrained(tmp_path / "evl")
    model.processor.save_pretrained(tmp_path / "evl")
    videos = tmp_path / "videos"
    videos.mkdir()
    write_video(videos / "a.mp4", 12, 48, 40, fps=6, seed=1)
    (videos / "broken.mp4").write_bytes(b"not a video")

    assert main(["classify", str(videos), "--model", str(tmp_path / "evl"), "-k", "3", "--json"]) == 0
    results = {Path(r["uri"]).name: r for r in json.loads(capsys.readouterr().out)}
    assert results["broken.mp4"]["error"] and not results["broken.mp4"]["labels"]
    # the head's probabilities of the model's own class names, most probable first
    (decoded,) = decode_video(Store(str(videos / "a.mp4")), DecodeSettings(4, model.preprocessor))
    with torch.no_grad():
        probs = model(model.preprocessor.normalize(decoded["frames"])[None]).softmax(-1)[0]
    expected = sorted(zip(LABELS, probs.tolist(), strict=True), key=lambda pair: -pair[1])
    assert [label for label, _ in results["a.mp4"]["labels"]] == [label for label, _ in expected]
    assert [p for _, p in results["a.mp4"]["labels"]] == pytest.approx([p for _, p in expected], abs=1e-6)

    # class names from a file in the original release's format: {"0": name, ...}
    (tmp_path / "names.json").write_text(json.dumps({"0": "disc", "1": "box", "2": "wedge"}))
    flags = ["--model", str(tmp_path / "evl"), "--labels", str(tmp_path / "names.json"), "--json"]
    assert main(["classify", str(videos / "a.mp4"), *flags]) == 0
    renamed = json.loads(capsys.readouterr().out)[0]["labels"]
    names = dict(zip(LABELS, ["disc", "box", "wedge"], strict=True))
    assert [label for label, _ in renamed] == [names[label] for label, _ in expected]
    (tmp_path / "two.json").write_text(json.dumps(["disc", "box"]))
    assert (
        main(
            [
                "classify",
                str(videos / "a.mp4"),
                "--model",
                str(tmp_path / "evl"),
                "--labels",
                str(tmp_path / "two.json"),
            ]
        )
        == 2
    )
    assert "2 labels for a classifier of 3 classes" in capsys.readouterr().err
