"""The train job on Ray Train: the embed job's decode stage -> data-parallel ``TorchTrainer`` workers, each
running :func:`~pipeline.train.worker.run_epochs` on its shard of the clips.

Videos are decoded once (the decode stage's actor pool, errors dropped) and kept in Ray's object store,
which spills to disk beyond its memory; every epoch then reshuffles them. A model with a frozen backbone
(EVL) may have its backbone run once per clip first, on an actor pool of the workers' shape
(:mod:`~pipeline.train.backbone_cache`).
"""

from __future__ import annotations

import contextlib
import functools
import time
from collections.abc import Iterator
from typing import Any

import ray.data
import ray.train
import ray.train.torch
import torch
from ray.data.expressions import col
from ray.train import RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from ..embed.on_ray import cluster_nodes, connect, decoded, pool
from ..embed.resources import torch_threads
from .backbone_cache import BackboneFeatures, use_cache
from .options import TrainOptions
from .resources import train_resources
from .worker import PreparedRun, check_enough, run_epochs, scheduled, start_trainer, starting_model

SHUFFLE_BUFFER = 1024  # clips each worker draws its batches from, in random order


def _train_worker(config: dict[str, Any]) -> None:
    """One Ray Train worker: its shard of decoded clips, the family's training steps, checkpoints from rank
    0."""
    options: TrainOptions = config["options"]
    if config["threads"]:
        torch.set_num_threads(config["threads"])
    trainer = start_trainer(options, config["labels"], ray.train.torch.prepare_model)
    shard = ray.train.get_dataset_shard("train")

    def batches(seed: int) -> Any:
        return shard.iter_batches(
            batch_size=options.batch_size,
            batch_format="numpy",
            local_shuffle_buffer_size=SHUFFLE_BUFFER,
            local_shuffle_seed=seed,
        )

    rank = ray.train.get_context().get_world_rank()
    device = ray.train.torch.get_device()
    run_epochs(trainer, options, config["texts"], batches, device, rank, ray.train.report)


def train_on_ray(run: PreparedRun) -> tuple[int, bool]:
    """Decode ``run.listed`` on Ray and train on the clips with Ray Train; returns the clips trained on and
    whether the backbone's features were cached."""
    options, labels = run.options, run.labels
    resources = connect(options.address)
    sizes = train_resources(cluster_nodes(), options.workers, options.use_gpu, options.cpus_per_worker)
    cpus = sizes.cpus_per_worker
    threads = None if options.use_gpu else torch_threads(cpus)
    with _in_order():  # the clips in table order, whichever decoder finishes first: seeded shuffles repeat
        clips = (
            decoded(run.listed, run.settings, options.storage, sizes.decoders, sizes.cpus_per_decoder)
            .filter(expr=col("error").is_null())  # on whole blocks, not row by row in Python
            .materialize()  # decoded once: every epoch reads the object store
        )
    count = clips.count()
    check_enough(count, len(run.listed), run.table_uri)
    room = resources.get("object_store_memory", 0)
    cached = use_cache(options.backbone_cache, run.per_clip_features, count, options.epochs, room)
    if cached:  # the frozen backbone once per clip, on the training workers' shape, before they start
        with _in_order():
            clips = clips.map_batches(
                BackboneFeatures,
                fn_constructor_kwargs=dict(
                    load=functools.partial(starting_model, options, labels),
                    device="cuda" if options.use_gpu else "cpu",
                    threads=threads,
                ),
                batch_size=options.batch_size,
                batch_format="numpy",
                compute=pool(options.workers),
                num_cpus=cpus,
                num_gpus=1 if options.use_gpu else 0,
            ).materialize()
    trainer = TorchTrainer(
        _train_worker,
        train_loop_config={
            "options": scheduled(options, count),
            "texts": run.texts,
            "labels": labels,
            "threads": threads,
        },
        scaling_config=ScalingConfig(
            num_workers=options.workers, use_gpu=options.use_gpu, resources_per_worker={"CPU": cpus}
        ),
        run_config=RunConfig(name=f"videosearch-train-{int(time.time())}"),
        datasets={"train": clips},
    )
    trainer.fit()
    return count, cached


@contextlib.contextmanager
def _in_order() -> Iterator[None]:
    """Ray Data keeps the input order of the datasets executed inside."""
    options = ray.data.DataContext.get_current().execution_options
    before, options.preserve_order = options.preserve_order, True
    try:
        yield
    finally:
        options.preserve_order = before
