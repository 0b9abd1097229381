"""One training worker's run, wherever it runs (a Ray Train worker, or the job's own process): the trainer
as the run starts or resumes, then its epochs over shuffled batches of decoded clips, a checkpoint after
each.

An epoch's batches come from its executor (Ray Data's shard of the clips, or the clips held in this
process), shuffled by a seed drawn from the run's seed, the epoch and the worker's rank: the same seed runs
the same steps on the same executor.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from typing import Any

import torch

from ..embed.stages.decode import DecodeSettings
from ..models import VideoTextModel, default_model_source, load_model, new_model
from ..storage import Store
from .backbone_cache import COLUMN as CACHED
from .backbone_cache import from_stored
from .options import TrainOptions
from .trainer import Trainer, freeze

# an epoch's batches of decoded clips (columns "uri", and "frames" or the cached backbone features),
# shuffled by the seed given
EpochBatches = Callable[[int], Iterable[dict[str, Any]]]


@dataclass(frozen=True)
class PreparedRun:
    """A run as the job prepared it for an executor (:mod:`~pipeline.train.on_ray`,
    :mod:`~pipeline.train.in_process`)."""

    listed: list[dict[str, Any]]  # the table's videos, as the decode stage takes them
    settings: DecodeSettings  # how they are decoded (the model's frames and preprocessing)
    options: TrainOptions
    texts: dict[str, list[str]]  # each video's targets: captions, or labels
    labels: list[str] | None  # the classes of a new EVL classifier
    per_clip_features: int | None  # bytes of one clip's cached backbone features; None: no frozen backbone
    table_uri: str  # for messages
    # the model as the run starts (:func:`starting_model`), loaded by the job to check it: a run in the job's
    # process trains this one; None for a run on Ray, whose workers load their own
    start: VideoTextModel | None = None


def start_model(options: TrainOptions, labels: list[str] | None) -> VideoTextModel:
    """The model a run starts from: the checkpoint to fine-tune, ``options.config`` initialized, or a new
    EVL model over ``options.backbone`` (a classifier of ``labels``, else text-aligned), the same in every
    worker (seeded)."""
    if options.model:
        return load_model(options.model, options.storage)
    torch.manual_seed(options.seed)
    if options.family == "evl":
        from xclip_core.evl.build import evl_over_clip

        backbone = options.backbone or default_model_source()
        return evl_over_clip(
            backbone, labels, storage_options=Store(backbone, options.storage).fsspec_options()
        )
    return new_model(options.config)


def starting_model(options: TrainOptions, labels: list[str] | None) -> VideoTextModel:
    """The model as the run starts (:func:`start_model`) or resumes it (the checkpoint resumed)."""
    return load_model(options.resume, options.storage) if options.resume else start_model(options, labels)


def start_trainer(
    options: TrainOptions,
    labels: list[str] | None,
    wrap: Callable[[torch.nn.Module], torch.nn.Module],
    start: VideoTextModel | None = None,
) -> Trainer:
    """The worker's trainer as the run starts or resumes, its model (``start``, the run's
    :func:`starting_model` when at hand; else loaded) prepared by ``wrap`` (moved to the worker's device,
    wrapped for data-parallel training) before the optimizer is built."""
    if options.resume:
        trainer = Trainer.resume(options.resume, options=options.storage, wrap=wrap, model=start)
        # the run's own settings, its cosine stretched if it now runs to more epochs
        trainer.config = replace(trainer.config, total_steps=options.train.total_steps)
        return trainer
    model = start_model(options, labels) if start is None else start
    freeze(model, options.train.freeze)
    torch.manual_seed(options.seed)  # the steps' random draws: the same wherever the model was made
    return Trainer(wrap(model), config=options.train)


def scheduled(options: TrainOptions, clips: int) -> TrainOptions:
    """``options`` with the learning rate's cosine decaying over the whole run of ``clips`` clips (unless
    its total steps were set)."""
    if options.train.total_steps is not None:
        return options
    steps_per_epoch = math.ceil(clips / options.workers / options.batch_size)
    return replace(options, train=replace(options.train, total_steps=steps_per_epoch * options.epochs))


def check_enough(clips: int, videos: int, table_uri: str) -> None:
    """Raises ``ValueError`` when fewer than two of a table's ``videos`` could be decoded."""
    if clips < 2:
        raise ValueError(
            f"{clips} of the {videos} videos of {table_uri} could be decoded: training needs at least 2 (a "
            "step contrasts each clip with the others of its batch)"
        )


def run_epochs(
    trainer: Trainer,
    options: TrainOptions,
    texts: dict[str, list[str]],
    batches: EpochBatches,
    device: torch.device,
    rank: int = 0,
    report: Callable[[dict[str, float]], None] = lambda record: None,
) -> None:
    """The run's remaining epochs: each of ``batches(seed)`` one optimizer step (a video's target drawn from
    its ``texts``), then the epoch's record ``report``-ed, and a checkpoint under ``options.output`` from
    rank 0."""
    preprocessor = trainer.core.preprocessor
    for epoch in range(trainer.epoch, options.epochs):
        losses = []
        draw = random.Random(f"{options.seed}/{epoch}/{rank}")  # one of a video's captions per step
        for batch in batches(draw.getrandbits(32)):
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
        report(record)
