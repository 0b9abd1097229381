"""The encode and write stages: embeddings of decoded rows against transformers.XCLIPModel, Parquet parts.

The checkpoint is a tiny random X-CLIP saved by the reference (every parameter perturbed, as in
test_model_parity), with a preprocessor config for its 32-pixel crop. Reference pixel values are computed
here with plain numpy, so the embeddings are checked against code that shares nothing with ours.
"""

from __future__ import annotations

import shutil
import threading
import zlib

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import transformers
from helpers import compiled_graphs_from_here, decoded_batch, reference_model

from pipeline import bf16
from pipeline.embed.options import EmbedOptions
from pipeline.embed.stages.encode import EncodeFrames, ModelLoadError
from pipeline.embed.stages.write import WritePart, rows_to_table, written_part
from pipeline.library import read_part
from pipeline.library.features import features_path
from pipeline.library.schema import DECODED, ENCODED, part_schema, row_id, stored_schema
from pipeline.storage import Store
from xclip_core import ModelIdentity, XCLIPModel
from xclip_core.video_transforms import VideoPreprocessor

FRAMES, CROP, DIM, PATCHES = 3, 32, 32, 16  # 32 / patch 8 = 4x4 patches
MEAN, STD = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, transformers.XCLIPModel]:
    """A tiny random X-CLIP saved by transformers with a 32-pixel preprocessor config; the reference model."""
    reference = reference_model(
        text=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            vocab_size=100,
            max_position_embeddings=8,
        ),
        vision=dict(
            hidden_size=48,
            intermediate_size=96,
            num_hidden_layers=2,
            num_attention_heads=4,
            image_size=CROP,
            patch_size=8,
            num_frames=FRAMES,
            mit_hidden_size=32,
            mit_intermediate_size=64,
            mit_num_hidden_layers=1,
            mit_num_attention_heads=4,
        ),
        projection_dim=DIM,
        prompt_layers=1,
        prompt_num_attention_heads=4,
    )
    directory = tmp_path_factory.mktemp("xclip")
    reference.save_pretrained(directory)
    VideoPreprocessor(size=CROP, crop_size=CROP).save_pretrained(directory)
    return str(directory), reference


def videos(count: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (count, FRAMES, CROP, CROP, 3), dtype=np.uint8)


def reference_embeddings(reference: transformers.XCLIPModel, clips: np.ndarray) -> np.ndarray:
    """Normalized ``get_video_features`` of uint8 clips, pixel values computed here in float64."""
    pixels = ((clips / 255.0 - MEAN) / STD).transpose(0, 1, 4, 2, 3).astype(np.float32)
    with torch.no_grad():
        features = reference.get_video_features(pixel_values=torch.from_numpy(pixels)).pooler_output
    return torch.nn.functional.normalize(features, dim=-1).numpy()


def test_encode_matches_reference_and_passes_error_rows(checkpoint):
    src, reference = checkpoint
    stage = EncodeFrames(src, device="cpu", batch_size=8)  # float32 (on a GPU: half precision)
    clips = videos(3)
    errors = [None, "cannot decode: moov atom", None, None]
    batch = decoded_batch([clips[0], None, clips[1], clips[2]], errors)
    out = stage(batch)

    assert set(out) == set(ENCODED)
    assert out["error"].tolist() == errors
    assert batch["error"][0] is None  # the input batch is not modified
    good = [0, 2, 3]
    assert out["embedding"].dtype == np.float32 and out["embedding"].shape == (4, DIM)
    expected = reference_embeddings(reference, clips)
    np.testing.assert_allclose(out["embedding"][good], expected, atol=1e-4, rtol=0)
    assert not np.allclose(out["embedding"][0], out["embedding"][2], atol=1e-2)  # videos are told apart

    ours = XCLIPModel.from_pretrained(src)
    pixels = torch.stack([stage.preprocessor.normalize(clip) for clip in clips])
    with torch.no_grad():
        expected = ours.encode_videos(pixels).prompt_features.numpy()
    assert out["prompt_features"].dtype == np.float16 and out["prompt_features"].shape == (4, PATCHES, DIM)
    prompt_features = out["prompt_features"][good].astype(np.float32)
    np.testing.assert_allclose(prompt_features, expected, rtol=1e-3, atol=1e-3)

    assert not out["embedding"][1].any() and not out["prompt_features"][1].any()
    assert out["model_id"].tolist() == [stage.identity.tag] * 4
    assert stage.identity == ModelIdentity(src, ours.weights_sha256(), "xclip")
    assert stage.identity.tag == f"{src}@{ours.weights_sha256()[:16]}"
    assert out["uri"].tolist() == batch["uri"].tolist() and out["thumbnail"][0] == b"\xff\xd8jpeg"


def test_frames_that_do_not_fit_the_model_become_error_rows(checkpoint):
    stage = EncodeFrames(checkpoint[0])
    clip = videos(1)[0]
    rows = [clip[:2], clip[:, :16, :16], clip.astype(np.float32), None, clip]
    out = stage(decoded_batch(rows, [None] * 5))
    for i in range(4):
        assert "the model takes uint8 (3, 32, 32, 3)" in out["error"][i]
        assert not out["embedding"][i].any()
    assert "(2, 32, 32, 3)" in out["error"][0] and "float32" in out["error"][2]
    assert out["error"][4] is None
    np.testing.assert_allclose(np.linalg.norm(out["embedding"][4]), 1.0, rtol=1e-5)


def test_sub_batches_give_the_same_result_as_one_batch(checkpoint):
    batch = decoded_batch(list(videos(5, seed=1)), [None] * 5)
    batch["frames"] = videos(5, seed=1)  # a dense column, as Ray gives when every row has the same shape
    whole = EncodeFrames(checkpoint[0], batch_size=8)(batch)
    split = EncodeFrames(checkpoint[0], batch_size=2)(batch)
    np.testing.assert_allclose(split["embedding"], whole["embedding"], atol=1e-6, rtol=0)
    np.testing.assert_allclose(
        split["prompt_features"].astype(np.float32), whole["prompt_features"].astype(np.float32), atol=2e-3
    )


def test_lanes_encode_sub_batches_side_by_side_with_the_same_rows(checkpoint, monkeypatch):
    clips = list(videos(6, seed=2))
    errors = [None, "cannot decode", None, None, None, None, None]
    batch = decoded_batch([clips[0], None, *clips[1:]], errors)
    one = EncodeFrames(checkpoint[0], batch_size=2)(batch)
    threads = set()
    encode = EncodeFrames._encode
    together = threading.Barrier(3, timeout=30)  # passed only by three sub-batches encoding at once

    def noting_the_thread(self, videos):
        threads.add(threading.current_thread().name)
        together.wait()
        return encode(self, videos)

    monkeypatch.setattr(EncodeFrames, "_encode", noting_the_thread)
    lanes = EncodeFrames(checkpoint[0], batch_size=2, lanes=3)(batch)
    assert len([name for name in threads if name.startswith("videosearch-encode")]) == 3
    assert lanes["error"].tolist() == errors and not lanes["embedding"][1].any()
    np.testing.assert_allclose(lanes["embedding"], one["embedding"], atol=1e-6, rtol=0)
    np.testing.assert_array_equal(lanes["prompt_features"], one["prompt_features"])
    with pytest.raises(ValueError, match="lanes must be 1"):
        EncodeFrames(checkpoint[0], compiled=True, lanes=2)  # one graph cannot take sub-batches at once


def test_bf16_on_the_cpu_runs_the_model_in_bfloat16_within_its_rounding_of_the_reference(checkpoint):
    src, reference = checkpoint
    assert EncodeFrames(src, device="cpu", precision="fp32").dtype == torch.float32  # as auto on a CPU
    stage = EncodeFrames(src, device="cpu", batch_size=3, precision="bf16")
    assert {p.dtype for p in stage.model.parameters()} == {torch.bfloat16}
    clips = videos(4, seed=5)
    out = stage(decoded_batch(list(clips), [None] * 4))
    assert out["embedding"].dtype == np.float32 and out["prompt_features"].dtype == np.float16
    np.testing.assert_allclose(np.linalg.norm(out["embedding"], axis=1), 1.0, rtol=1e-5)
    expected = reference_embeddings(reference, clips)
    assert (out["embedding"] * expected).sum(axis=1).min() > 0.99  # close to float32's...
    assert np.abs(out["embedding"] - expected).max() > 1e-3  # ... and not float32's


@pytest.mark.parametrize(("instructions", "warned"), [([], True), (["amx_bf16"], False), (None, False)])
def test_bf16_on_a_cpu_without_bfloat16_instructions_is_warned_of(
    checkpoint, monkeypatch, caplog, instructions, warned
):
    monkeypatch.setattr(bf16, "cpu_bf16_instructions", lambda: instructions)
    with caplog.at_level("WARNING", logger=bf16.__name__):
        EncodeFrames(checkpoint[0], device="cpu", precision="bf16")
        EncodeFrames(checkpoint[0], device="cpu", precision="fp32")
    assert ("without bfloat16 instructions" in caplog.text) == warned
    assert len(caplog.records) == warned


def test_an_unknown_precision_is_refused_naming_the_choices(checkpoint):
    with pytest.raises(ValueError, match="--precision must be one of auto, fp32, bf16, got 'fp16'"):
        EncodeFrames(checkpoint[0], precision="fp16")
    with pytest.raises(ValueError, match="--precision must be one of auto, fp32, bf16, got 'fp16'"):
        EmbedOptions(precision="fp16")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (CI has none)")
def test_encode_on_cuda_runs_in_half_precision_and_agrees_with_the_reference(checkpoint):
    src, reference = checkpoint
    stage = EncodeFrames(src, device="cuda", batch_size=3)
    assert stage.dtype in (torch.bfloat16, torch.float16)
    assert {(p.device.type, p.dtype) for p in stage.model.parameters()} == {("cuda", stage.dtype)}
    assert stage.identity == EncodeFrames(src, device="cpu").identity  # hash of the weights as loaded

    clips = videos(5, seed=3)
    out = stage(decoded_batch([clips[0], None, *clips[1:]], [None, "cannot decode", None, None, None, None]))
    good = [0, 2, 3, 4, 5]
    assert out["embedding"].dtype == np.float32 and out["prompt_features"].dtype == np.float16
    np.testing.assert_allclose(np.linalg.norm(out["embedding"][good], axis=1), 1.0, rtol=1e-5)
    expected = reference_embeddings(reference, clips)  # float32 on the CPU
    cosine = (out["embedding"][good] * expected).sum(axis=1)
    assert cosine.min() > 0.99, cosine  # half precision: close, not equal
    assert not out["embedding"][1].any()

    exact = EncodeFrames(src, device="cuda", batch_size=3, precision="fp32")  # float32 on the GPU too
    assert {(p.device.type, p.dtype) for p in exact.model.parameters()} == {("cuda", torch.float32)}
    embedding = exact(decoded_batch(list(clips), [None] * 5))["embedding"]
    assert (embedding * expected).sum(axis=1).min() > 0.9999  # cuDNN's TF32 convolution aside, float32


def test_bad_model_source_is_a_clear_error(tmp_path, checkpoint):
    with pytest.raises(ModelLoadError, match="cannot load the model from .*nowhere"):
        EncodeFrames(str(tmp_path / "nowhere"))
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text("{not json")
    shutil.copy(f"{checkpoint[0]}/model.safetensors", tmp_path / "broken")
    with pytest.raises(ModelLoadError, match="not valid JSON"):
        EncodeFrames(str(tmp_path / "broken"))


def test_missing_preprocessor_config_falls_back_to_defaults(tmp_path, checkpoint):
    src = tmp_path / "no-preprocessor"
    shutil.copytree(checkpoint[0], src, ignore=shutil.ignore_patterns("preprocessor_config.json"))
    # X-CLIP's defaults at the model's own image size (32 px here; 224 for every published checkpoint)
    assert EncodeFrames(str(src)).preprocessor == VideoPreprocessor(size=32, crop_size=32)


def test_weights_sha256(tmp_path, checkpoint):
    model = XCLIPModel.from_pretrained(checkpoint[0])
    digest = model.weights_sha256()
    assert len(digest) == 64
    model.save_pretrained(tmp_path / "ours")
    assert XCLIPModel.from_pretrained(tmp_path / "ours").weights_sha256() == digest
    with torch.no_grad():
        model.mit.position_embedding[0, 0, 0] += 1e-3
    assert model.weights_sha256() != digest


def test_row_id_is_stable_and_distinct():
    assert row_id("s3://b/v.mp4", 0) == row_id("s3://b/v.mp4", np.int64(0)) == 2771767794655092092
    ids = {row_id("s3://b/v.mp4", segment) for segment in range(1000)} | {row_id("s3://b/w.mp4", 0)}
    assert len(ids) == 1001
    assert all(0 <= i < 2**63 for i in ids)


def test_write_part_round_trip(tmp_path, checkpoint):
    encoded = EncodeFrames(checkpoint[0])(decoded_batch([videos(1)[0], None], [None, "unreadable"]))
    library = str(tmp_path / "library")
    described = WritePart(library, DIM, (PATCHES, DIM))(encoded)

    counts = {k: v.tolist() for k, v in described.items() if k in ("rows", "ok", "errors")}
    assert counts == {"rows": [2], "ok": [1], "errors": [1]}
    part = written_part({name: column[0] for name, column in described.items()})
    assert part.path.startswith("parts/part-") and part.path.endswith(".parquet")
    assert part.features == features_path(part.path)
    for name, crc in ((part.path, part.crc32), (part.features, part.features_crc32)):  # check reads them
        assert crc == zlib.crc32((tmp_path / "library" / name).read_bytes())
    assert part.file_bytes == (tmp_path / "library" / part.path).stat().st_size  # remote reads skip asking
    schema = part_schema(DIM, (PATCHES, DIM))
    # the part file holds all but the re-rank features; read back, the part has them all
    assert pq.read_table(f"{library}/{part.path}").schema.equals(stored_schema(schema))
    table = read_part(Store(library), part, schema)
    assert table.equals(rows_to_table(encoded, DIM, (PATCHES, DIM)))

    rows = table.to_pylist()
    assert [r["id"] for r in rows] == [row_id(u, 0) for u in encoded["uri"]]
    for name in (n for n in DECODED if n not in ("frames", "segment")):
        assert [r[name] for r in rows] == encoded[name].tolist(), name
    np.testing.assert_array_equal(np.array([r["embedding"] for r in rows], np.float32), encoded["embedding"])
    prompt = np.array([r["prompt_features"] for r in rows], np.float16).reshape(2, PATCHES, DIM)
    np.testing.assert_array_equal(prompt, encoded["prompt_features"])
    assert [r["model_id"] for r in rows] == encoded["model_id"].tolist()


def test_write_part_of_an_empty_batch_writes_nothing(tmp_path):
    empty = {name: np.array([]) for name in ENCODED}
    assert all(len(column) == 0 for column in WritePart(str(tmp_path), DIM, (PATCHES, DIM))(empty).values())
    assert not list(tmp_path.iterdir())


def test_a_compiled_encoder_gives_the_eager_embeddings_from_one_graph(checkpoint):
    stats = compiled_graphs_from_here()
    clips = videos(5, seed=2)
    batch = decoded_batch([*clips[:3], None, *clips[3:]], [None, None, None, "cannot decode", None, None])
    eager = EncodeFrames(checkpoint[0], device="cpu", batch_size=3)(batch)
    stage = EncodeFrames(checkpoint[0], device="cpu", batch_size=3, compiled=True)
    out = stage(batch)  # two sub-batches: 3 videos, then 2 padded to 3

    assert out["error"].tolist() == eager["error"].tolist()
    np.testing.assert_allclose(out["embedding"], eager["embedding"], atol=1e-5, rtol=0)
    np.testing.assert_allclose(
        out["prompt_features"].astype(np.float32), eager["prompt_features"].astype(np.float32), atol=2e-3
    )
    assert not out["embedding"][3].any()
    out = stage(decoded_batch([clips[0]], [None]))  # a lone video: padded too, no recompile
    np.testing.assert_allclose(out["embedding"][0], eager["embedding"][0], atol=1e-5, rtol=0)
    assert stats["unique_graphs"] == 1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (CI has none)")
def test_a_compiled_encoder_on_cuda_replays_one_graph_and_agrees_with_eager(checkpoint):
    stats = compiled_graphs_from_here()
    clips = videos(7, seed=4)
    batch = decoded_batch(list(clips), [None] * 7)
    eager = EncodeFrames(checkpoint[0], device="cuda", batch_size=4)(batch)
    stage = EncodeFrames(checkpoint[0], device="cuda", batch_size=4, compiled=True)
    first = stage(batch)
    order = [6, 0, 5, 1, 4, 2, 3]  # the same clips in other batches, replayed over the first's buffers
    second = stage(decoded_batch([clips[i] for i in order], [None] * 7))
    # each row is its own clip's: two clips' cosine is below 0.99 here, a clip's own above 0.999 in bf16
    for out, rows in ((first, list(range(7))), (second, order)):
        cosine = (out["embedding"] * eager["embedding"][rows]).sum(axis=1)
        assert cosine.min() > 0.999, cosine
    assert stats["unique_graphs"] == 1
