"""The train job on Ray Train: a table of described videos -> the embed job's decode stage -> data-parallel
``TorchTrainer`` workers stepping the model family's loss -> a checkpoint per epoch on any fsspec store.

Videos are decoded once (the decode stage's actor pool, errors dropped with a count) and kept in Ray's
object store, which spills to disk beyond its memory; every epoch then reshuffles them. Each checkpoint is a
complete model directory (Hugging Face layout with tokenizer and preprocessor files, usable as ``--model``)
plus the training state that resumes the run exactly.
"""

from __future__ import annotations

import contextlib
import functools
import math
import random
import time
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import ray.data
import torch

from ..embed.on_ray import cluster_nodes, connect, decoded, pool
from ..embed.stages.decode import DecodeSettings
from ..models import VideoTextModel, default_model_source, load_model, new_model
from ..storage import Store
from ..video_table import DescribedVideo, read_video_table
from .backbone_cache import COLUMN as CACHED
from .backbone_cache import BackboneFeatures, check_mode, feature_bytes, from_stored, use_cache
from .options import TrainOptions, TrainSummary
from .resources import train_resources
from .trainer import Trainer, freeze, read_history

SHUFFLE_BUFFER = 1024  # clips each worker draws its batches from, in random order


def _start_model(options: TrainOptions, labels: list[str] | None) -> VideoTextModel:
    """The model a run starts from: the checkpoint to fine-tune, ``options.config`` initialized, or a new
    EVL model over ``options.backbone`` (a classifier of ``labels``, else text-aligned), the same in every
    worker (seeded)."""
    if options.model:
        return load_model(options.model, options.storage)
    if options.family == "evl":
        from xclip_core.evl.build import evl_over_clip

        torch.manual_seed(options.seed)
        backbone = options.backbone or default_model_source()
        return evl_over_clip(
            backbone, labels, storage_options=Store(backbone, options.storage).fsspec_options()
        )
    return new_model(options.config)


def _starting_model(options: TrainOptions, labels: list[str] | None) -> VideoTextModel:
    """The model as the run starts (:func:`_start_model`) or resumes it (the checkpoint resumed)."""
    return load_model(options.resume, options.storage) if options.resume else _start_model(options, labels)


def _targets(rows: list[DescribedVideo], model: VideoTextModel, table_uri: str) -> dict[str, list[str]]:
    """Each video's training targets: its captions (a label's through the template), or its labels for a
    model that trains on labels (which must be among its classes)."""
    targets: dict[str, list[str]] = {}
    on_labels = model.trains_on == "label"
    for row in rows:
        if on_labels and row.label is None:
            raise ValueError(f"{table_uri}: this model is a classifier: it trains on a uri,label table")
        targets.setdefault(row.uri, []).append(row.label if on_labels else row.text)
    known = getattr(model.config, "labels", None)
    if on_labels and known is not None:
        unknown = sorted({t for texts in targets.values() for t in texts} - set(known))
        if unknown:
            raise ValueError(f"{table_uri}: labels the model has no class for: {', '.join(unknown[:10])}")
    return targets


def _train_worker(config: dict[str, Any]) -> None:
    """One Ray Train worker: its shard of decoded clips, the family's training steps, checkpoints from rank
    0."""
    import ray.train
    import ray.train.torch

    options: TrainOptions = config["options"]
    if config["threads"]:
        torch.set_num_threads(config["threads"])
    torch.manual_seed(options.seed)
    if options.resume:
        trainer = Trainer.resume(options.resume, options=options.storage, wrap=ray.train.torch.prepare_model)
        # the run's own settings, its cosine stretched if it now runs to more epochs
        trainer.config = replace(trainer.config, total_steps=options.train.total_steps)
    else:
        model = _start_model(options, config["labels"])
        freeze(model, options.train.freeze)
        trainer = Trainer(ray.train.torch.prepare_model(model), config=options.train)
    preprocessor = trainer.core.preprocessor
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
            targets = [draw.choice(texts[uri]) for uri in batch["uri"]]
            if CACHED in batch:
                features = from_stored(batch[CACHED]).to(device)
                losses.append(trainer.step(None, targets, backbone_features=features))
            else:
                pixel_values = torch.stack([preprocessor.normalize(frames) for frames in batch["frames"]])
                losses.append(trainer.step(pixel_values.to(device), targets))
        record = trainer.end_epoch(losses)
        if rank == 0:
            trainer.save(options.output, options.storage)
        ray.train.report(record)


def train(table_uri: str, options: TrainOptions) -> TrainSummary:
    """Train a model (X-CLIP, or EVL's decoder) on a ``uri,caption`` or ``uri,label`` table with Ray Train."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    started = time.perf_counter()
    rows = read_video_table(table_uri, options.storage, options.template)
    # loaded once here: a bad checkpoint fails before Ray starts
    labeled = all(row.label is not None for row in rows)
    labels = sorted({row.label for row in rows}) if labeled and options.family == "evl" else None
    load_start = functools.partial(_starting_model, options, labels)
    start = load_start()
    settings = DecodeSettings(start.num_frames, start.preprocessor)
    texts = _targets(rows, start, table_uri)
    per_clip = feature_bytes(start)
    check_mode(options.backbone_cache, per_clip)  # before Ray starts
    del start
    resources = connect(options.address)
    listed = [
        {"uri": uri, "size": Store(uri, options.storage).size(), "etag": None, "mtime": None} for uri in texts
    ]
    sizes = train_resources(cluster_nodes(), options.workers, options.use_gpu, options.cpus_per_worker)
    cpus = sizes.cpus_per_worker
    with _in_order():  # the clips in table order, whichever decoder finishes first: seeded shuffles repeat
        clips = (
            decoded(listed, settings, options.storage, sizes.decoders, sizes.cpus_per_decoder)
            .filter(lambda row: row["error"] is None)
            .materialize()  # decoded once: every epoch reads the object store
        )
    count = clips.count()
    if count < 2:
        raise ValueError(
            f"only {count} of {len(rows)} videos in {table_uri} could be decoded: nothing to train on"
        )
    cached = use_cache(
        options.backbone_cache, per_clip, count, options.epochs, resources.get("object_store_memory", 0)
    )
    if cached:  # the frozen backbone once per clip, on the training workers' shape, before they start
        with _in_order():
            clips = clips.map_batches(
                BackboneFeatures,
                fn_constructor_kwargs=dict(
                    load=load_start,
                    device="cuda" if options.use_gpu else "cpu",
                    threads=None if options.use_gpu else math.ceil(cpus),
                ),
                batch_size=options.batch_size,
                batch_format="numpy",
                compute=pool(options.workers),
                num_cpus=cpus,
                num_gpus=1 if options.use_gpu else 0,
            ).materialize()
    schedule = options.train
    if schedule.total_steps is None:  # cosine decay over the whole run
        steps_per_epoch = math.ceil(count / options.workers / options.batch_size)
        schedule = replace(schedule, total_steps=steps_per_epoch * options.epochs)
    trainer = TorchTrainer(
        _train_worker,
        train_loop_config={
            "options": replace(options, train=schedule),
            "texts": texts,
            "labels": labels,
            "threads": None if options.use_gpu else math.ceil(cpus),
        },
        scaling_config=ScalingConfig(
            num_workers=options.workers, use_gpu=options.use_gpu, resources_per_worker={"CPU": cpus}
        ),
        run_config=RunConfig(name=f"videosearch-train-{int(time.time())}"),
        datasets={"train": clips},
    )
    trainer.fit()
    last = last_checkpoint(Store(options.output, options.storage))
    history = read_history(last)
    return TrainSummary(
        last.uri, count, len(listed) - count, history, time.perf_counter() - started, backbone_cached=cached
    )


@contextlib.contextmanager
def _in_order() -> Iterator[None]:
    """Ray Data keeps the input order of the datasets executed inside."""
    options = ray.data.DataContext.get_current().execution_options
    before, options.preserve_order = options.preserve_order, True
    try:
        yield
    finally:
        options.preserve_order = before


def last_checkpoint(output: Store) -> Store:
    """The newest ``checkpoint-<step>`` under a run's output."""
    steps = [name for name in output.names() if name.startswith("checkpoint-")]
    if not steps:
        raise FileNotFoundError(f"no checkpoint-<step> under {output.uri}")
    return output / steps[-1]
