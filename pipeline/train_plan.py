"""The train job on Ray Train: a table of described videos -> the embed job's decode stage -> data-parallel
``TorchTrainer`` workers stepping the X-CLIP loss -> a checkpoint per epoch on any fsspec store.

Videos are decoded once (the decode stage's actor pool, errors dropped with a count) and kept in Ray's
object store, which spills to disk beyond its memory; every epoch then reshuffles them. Each checkpoint is a
complete model directory (Hugging Face layout with tokenizer and preprocessor files, usable as ``--model``)
plus the training state that resumes the run exactly.
"""

from __future__ import annotations

import contextlib
import math
import random
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import ray.data
import torch

from xclip_core import XCLIPConfig, XCLIPModel
from xclip_core.processor import XCLIPProcessor
from xclip_core.tokenizer import CLIPTokenizer
from xclip_core.video_transforms import VideoPreprocessor

from .plan import connect, decoded
from .stages.encode import checkpoint_preprocessor
from .storage import StorageOptions, filesystem, join, protocol_of, storage_errors
from .train import TrainConfig, Trainer, freeze, read_history
from .video_table import DEFAULT_TEMPLATE, read_video_table

SHUFFLE_BUFFER = 1024  # clips each worker draws its batches from, in random order


@dataclass
class TrainOptions:
    """What ``videosearch train`` can set."""

    output: str  # where checkpoints go: checkpoint-<step>/ in the Hugging Face layout
    model: str | None = None  # a checkpoint to fine-tune; None trains ``config`` from scratch
    config: XCLIPConfig | None = None  # geometry when training from scratch
    resume: str | None = None  # a checkpoint of an earlier run to continue with its own settings and state
    epochs: int = 1  # epochs in all, those of a resumed run included
    batch_size: int = 8  # clips per worker and step
    workers: int = 1
    use_gpu: bool = False
    cpus_per_worker: float | None = None  # default: the cluster's CPUs shared among the workers
    template: str = DEFAULT_TEMPLATE  # the caption of a labeled video
    seed: int = 0  # model initialization and shuffling
    address: str | None = None  # Ray address; None starts (or joins) a local Ray
    train: TrainConfig = field(default_factory=TrainConfig)
    storage: StorageOptions = field(default_factory=StorageOptions)

    def __post_init__(self) -> None:
        if sum(x is not None for x in (self.model, self.config, self.resume)) != 1:
            raise ValueError("train needs exactly one of: a model to fine-tune, a config, or a run to resume")
        if self.epochs < 1 or self.batch_size < 2 or self.workers < 1:
            raise ValueError("epochs and workers must be at least 1, the batch size at least 2")


@dataclass
class TrainSummary:
    checkpoint: str  # the last checkpoint's URI
    clips: int  # decoded clips trained on
    failed: int  # listed videos that could not be decoded
    epochs: list[dict[str, float]]  # per epoch: epoch, loss (mean over steps), steps (in all)
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def text(self) -> str:
        lines = [
            f"epoch {int(e['epoch'])}: loss {e['loss']:.4f} ({int(e['steps'])} steps)" for e in self.epochs
        ]
        lines.append(
            f"trained on {self.clips} clips ({self.failed} failed to decode) in {self.seconds:.0f} s; "
            f"last checkpoint: {self.checkpoint}"
        )
        return "\n".join(lines)


def _start_model(options: TrainOptions) -> XCLIPModel:
    if options.model:
        storage = options.storage.for_protocol(protocol_of(options.model))
        return XCLIPModel.from_pretrained(options.model, storage_options=storage)
    return XCLIPModel(options.config)


def _train_worker(config: dict[str, Any]) -> None:
    """One Ray Train worker: its shard of decoded clips, X-CLIP steps, checkpoints from rank 0."""
    import ray.train
    import ray.train.torch

    options: TrainOptions = config["options"]
    preprocessor: VideoPreprocessor = config["preprocessor"]
    if config["threads"]:
        torch.set_num_threads(config["threads"])
    torch.manual_seed(options.seed)
    tokenizer = CLIPTokenizer.from_pretrained()
    if options.resume:
        trainer = Trainer.resume(
            options.resume, tokenizer, options.storage, wrap=ray.train.torch.prepare_model
        )
        # the run's own settings, its cosine stretched if it now runs to more epochs
        trainer.config = replace(trainer.config, total_steps=options.train.total_steps)
    else:
        model = _start_model(options)
        freeze(model, options.train.freeze)
        trainer = Trainer(ray.train.torch.prepare_model(model), tokenizer, options.train)
    device = ray.train.torch.get_device()
    rank = ray.train.get_context().get_world_rank()
    shard = ray.train.get_dataset_shard("train")
    texts: dict[str, list[str]] = config["texts"]
    for epoch in range(trainer.epoch, options.epochs):
        losses = []
        draw = random.Random(f"{options.seed}/{epoch}/{rank}")  # one of a video's captions per step
        batches = shard.iter_batches(
            batch_size=options.batch_size,
            batch_format="numpy",
            local_shuffle_buffer_size=SHUFFLE_BUFFER,
            local_shuffle_seed=draw.getrandbits(32),
        )
        for batch in batches:
            if len(batch["uri"]) < 2:
                continue  # the contrastive loss needs at least two clips
            pixel_values = torch.stack([preprocessor.normalize(frames) for frames in batch["frames"]])
            captions = [draw.choice(texts[uri]) for uri in batch["uri"]]
            losses.append(trainer.step(pixel_values.to(device), captions))
        record = trainer.end_epoch(losses)
        if rank == 0:
            target = trainer.save(options.output, options.storage)
            storage = options.storage.for_protocol(protocol_of(target))
            XCLIPProcessor(tokenizer, preprocessor).save_pretrained(target, storage)
        ray.train.report(record)


def train(table_uri: str, options: TrainOptions) -> TrainSummary:
    """Train X-CLIP on a ``uri,caption`` or ``uri,label`` table with Ray Train."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    started = time.perf_counter()
    rows = read_video_table(table_uri, options.storage, options.template)
    source = options.resume or options.model
    if source:
        storage = options.storage.for_protocol(protocol_of(source))
        # loaded once here: a bad checkpoint fails before Ray starts
        geometry = XCLIPModel.from_pretrained(source, storage_options=storage).config
        preprocessor = checkpoint_preprocessor(source, storage)
    else:
        geometry = options.config
        size = geometry.vision_config.image_size
        preprocessor = VideoPreprocessor(size=size, crop_size=size)
    resources = connect(options.address)
    texts: dict[str, list[str]] = {}
    for row in rows:
        texts.setdefault(row.uri, []).append(row.text)
    listed = []
    for uri in texts:
        fs, path = filesystem(uri, options.storage)
        with storage_errors(uri, "reading", options.storage):
            listed.append({"uri": uri, "size": fs.size(path), "etag": None, "mtime": None})
    cpus = options.cpus_per_worker or max(1.0, resources.get("CPU", 1) // options.workers)
    decoders = max(1, int(resources.get("CPU", 1)))
    with _in_order():  # the clips in table order, whichever decoder finishes first: seeded shuffles repeat
        clips = (
            decoded(
                listed, geometry.vision_config.num_frames, preprocessor, None, options.storage, decoders, 1.0
            )
            .filter(lambda row: row["error"] is None)
            .materialize()  # decoded once: every epoch reads the object store
        )
    count = clips.count()
    if count < 2:
        raise ValueError(
            f"only {count} of {len(rows)} videos in {table_uri} could be decoded: nothing to train on"
        )
    settings = options.train
    if settings.total_steps is None:  # cosine decay over the whole run
        steps_per_epoch = math.ceil(count / options.workers / options.batch_size)
        settings = replace(settings, total_steps=steps_per_epoch * options.epochs)
    trainer = TorchTrainer(
        _train_worker,
        train_loop_config={
            "options": replace(options, train=settings),
            "preprocessor": preprocessor,
            "texts": texts,
            "threads": None if options.use_gpu else math.ceil(cpus),
        },
        scaling_config=ScalingConfig(
            num_workers=options.workers, use_gpu=options.use_gpu, resources_per_worker={"CPU": cpus}
        ),
        run_config=RunConfig(name=f"videosearch-train-{int(time.time())}"),
        datasets={"train": clips},
    )
    trainer.fit()
    last = last_checkpoint(options.output, options.storage)
    history = read_history(last, options.storage)
    return TrainSummary(last, count, len(listed) - count, history, time.perf_counter() - started)


@contextlib.contextmanager
def _in_order() -> Iterator[None]:
    """Ray Data keeps the input order of the datasets executed inside."""
    options = ray.data.DataContext.get_current().execution_options
    before, options.preserve_order = options.preserve_order, True
    try:
        yield
    finally:
        options.preserve_order = before


def last_checkpoint(output: str, storage: StorageOptions) -> str:
    """The newest ``checkpoint-<step>`` under a run's output."""
    fs, path = filesystem(output, storage)
    fs.invalidate_cache(path)  # instances are shared: never answer from an older listing
    names = [name.rstrip("/").rsplit("/", 1)[-1] for name in fs.ls(path, detail=False)]
    steps = sorted(name for name in names if name.startswith("checkpoint-"))
    if not steps:
        raise FileNotFoundError(f"no checkpoint-<step> under {output}")
    return join(output, steps[-1])
