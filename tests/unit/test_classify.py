"""Zero-shot classification: bundled label sets, label files, and parity of the probabilities with
``softmax(transformers.XCLIPModel(...).logits_per_video)`` on a tiny random model."""

from __future__ import annotations

import re

import fsspec
import numpy as np
import pytest
import torch
from helpers import reference_model

from xclip_core import XCLIPModel
from xclip_core.classify import BUNDLED_LABEL_SETS, ZeroShotClassifier, classify, load_labels
from xclip_core.label_prompts import check_template
from xclip_core.processor import XCLIPProcessor
from xclip_core.tokenizer import CLIPTokenizer
from xclip_core.video_transforms import VideoPreprocessor

LABELS = [
    "abseiling",
    "brush hair",
    "playing guitar",
    "ApplyEyeMakeup",
    "passing American football (in game)",
]
FRAMES, SIZE = 3, 32


# ------------------------------------------------------------------------------------------------ label sets
# Entries as they stand in microsoft/VideoX X-CLIP/labels/*.csv (id -> name).
KNOWN = {
    "kinetics400": (
        400,
        {0: "abseiling", 1: "air drumming", 208: "passing American football (in game)", 399: "zumba"},
    ),
    "kinetics600": (600, {0: "abseiling", 1: "acting in play", 2: "adjusting glasses", 599: "zumba"}),
    "ucf101": (
        101,
        {0: "ApplyEyeMakeup", 1: "ApplyLipstick", 2: "Archery", 99: "WritingOnBoard", 100: "YoYo"},
    ),
    "hmdb51": (
        51,
        {0: "brush hair", 1: "cartwheel", 2: "catch", 47: "throw", 48: "turn", 49: "walk", 50: "wave"},
    ),
}


@pytest.mark.parametrize("name", BUNDLED_LABEL_SETS)
def test_bundled_label_sets(name):
    count, entries = KNOWN[name]
    labels = load_labels(name)
    assert len(labels) == count == len(set(labels))
    assert {i: labels[i] for i in entries} == entries
    assert all(label == label.strip() and label for label in labels)


def test_hmdb51_contains_brush_hair():
    assert "brush hair" in load_labels("hmdb51")


def test_text_label_file_from_memory_url():
    with fsspec.open("memory://labels/custom.txt", "wb") as f:
        f.write(b"# my classes\r\ncooking\r\n\r\n  riding a bike  \n# done\ndancing\n")
    assert load_labels("memory://labels/custom.txt") == ["cooking", "riding a bike", "dancing"]


def test_csv_label_file(tmp_path):
    path = tmp_path / "labels.csv"
    path.write_text('id,name\n0,abseiling\n1,"tying knot (not on a tie), fast"\n2,zumba\n', encoding="utf-8")
    assert load_labels(path) == ["abseiling", "tying knot (not on a tie), fast", "zumba"]
    assert load_labels(str(path)) == load_labels(f"file://{path}")


def test_label_errors(tmp_path):
    known = "kinetics400, kinetics600, ucf101, hmdb51"
    with pytest.raises(ValueError, match=f"unknown label set 'kinetics700'.*{known}"):
        load_labels("kinetics700")
    with pytest.raises(FileNotFoundError):
        load_labels(tmp_path / "missing.txt")
    (tmp_path / "empty.txt").write_text("# nothing\n\n")
    with pytest.raises(ValueError, match="no labels"):
        load_labels(tmp_path / "empty.txt")
    (tmp_path / "bad.csv").write_text("id,label\n0,a\n")
    with pytest.raises(ValueError, match="'name' column"):
        load_labels(tmp_path / "bad.csv")
    (tmp_path / "dup.txt").write_text("a\nb\na\n")
    with pytest.raises(ValueError, match="duplicate"):
        load_labels(tmp_path / "dup.txt")


@pytest.mark.parametrize(
    ("template", "prompt"),
    [("{}", "surfing"), ("a video of {}", "a video of surfing"), ("{{{}}}, {{}}", "{surfing}, {}")],
)
def test_templates_that_make_a_prompt_of_any_label(template: str, prompt: str) -> None:
    assert check_template(template).format("surfing") == prompt


@pytest.mark.parametrize(
    ("template", "reason"),
    [
        ("a video", "must contain '{}'"),
        ("{{}}", "must contain '{}'"),  # a literal "{}"
        ("a {kind} of {}", "no other braces"),  # would raise KeyError('kind') at the first label
        ("{} and {}", "no other braces"),
        ("a {", "no other braces"),
    ],
)
def test_templates_that_cannot_are_refused_saying_why(models, tokenizer, template: str, reason: str) -> None:
    with pytest.raises(ValueError, match=re.escape(reason)):
        check_template(template)
    with pytest.raises(ValueError, match=re.escape(reason)):
        ZeroShotClassifier(models[1], tokenizer, template)


# -------------------------------------------------------------------------------------------- classifier
@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A tiny random reference X-CLIP (every parameter perturbed) and ours loaded from its checkpoint."""
    reference = reference_model(
        text=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            max_position_embeddings=77,
        ),  # 77 = the tokenizer's max_length padding
        vision=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=SIZE,
            patch_size=8,
            num_frames=FRAMES,
            mit_hidden_size=16,
            mit_intermediate_size=32,
            mit_num_hidden_layers=1,
            mit_num_attention_heads=2,
        ),
        projection_dim=16,
        prompt_layers=1,
        prompt_num_attention_heads=2,
    )
    directory = tmp_path_factory.mktemp("tiny-xclip")
    reference.save_pretrained(directory)
    return reference, XCLIPModel.from_pretrained(directory)


@pytest.fixture(scope="module")
def tokenizer():
    return CLIPTokenizer.from_pretrained()


def pixel_values(batch: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, FRAMES, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))


def test_probabilities_match_reference(models, tokenizer):
    reference, ours = models
    classifier = ZeroShotClassifier(ours, tokenizer, labels=LABELS)
    videos = pixel_values(3)
    probs = classifier(videos)

    text = tokenizer([f"a video of {label}" for label in LABELS], padding="max_length")
    with torch.no_grad():
        logits = reference(pixel_values=videos, **text).logits_per_video
    torch.testing.assert_close(probs, logits.softmax(dim=-1), atol=1e-5, rtol=0)
    assert probs.shape == (3, len(LABELS)) and probs.dtype == torch.float32
    torch.testing.assert_close(probs.sum(dim=-1), torch.ones(3))
    assert probs.std() > 0.01  # not vacuous: the labels get clearly different probabilities
    # the score is the full X-CLIP one (video-specific prompts), not the plain CLIP cosine
    with torch.no_grad():
        plain = torch.nn.functional.normalize(reference.get_text_features(**text).pooler_output, dim=-1)
        video = torch.nn.functional.normalize(reference.get_video_features(videos).pooler_output, dim=-1)
    assert not torch.allclose(probs, (reference.logit_scale.exp() * video @ plain.T).softmax(-1), atol=1e-3)


def test_text_embeddings_are_cached_and_batched(models, tokenizer, monkeypatch):
    _, ours = models
    calls = []
    encode = ours.get_text_features

    def counting(ids, mask):
        calls.append(len(ids))
        return encode(ids, mask)

    monkeypatch.setattr(ours, "get_text_features", counting)

    classifier = ZeroShotClassifier(ours, tokenizer, labels=LABELS, batch_size=2)
    first = classifier(pixel_values())
    assert calls == [2, 2, 1]
    second = classifier(pixel_values())
    assert calls == [2, 2, 1]  # no recompute
    torch.testing.assert_close(first, second, atol=0, rtol=0)
    assert classifier.text_embeddings() is classifier.text_embeddings(list(LABELS))

    whole = ZeroShotClassifier(ours, tokenizer, labels=LABELS).text_embeddings()
    torch.testing.assert_close(classifier.text_embeddings(), whole, atol=1e-6, rtol=0)
    classifier.text_embeddings(LABELS[:2])  # another label set: computed once more
    assert calls == [2, 2, 1, 5, 2]


def test_top_k_and_label_override(models, tokenizer):
    _, ours = models
    classifier = ZeroShotClassifier(ours, tokenizer, labels=LABELS)
    videos = pixel_values(2, seed=1)
    probs = classifier(videos)
    top = classifier.top_k(videos, k=3)
    assert [[label for label, _ in row] for row in top] == [
        [LABELS[i] for i in row.argsort(descending=True)[:3]] for row in probs
    ]
    assert top[0][0][1] == pytest.approx(probs[0].max().item())
    assert len(classifier.top_k(videos, k=99)[0]) == len(LABELS)
    other = classifier(videos, labels=["cooking", "dancing"])
    assert other.shape == (2, 2)
    with pytest.raises(ValueError, match="'{}'"):
        ZeroShotClassifier(ours, tokenizer, "a video", labels=LABELS)
    no_default = ZeroShotClassifier(ours, tokenizer)
    torch.testing.assert_close(no_default(videos, LABELS), probs, atol=0, rtol=0)
    with pytest.raises(ValueError, match="no labels"):
        no_default(videos)


def test_inference_mode_and_dtype(models, tokenizer):
    _, ours = models
    videos = pixel_values()
    expected = ZeroShotClassifier(ours, tokenizer, labels=LABELS)(videos)
    with torch.inference_mode():
        assert torch.equal(ZeroShotClassifier(ours, tokenizer, labels=LABELS)(videos), expected)
    half = XCLIPModel(ours.config)
    half.load_state_dict(ours.state_dict())
    half = half.to(torch.bfloat16).eval()
    probs = ZeroShotClassifier(half, tokenizer, labels=LABELS)(videos)  # float32 input, bfloat16 model
    assert probs.dtype == torch.float32
    torch.testing.assert_close(probs, expected, atol=0.05, rtol=0)


def test_classify_helper(models, tokenizer):
    _, ours = models
    processor = XCLIPProcessor(tokenizer, VideoPreprocessor(size=SIZE, crop_size=SIZE))
    rng = np.random.default_rng(0)
    videos = [rng.integers(0, 256, (FRAMES, 40, 48, 3), dtype=np.uint8) for _ in range(2)]
    results = classify(ours, processor, videos, LABELS)
    expected = ZeroShotClassifier(ours, tokenizer, labels=LABELS)(processor(videos=videos)["pixel_values"])
    assert len(results) == 2
    for result, row in zip(results, expected, strict=True):
        assert set(result) == set(LABELS)
        assert list(result.values()) == sorted(result.values(), reverse=True)
        assert [result[label] for label in LABELS] == pytest.approx(row.tolist(), abs=1e-6)
        assert sum(result.values()) == pytest.approx(1.0, abs=1e-5)
    # already preprocessed pixel values, a label set by name
    by_name = classify(ours, processor, pixel_values(1), "hmdb51", template="{}")
    assert len(by_name[0]) == 51 and next(iter(by_name[0])) in load_labels("hmdb51")
