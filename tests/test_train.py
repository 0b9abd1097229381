"""Training: the X-CLIP loss falls on real videos, freezing holds, and a checkpoint resumes exactly."""

from __future__ import annotations

import pytest
import torch

from pipeline.plan import TrainOptions, train
from pipeline.synthetic import render, sample_scenes, write_dataset
from pipeline.train import TrainConfig, Trainer, trainable
from xclip_core import XCLIPModel
from xclip_core.tokenizer import CLIPTokenizer
from xclip_core.video_transforms import VideoPreprocessor


@pytest.fixture(scope="module")
def batch() -> tuple[torch.Tensor, list[str]]:
    """Six captioned synthetic clips, preprocessed for the tiny model (4 frames, 32 px)."""
    scenes = sample_scenes(6, seed=2)
    preprocessor = VideoPreprocessor(size=32, crop_size=32)
    videos = [preprocessor(torch.from_numpy(render(s, 4, 64, 48)))["pixel_values"][0] for s in scenes]
    return torch.stack(videos), [s.caption for s in scenes]


def test_the_loss_falls(tiny_model, batch) -> None:
    torch.manual_seed(0)
    trainer = Trainer(
        XCLIPModel.from_pretrained(tiny_model), CLIPTokenizer.from_pretrained(), TrainConfig(1e-3)
    )
    losses = trainer.fit([batch] * 30)
    assert sum(losses[-5:]) / 5 < 0.5 * sum(losses[:5]) / 5


def test_a_checkpoint_resumes_exactly(tiny_model, batch, tmp_path) -> None:
    tokenizer = CLIPTokenizer.from_pretrained()
    torch.manual_seed(0)
    straight = Trainer(XCLIPModel.from_pretrained(tiny_model), tokenizer, TrainConfig(1e-3))
    straight.fit([batch] * 3)
    checkpoint = straight.save(str(tmp_path / "run"))
    straight.fit([batch] * 3)

    resumed = Trainer.resume(checkpoint, tokenizer)
    assert resumed.step_count == 3
    resumed.fit([batch] * 3)
    for (name, a), b in zip(
        straight.model.state_dict().items(), resumed.model.state_dict().values(), strict=True
    ):
        assert torch.equal(a, b), name


def test_freezing_the_towers_trains_only_x_clip_blocks(tiny_model, batch) -> None:
    model = XCLIPModel.from_pretrained(tiny_model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    Trainer(model, CLIPTokenizer.from_pretrained(), TrainConfig(1e-3, freeze="towers")).fit([batch] * 2)
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed and all(trainable(k, "towers") for k in changed)
    assert (
        "mit.position_embedding" in changed and "text_model.embeddings.token_embedding.weight" not in changed
    )
    with pytest.raises(ValueError, match="unknown freeze option"):
        trainable("x", "everything")


def test_ray_train_job_decodes_trains_and_checkpoints(tiny_model, tmp_path) -> None:
    table = write_dataset(tmp_path / "clips", sample_scenes(6, seed=4), seconds=1.0, fps=8)
    with open(table, "a") as f:
        f.write(f"{tmp_path / 'bad.mp4'},a file that is not a video\n")  # must not stop the job
    (tmp_path / "bad.mp4").write_bytes(b"not a video")
    options = TrainOptions(
        output=str(tmp_path / "run"), model=str(tiny_model), epochs=2, batch_size=6, train=TrainConfig(1e-3)
    )
    # two epochs of one six-clip batch each: one optimizer step per epoch, a checkpoint after each
    assert train(table, options) == str(tmp_path / "run" / "checkpoint-00000002")
    trained = XCLIPModel.from_pretrained(tmp_path / "run" / "checkpoint-00000002")
    start = XCLIPModel.from_pretrained(tiny_model)
    assert not torch.equal(trained.mit.position_embedding, start.mit.position_embedding)
