"""The train job in its own process: one worker on this machine, without Ray Train's start-up.

On Ray a run pays a fixed cost before its first step: Ray Train's (a trivial ``TorchTrainer`` of one worker
took 22-24 s on 2 cores) and Ray Data's decode stage (~5 s for a few clips). That is more than a small
fine-tuning run spends on its steps, and one worker on one machine gains nothing from it. So when the run
has one worker, no cluster to join (no ``--address``, no ``RAY_ADDRESS``, or either is ``local``, and no Ray
connected in this process) and its decoded clips fit
:data:`~pipeline.train.options.IN_PROCESS_MAX_CLIP_BYTES`, ``--executor auto`` runs it here:

- decoder processes (:mod:`~pipeline.embed.decoder_processes`, one per CPU) decode every video once, in
  table order; a crash in native decoder code costs a decoder process, not the job, and undecodable videos
  are dropped and counted, as on Ray;
- the clips stay in this process's memory (a model with a frozen backbone may have its features computed
  once per clip instead, :mod:`~pipeline.train.backbone_cache`, when they fill at most half of
  :data:`MEMORY_SHARE` of the machine's memory, as a local Ray's object store would hold them);
- the model the job loaded to check it is the one trained (a checkpoint is read once: on S3, downloaded
  once), the backbone features computed by it;
- the epochs run the same loop as a Ray Train worker (:func:`~pipeline.train.worker.run_epochs`), each epoch
  a fresh permutation of the clips by the same per-epoch seed.

The same seed repeats a run on the same executor. The two executors shuffle differently (Ray Data's local
shuffle buffer against a whole permutation), so their runs differ in the order of their steps. Either
executor resumes the other's checkpoints.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import random
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..embed.ctrl_c import deferred
from ..embed.decoder_processes import DecoderProcesses
from ..embed.in_process import DECODED_AHEAD, as_batch, cluster_to_join, usable_cpus
from ..embed.resources import torch_threads
from ..embed.stages.decode import DecodeSettings
from ..models import VideoTextModel
from .backbone_cache import COLUMN as CACHED
from .backbone_cache import BackboneFeatures, use_cache
from .options import IN_PROCESS_MAX_CLIP_BYTES, TrainOptions
from .worker import PreparedRun, check_enough, run_epochs, scheduled, start_trainer, starting_model

MEMORY_SHARE = 0.3  # of this machine's memory, the room of the backbone cache here (a local Ray's store)


def runs_in_process(options: TrainOptions, videos: int, settings: DecodeSettings) -> bool:
    """Whether a run over ``videos`` videos decoded by ``settings`` trains here (:func:`train_in_process`)
    rather than on Ray Train (see the module for ``--executor auto``)."""
    if options.executor != "auto":
        return options.executor == "in-process"
    clips_bytes = videos * math.prod(settings.frames_shape)
    return (
        options.workers == 1
        and not cluster_to_join(options.address)
        and clips_bytes <= IN_PROCESS_MAX_CLIP_BYTES
    )


@dataclass
class _Clips:
    """Decoded clips held here: their URIs and, per clip, its frames or its cached backbone features."""

    uris: list[str]
    column: str  # "frames" or the backbone cache's column
    values: list[np.ndarray]

    def batches(self, batch_size: int, seed: int) -> Iterator[dict[str, Any]]:
        """One epoch's batches: the clips in the order of a permutation seeded by ``seed``."""
        order = list(range(len(self.uris)))
        random.Random(seed).shuffle(order)
        for start in range(0, len(order), batch_size):
            chosen = order[start : start + batch_size]
            yield {
                "uri": np.array([self.uris[i] for i in chosen], dtype=object),
                self.column: np.stack([self.values[i] for i in chosen]),
            }


def train_in_process(run: PreparedRun) -> tuple[int, bool]:
    """Decode ``run.listed`` and train one worker on the clips, here; returns the clips trained on and
    whether the backbone's features were cached. ``cpus_per_worker``, when given, sets torch's threads; the
    caller's torch threads and random generator are left as they were."""
    options, labels = run.options, run.labels
    if options.use_gpu and not torch.cuda.is_available():
        raise ValueError("--gpu: torch finds no GPU on this machine (or pass --executor ray with --address)")
    device = torch.device("cuda" if options.use_gpu else "cpu")
    clips = _decoded(run.listed, run.settings, options)
    count = len(clips.uris)
    check_enough(count, len(run.listed), run.table_uri)
    room = MEMORY_SHARE * os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    cached = use_cache(options.backbone_cache, run.per_clip_features, count, options.epochs, room)
    options = scheduled(options, count)
    with contextlib.ExitStack() as stack:
        stack.enter_context(
            torch.random.fork_rng(devices=[torch.cuda.current_device()] if options.use_gpu else [])
        )
        stack.callback(torch.set_num_threads, torch.get_num_threads())
        if options.cpus_per_worker:
            torch.set_num_threads(torch_threads(options.cpus_per_worker))
        start = starting_model(options, labels) if run.start is None else run.start
        if cached:  # the frozen backbone once per clip, before the first step
            clips = _backbone_features(clips, lambda: start, device, options)
        trainer = start_trainer(options, labels, lambda model: model.to(device), start)
        batches = functools.partial(clips.batches, options.batch_size)
        run_epochs(trainer, options, run.texts, batches, device, report=_Progress(options.epochs))
    return count, cached


class _Progress:
    """Each finished epoch's record on stderr as it comes, with the time since the epochs began (a Ray Train
    run has Ray's own reports)."""

    def __init__(self, epochs: int) -> None:
        self.epochs = epochs
        self.started = time.perf_counter()

    def __call__(self, record: dict[str, float]) -> None:
        seconds = time.perf_counter() - self.started
        print(
            f"epoch {int(record['epoch'])} of {self.epochs}: loss {record['loss']:.4f} "
            f"({int(record['steps'])} steps in all, {seconds:.0f} s)",
            file=sys.stderr,
            flush=True,
        )


def _decoded(listed: list[dict[str, Any]], settings: DecodeSettings, options: TrainOptions) -> _Clips:
    """The videos of ``listed`` that decode, in table order (one video per decoder call)."""
    clips = _Clips([], "frames", [])
    with deferred() as ctrl_c, DecoderProcesses(settings, options.storage, usable_cpus()) as decoders:
        for decoded in decoders.decoded((as_batch([row]) for row in listed), DECODED_AHEAD, ctrl_c):
            for batch in decoded:
                for uri, frames, error in zip(batch["uri"], batch["frames"], batch["error"], strict=True):
                    if error is None:
                        clips.uris.append(str(uri))
                        clips.values.append(frames)
    return clips


def _backbone_features(
    clips: _Clips, load: Callable[[], VideoTextModel], device: torch.device, options: TrainOptions
) -> _Clips:
    """``clips`` with their backbone features (:class:`BackboneFeatures`) in place of their frames."""
    features = BackboneFeatures(load, device.type)
    cached = _Clips(clips.uris, CACHED, [])
    for start in range(0, len(clips.uris), options.batch_size):
        frames = np.stack(clips.values[start : start + options.batch_size])
        cached.values.extend(features({"frames": frames})[CACHED])
    return cached
