"""The model interface: X-CLIP implements it, the loader picks a family by ``model_type``, and a family
without re-rank features goes through encode, write, publish and search unchanged (ranked by cosine)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pytest
import torch
from helpers import decoded_batch
from torch import nn

from pipeline.embed.stages.encode import EncodeFrames
from pipeline.embed.stages.write import WritePart, written_part
from pipeline.library import Library, LibraryWriter, read_part
from pipeline.library.index import build_index
from pipeline.models import FAMILIES, VideoTextModel, load_model
from pipeline.search import Searcher
from xclip_core import CLIPTokenizer, ModelIdentity, VideoPreprocessor, XCLIPModel, XCLIPProcessor
from xclip_core.default_model import default_model_dir

FRAMES, SIZE, DIM = 2, 16, 8


class MeanColourModel(nn.Module):
    """A family with no exact score: a video is its frames' mean colour, a text the mean of its token
    embeddings, both projected to DIM. Saved as config.json (model_type "mean-colour") + weights.pt."""

    family = "mean-colour"
    num_frames, embedding_dim, rerank_shape = FRAMES, DIM, None

    def __init__(self, seed: int = 0):
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        self.colour = nn.Parameter(torch.randn(3, DIM, generator=generator))
        self.words = nn.Parameter(torch.randn(49408, DIM, generator=generator))
        self.tokenizer = CLIPTokenizer.from_pretrained()
        self.preprocessor = VideoPreprocessor(size=SIZE, crop_size=SIZE)
        self.identity = ModelIdentity("<in memory>", "", self.family)

    def save(self, directory: Path) -> None:
        directory.mkdir(parents=True)
        (directory / "config.json").write_text(json.dumps({"model_type": self.family}))
        torch.save(self.state_dict(), directory / "weights.pt")

    @classmethod
    def from_pretrained(cls, src: str, storage_options: Any = None, **kwargs: Any) -> MeanColourModel:
        model = cls()
        data = (Path(src) / "weights.pt").read_bytes()
        model.load_state_dict(torch.load(Path(src) / "weights.pt", weights_only=True))
        model.identity = ModelIdentity(src, hashlib.sha256(data).hexdigest(), cls.family)
        return model

    def encode_videos(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, None]:
        return pixel_values.mean(dim=(1, 3, 4)) @ self.colour, None

    def encode_texts(self, texts: str | list[str]) -> torch.Tensor:
        tokens = self.tokenizer(texts, padding="longest")
        mask = tokens["attention_mask"].unsqueeze(-1).float()
        return (self.words[tokens["input_ids"]] * mask).sum(1) / mask.sum(1)


@pytest.fixture
def mean_colour(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A saved checkpoint of the mean-colour family, registered with the loader."""
    monkeypatch.setitem(FAMILIES, MeanColourModel.family, f"{__name__}:MeanColourModel")
    MeanColourModel(seed=3).save(tmp_path / "mean-colour")
    return str(tmp_path / "mean-colour")


def test_xclip_implements_the_interface(tiny_model: Path) -> None:
    model = load_model(str(tiny_model))
    assert isinstance(model, XCLIPModel) and isinstance(model, VideoTextModel)
    assert model.identity == ModelIdentity(str(tiny_model), model.weights_sha256(), "xclip")
    assert (model.num_frames, model.embedding_dim, model.rerank_shape) == (4, 32, (4, 32))
    assert model.preprocessor.crop_size == (32, 32) and model.tokenizer.model_max_length == 77
    pixels = torch.randn(2, 4, 3, 32, 32)
    embedding, rerank = model.encode_videos(pixels)
    texts = model.encode_texts(["a red ball", "a dog"])
    with torch.no_grad():
        logits = model(model.tokenize(model.tokenizer, ["a red ball", "a dog"])["input_ids"], pixels)
        expected = logits.logits_per_video / model.logit_scale.exp()
        np.testing.assert_allclose(model.score(texts, embedding, rerank), expected, atol=1e-5, rtol=0)


def test_xclip_processor_rule_for_missing_files(tiny_model: Path, tmp_path: Path) -> None:
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        (bare / name).write_bytes((tiny_model / name).read_bytes())
    model = load_model(str(bare))
    assert model.preprocessor == VideoPreprocessor(size=32, crop_size=32)  # the model's own image size
    assert model.tokenizer.vocab_size == CLIPTokenizer.from_pretrained().vocab_size  # the bundled vocabulary
    own = XCLIPProcessor.for_model(str(tiny_model), 999)
    assert own.video_preprocessor == VideoPreprocessor.from_pretrained(str(tiny_model))  # its own files win


def test_the_loader_names_unknown_families_and_missing_models(tmp_path: Path) -> None:
    (tmp_path / "odd").mkdir()
    (tmp_path / "odd" / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ValueError, match="unknown model_type 'llama'; known: evl, xclip"):
        load_model(str(tmp_path / "odd"))
    with pytest.raises(FileNotFoundError, match="not found: pass a checkpoint directory"):
        load_model(str(tmp_path / "nowhere"))
    bundled = load_model(None)  # the bundled model, recorded by its name: its directory differs per install
    assert bundled.identity.source == "videosearch-tiny" == load_model("videosearch-tiny").identity.source
    assert bundled.identity.sha256 == load_model(default_model_dir()).identity.sha256


def test_a_family_without_rerank_features_is_embedded_and_searched(mean_colour: str, tmp_path: Path) -> None:
    stage = EncodeFrames(mean_colour, device="cpu")
    assert stage.identity.family == "mean-colour" and stage.rerank_shape is None
    rng = np.random.default_rng(0)
    clips = [rng.integers(0, 256, (FRAMES, SIZE, SIZE, 3), dtype=np.uint8) for _ in range(5)]
    encoded = stage(decoded_batch([*clips, None], [None] * 5 + ["broken"]))
    assert "prompt_features" not in encoded and encoded["embedding"].shape == (6, DIM)

    library = str(tmp_path / "library")
    described = WritePart(library, DIM, None)(encoded)
    part = written_part({name: column[0] for name, column in described.items()})
    writer = LibraryWriter(library, embedding_dim=DIM, prompt_shape=None)
    table = read_part(writer.store, part, writer.schema)
    assert "prompt_features" not in table.column_names
    ok = table.filter(pa.compute.is_null(table["error"]))
    vectors = np.stack(ok["embedding"].to_numpy(zero_copy_only=False))
    writer.publish([part], build_index(ok["id"].to_numpy(), vectors), stage.identity, None)

    opened = Library.open(library)
    assert opened.model == stage.identity and opened.rerank_shape is None
    searcher = Searcher(opened)  # loads the library's own model through the registered family
    hits = searcher.search("a bright red square", k=3)
    text = torch.nn.functional.normalize(searcher.text_embedding("a bright red square"), dim=-1)[0].numpy()
    cosines = vectors @ text
    order = np.argsort(-cosines)[:3]
    assert [h.id for h in hits] == ok["id"].to_numpy()[order].tolist()
    np.testing.assert_allclose([h.score for h in hits], cosines[order], atol=1e-5, rtol=0)
