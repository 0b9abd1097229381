"""Training: the X-CLIP loss falls on real videos, freezing holds, a checkpoint resumes exactly, and the Ray
Train job trains X-CLIP and EVL models that the pipeline embeds and searches with."""

from __future__ import annotations

import json
import re
from dataclasses import replace

import pytest
import torch
from fault_proxy import FaultProxy

from pipeline.cli import main
from pipeline.library import Library
from pipeline.models import load_model
from pipeline.samples.synthetic import render, sample_scenes, write_dataset
from pipeline.storage import Store
from pipeline.train.config import TrainConfig, trainable
from pipeline.train.job import train
from pipeline.train.options import TrainOptions
from pipeline.train.trainer import Trainer
from xclip_core import XCLIPModel
from xclip_core.evl.build import evl_over_clip
from xclip_core.evl.model import EVLModel
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
    losses = trainer.fit([batch] * 40)
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


@pytest.fixture
def table_with_a_bad_video(tmp_path) -> str:
    """Six captioned clips of one second, and a file that is not a video (it must not stop the job)."""
    table = write_dataset(tmp_path / "clips", sample_scenes(6, seed=4), seconds=1.0, fps=8)
    with open(table, "a") as f:
        f.write(f"{tmp_path / 'bad.mp4'},a file that is not a video\n")
    (tmp_path / "bad.mp4").write_bytes(b"not a video")
    return table


@pytest.mark.parametrize("executor", ["ray", "in-process"])
def test_train_job_decodes_trains_and_checkpoints_the_same_run_for_the_same_seed(
    tiny_model, table_with_a_bad_video, tmp_path, executor
) -> None:
    options = TrainOptions(
        output=str(tmp_path / "run"),
        model=str(tiny_model),
        epochs=2,
        batch_size=4,
        executor=executor,
        train=TrainConfig(1e-3),
    )
    # two epochs of a four-clip and a two-clip batch: two optimizer steps per epoch, a checkpoint after each
    summary = train(table_with_a_bad_video, options)
    assert summary.executor == executor
    assert summary.checkpoint == str(tmp_path / "run" / "checkpoint-00000004")
    assert (summary.clips, summary.failed, [e["steps"] for e in summary.epochs]) == (6, 1, [2, 4])
    trained = XCLIPModel.from_pretrained(tmp_path / "run" / "checkpoint-00000004")
    start = XCLIPModel.from_pretrained(tiny_model)
    assert not torch.equal(trained.mit.position_embedding, start.mit.position_embedding)
    # the same seed, the same run: clips in table order whichever decoder finishes first, seeded shuffles
    again = train(table_with_a_bad_video, replace(options, output=str(tmp_path / "again")))
    assert XCLIPModel.from_pretrained(again.checkpoint).weights_sha256() == trained.weights_sha256()
    if executor == "in-process":  # (the seeds reach both executors' shuffles by the same loop)
        other = train(table_with_a_bad_video, replace(options, output=str(tmp_path / "seed"), seed=1))
        assert XCLIPModel.from_pretrained(other.checkpoint).weights_sha256() != trained.weights_sha256()


def test_one_full_batch_step_is_the_same_on_both_executors(
    tiny_model, table_with_a_bad_video, batch, tmp_path
) -> None:
    """The two executors differ in how they shuffle only: a batch of every clip takes the same step (here an
    EVL decoder's, from the frozen backbone's features cached on Ray's actor pool or in this process)."""
    torch.manual_seed(0)
    evl = evl_over_clip(tiny_model)
    # no dropout: its masks follow a clip's place in the batch, which the executors' shuffles choose
    evl.config.decoder_config.mlp_dropout = evl.config.classifier_dropout = 0.0
    evl.save_pretrained(tmp_path / "evl")
    evl.processor.save_pretrained(str(tmp_path / "evl"))
    options = TrainOptions(
        output=str(tmp_path / "ray"),
        model=str(tmp_path / "evl"),
        batch_size=8,
        backbone_cache="on",
        executor="ray",
        train=TrainConfig(1e-3),
    )
    on_ray = train(table_with_a_bad_video, options)
    here = train(
        table_with_a_bad_video, replace(options, output=str(tmp_path / "here"), executor="in-process")
    )
    assert on_ray.backbone_cached and here.backbone_cached and (here.clips, here.failed) == (6, 1)
    assert here.epochs[0]["loss"] == pytest.approx(on_ray.epochs[0]["loss"], rel=1e-5)
    # the same model: the same embeddings of other clips (not the same weights to the last bits: AdamW's
    # first step is as large for a gradient of rounding noise, as a key bias's, as for a real one)
    with torch.no_grad():
        embeddings = [load_model(run.checkpoint).encode_videos(batch[0])[0] for run in (on_ray, here)]
    torch.testing.assert_close(*embeddings, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(embeddings[0], load_model(str(tmp_path / "evl")).encode_videos(batch[0])[0])


def test_an_in_process_run_downloads_its_start_checkpoint_once(
    tiny_model, table_with_a_bad_video, tmp_path, s3, bucket
) -> None:
    """The job checks, caches the frozen backbone's features of, and trains one model, loaded once: a
    checkpoint on S3 costs the requests of one load."""
    evl = evl_over_clip(tiny_model)
    evl.save_pretrained(tmp_path / "evl")
    evl.processor.save_pretrained(str(tmp_path / "evl"))
    proxy = FaultProxy(s3.endpoint_url)
    try:
        storage = replace(s3.options, endpoint_url=proxy.url)
        start = Store(f"s3://{bucket}/evl", storage)
        for file in (tmp_path / "evl").iterdir():
            start.write_bytes(file.name, file.read_bytes())

        def weight_requests() -> int:
            seen = [path for method, path, _ in proxy.faults.seen if method == "GET"]
            proxy.faults.seen.clear()
            return sum(path.split("?")[0].endswith("/model.safetensors") for path in seen)

        load_model(start.uri, storage)
        one_load = weight_requests()
        options = TrainOptions(
            output=str(tmp_path / "run"),
            model=start.uri,
            epochs=2,
            batch_size=3,
            backbone_cache="on",
            executor="in-process",
            storage=storage,
        )
        summary = train(table_with_a_bad_video, options)
    finally:
        proxy.close()
    assert summary.backbone_cached and [e["steps"] for e in summary.epochs] == [2, 4]
    assert weight_requests() == one_load > 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (CI has none)")
def test_in_process_training_on_a_cuda_gpu_takes_the_cpus_step(tiny_model, table_with_a_bad_video, tmp_path):
    options = TrainOptions(
        output=str(tmp_path / "cpu"),
        model=str(tiny_model),
        batch_size=8,
        executor="in-process",
        train=TrainConfig(1e-3, precision="fp32"),
    )
    on_cpu = train(table_with_a_bad_video, options)
    on_gpu = train(table_with_a_bad_video, replace(options, output=str(tmp_path / "gpu"), use_gpu=True))
    assert on_gpu.epochs[0]["loss"] == pytest.approx(on_cpu.epochs[0]["loss"], rel=1e-3)
    assert load_model(on_gpu.checkpoint).weights_sha256() != load_model(str(tiny_model)).weights_sha256()


def test_schedule_warms_up_then_decays_to_zero_and_precision_is_checked() -> None:
    config = TrainConfig(learning_rate=1e-3, warmup_steps=10, total_steps=110)
    rates = [config.learning_rate_at(step) for step in range(111)]
    assert rates[0] == pytest.approx(1e-4) and rates[9] == pytest.approx(1e-3)
    assert rates[60] == pytest.approx(5e-4) and rates[110] == pytest.approx(0.0, abs=1e-12)
    assert all(a >= b for a, b in zip(rates[9:], rates[10:], strict=False))
    assert TrainConfig(learning_rate=1e-3).learning_rate_at(10_000) == 1e-3
    with pytest.raises(ValueError, match="unknown precision"):
        TrainConfig(precision="fp8")


def test_bf16_autocast_steps_keep_float32_weights(tiny_model, batch) -> None:
    trainer = Trainer(
        XCLIPModel.from_pretrained(tiny_model), CLIPTokenizer.from_pretrained(), TrainConfig(precision="bf16")
    )
    loss = trainer.step(*batch)
    assert loss == loss and loss > 0  # finite
    assert {p.dtype for p in trainer.model.parameters()} == {torch.float32}


def test_cli_trains_from_scratch_on_labels_then_resumes(tiny_model, tmp_path, capsys) -> None:
    scenes = sample_scenes(6, seed=7)
    write_dataset(tmp_path / "clips", scenes, seconds=1.0, fps=8)
    with open(tmp_path / "clips" / "labels.csv", "w") as f:
        f.write("uri,label\n")
        f.writelines(f"clip-{i:05d}.mp4,{s.shapes[0].kind}\n" for i, s in enumerate(scenes))
    table, run = str(tmp_path / "clips" / "labels.csv"), str(tmp_path / "run")
    common = ["--batch-size", "3", "--lr", "1e-3", "--executor", "in-process", "--json"]
    assert main(["train", table, run, "--config", str(tiny_model / "config.json"), *common]) == 0
    out, err = capsys.readouterr()
    first = json.loads(out)
    assert re.search(r"epoch 1 of 1: loss \d+\.\d{4} \(2 steps in all, \d+ s\)", err), err  # as it ends
    assert first["checkpoint"] == str(tmp_path / "run" / "checkpoint-00000002")
    assert [e["epoch"] for e in first["epochs"]] == [1] and first["clips"] == 6
    assert first["executor"] == "in-process"

    assert main(["train", table, run, "--resume", first["checkpoint"], "--epochs", "2", *common]) == 0
    second = json.loads(capsys.readouterr().out)
    assert second["checkpoint"] == str(tmp_path / "run" / "checkpoint-00000004")
    assert second["epochs"][0] == first["epochs"][0] and second["epochs"][1]["steps"] == 4
    # each checkpoint is a complete model directory: the embed job can take it as --model
    assert XCLIPModel.from_pretrained(second["checkpoint"]).config.vision_config.image_size == 32
    assert CLIPTokenizer.from_pretrained(second["checkpoint"])("a circle")["input_ids"].shape == (1, 77)


def test_missing_videos_are_skipped_and_named_and_too_few_clips_say_why(
    tiny_model, table_with_a_bad_video, tmp_path, capsys, caplog
) -> None:
    """A video deleted since the table was written is skipped as an undecodable one is (the run goes on,
    the summary counts it); a table of which no video exists, or one clip, is refused saying so."""
    with open(table_with_a_bad_video, "a") as f:
        f.write("gone.mp4,a clip deleted since\n")
    common = ["--model", str(tiny_model), "--batch-size", "4", "--executor", "in-process", "--json"]
    assert main(["train", table_with_a_bad_video, str(tmp_path / "run"), *common]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert (summary["clips"], summary["failed"], summary["missing"]) == (6, 1, 1)
    gone = tmp_path / "clips" / "gone.mp4"
    skipped = f"1 of the 8 videos of {table_with_a_bad_video} do not exist and are skipped: {gone}"
    assert skipped in caplog.text

    (tmp_path / "gone.csv").write_text("uri,caption\ngone-1.mp4,a\ngone-2.mp4,b\n")
    assert main(["train", str(tmp_path / "gone.csv"), str(tmp_path / "run2"), *common]) == 2
    assert f"none of the 2 videos of {tmp_path / 'gone.csv'} exists ({tmp_path / 'gone-1.mp4'}, " in (
        capsys.readouterr().err
    )
    (tmp_path / "one.csv").write_text(f"uri,caption\n{tmp_path / 'clips' / 'clip-00000.mp4'},a\n")
    assert main(["train", str(tmp_path / "one.csv"), str(tmp_path / "run3"), *common]) == 2
    assert "1 of the 1 videos" in (err := capsys.readouterr().err) and "training needs at least 2" in err


def test_cli_train_rejects_a_bad_table_before_starting_ray(tmp_path, capsys) -> None:
    (tmp_path / "t.csv").write_text("path,text\nx.mp4,y\n")
    assert main(["train", str(tmp_path / "t.csv"), str(tmp_path / "run"), "--config", "nope"]) == 2
    assert "unknown X-CLIP preset 'nope'" in capsys.readouterr().err
    assert main(["train", str(tmp_path / "t.csv"), str(tmp_path / "run")]) == 2
    assert "needs a 'uri' column" in capsys.readouterr().err


def test_two_data_parallel_workers_checkpoint_to_s3_and_resume_from_there(
    tiny_model, tmp_path, s3, bucket
) -> None:
    table = write_dataset(tmp_path / "clips", sample_scenes(8, seed=9), seconds=1.0, fps=8)
    run = f"s3://{bucket}/runs/two-workers"
    # credentials in the options, not only in this process's environment: Ray's workers may predate it
    storage = replace(s3.options, extra={"key": "testing", "secret": "testing"})
    options = TrainOptions(
        output=run, model=str(tiny_model), batch_size=2, workers=2, cpus_per_worker=1, storage=storage
    )
    summary = train(table, options)
    # eight clips shared by two workers, two per step: two steps each, the gradients averaged between them
    assert summary.checkpoint == f"{run}/checkpoint-00000002" and summary.epochs[0]["steps"] == 2
    trained = XCLIPModel.from_pretrained(summary.checkpoint, storage_options=storage.for_protocol("s3"))
    start = XCLIPModel.from_pretrained(tiny_model)
    assert not torch.equal(trained.mit.position_embedding, start.mit.position_embedding)

    # resumed in this process (a Ray run's checkpoint resumes on either executor)
    again = TrainOptions(
        output=run, resume=summary.checkpoint, epochs=2, batch_size=2, executor="in-process", storage=storage
    )
    resumed = train(table, again)
    assert resumed.checkpoint == f"{run}/checkpoint-00000006"  # one worker now: four steps of two clips
    assert [e["steps"] for e in resumed.epochs] == [2, 6] and resumed.executor == "in-process"


def test_cli_trains_a_text_aligned_evl_model_whose_library_answers_queries(
    tiny_model, tmp_path, capsys
) -> None:
    table = write_dataset(tmp_path / "clips", sample_scenes(6, seed=9), seconds=1.0, fps=8)
    run, library = str(tmp_path / "run"), str(tmp_path / "library")
    train_flags = ["--family", "evl", "--backbone", str(tiny_model), "--batch-size", "3", "--lr", "1e-3"]
    assert (
        main(["train", table, run, *train_flags, "--epochs", "2", "--executor", "in-process", "--json"]) == 0
    )
    summary = json.loads(capsys.readouterr().out)
    # two epochs: the frozen backbone ran once per clip, and both epochs stepped the decoder
    assert summary["backbone_cached"] and [e["steps"] for e in summary["epochs"]] == [2, 4]
    checkpoint = summary["checkpoint"]
    model = load_model(checkpoint)
    assert isinstance(model, EVLModel) and model.config.text_aligned

    assert main(["embed", str(tmp_path / "clips"), library, "--model", checkpoint, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["ok"] == 6
    caption = sample_scenes(6, seed=9)[2].caption
    assert main(["query", library, caption, "-k", "6", "--json"]) == 0
    hits = json.loads(capsys.readouterr().out)
    assert len(hits) == 6 and {hit["scored_by"] for hit in hits} == {"cosine"}
    # the score is the cosine of the query's and the stored embeddings, best first: no re-rank stage
    rows = Library.open(library).table(["id", "embedding"]).to_pylist()
    stored = {row["id"]: torch.tensor(row["embedding"]) for row in rows}
    text = torch.nn.functional.normalize(model.encode_texts([caption])[0], dim=-1)
    for hit in hits:
        assert abs(hit["score"] - float(stored[hit["id"]] @ text)) < 1e-5
    assert [hit["score"] for hit in hits] == sorted((hit["score"] for hit in hits), reverse=True)
    assert main(["query", library, caption]) == 0
    assert "the embeddings' cosine" in capsys.readouterr().out
