"""The train job: a table of described videos -> decoded clips -> the model family's training steps -> a
checkpoint per epoch on any fsspec store.

It runs on Ray Train (:mod:`pipeline.train.on_ray`: data-parallel workers, the decode stage's actor pool),
or, for one worker on this machine, in the job's own process (:mod:`pipeline.train.in_process`, without Ray
Train's start-up): ``--executor`` chooses, ``auto`` by the module's rule. Either way videos are decoded once
(errors dropped with a count) and every epoch reshuffles them. Each checkpoint is a complete model directory
(Hugging Face layout with tokenizer and preprocessor files, usable as ``--model``) plus the training state
that resumes the run exactly, on either executor.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import torch

from ..embed.stages.decode import DecodeSettings
from ..models import VideoTextModel
from ..storage import ObjectNotFound, StorageOptions, Store, each_at_once
from ..video_table import DescribedVideo, read_video_table
from .backbone_cache import check_mode, feature_bytes
from .in_process import runs_in_process, train_in_process
from .options import TrainOptions, TrainSummary
from .trainer import read_history
from .worker import PreparedRun, starting_model

log = logging.getLogger(__name__)
STAT_THREADS = 32  # sizes of the table's videos asked for at once


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


def _listed(
    uris: list[str], storage: StorageOptions | None, table_uri: str
) -> tuple[list[dict[str, Any]], list[str]]:
    """The table's videos as the decode stage takes them (``uri``, ``size``...), their sizes asked for
    :data:`STAT_THREADS` at a time (one request each on S3: ~20 ms, 3 minutes for 10,000 videos one after
    the other), and the uris that do not exist. A missing video is skipped with a warning, as an undecodable
    one is; none existing is a ``ValueError``."""

    def size(uri: str) -> int | None:
        try:
            return Store(uri, storage).size()
        except ObjectNotFound:
            return None

    sizes = each_at_once(size, uris, STAT_THREADS)
    listed = [
        {"uri": uri, "size": n, "etag": None, "mtime": None}
        for uri, n in zip(uris, sizes, strict=True)
        if n is not None
    ]
    missing = [uri for uri, n in zip(uris, sizes, strict=True) if n is None]
    if missing:
        named = ", ".join(missing[:5]) + (", ..." if len(missing) > 5 else "")
        if not listed:
            raise ValueError(
                f"none of the {len(uris)} videos of {table_uri} exists ({named}); a relative uri is "
                "relative to the table"
            )
        log.warning(
            "%d of the %d videos of %s do not exist and are skipped: %s",
            len(missing),
            len(uris),
            table_uri,
            named,
        )
    return listed, missing


def train(table_uri: str, options: TrainOptions) -> TrainSummary:
    """Train a model (X-CLIP, or EVL's decoder) on a ``uri,caption`` or ``uri,label`` table, on Ray Train or
    in this process (``options.executor``)."""
    started = time.perf_counter()
    rows = read_video_table(table_uri, options.storage, options.template)
    labeled = all(row.label is not None for row in rows)
    labels = sorted({row.label for row in rows}) if labeled and options.family == "evl" else None
    # loaded here: a bad checkpoint fails before Ray starts (the caller's random generator left as it was)
    with torch.random.fork_rng(devices=[]):
        start = starting_model(options, labels)
    settings = DecodeSettings(start.num_frames, start.preprocessor)
    texts = _targets(rows, start, table_uri)
    per_clip = feature_bytes(start)
    check_mode(options.backbone_cache, per_clip)  # before Ray starts
    listed, missing = _listed(list(texts), options.storage, table_uri)
    here = runs_in_process(options, len(listed), settings)
    if here:
        execute = train_in_process  # trains the model loaded here
    else:
        from .on_ray import train_on_ray as execute  # Ray is imported for a run on Ray only

        start = None  # each worker loads its own
    clips, cached = execute(PreparedRun(listed, settings, options, texts, labels, per_clip, table_uri, start))
    last = last_checkpoint(Store(options.output, options.storage))
    return TrainSummary(
        last.uri,
        clips,
        len(listed) - clips,
        read_history(last),
        time.perf_counter() - started,
        backbone_cached=cached,
        executor="in-process" if here else "ray",
        missing=len(missing),
    )


def last_checkpoint(output: Store) -> Store:
    """The newest ``checkpoint-<step>`` under a run's output."""
    steps = [name for name in output.names() if name.startswith("checkpoint-")]
    if not steps:
        raise FileNotFoundError(f"no checkpoint-<step> under {output.uri}")
    return output / steps[-1]
