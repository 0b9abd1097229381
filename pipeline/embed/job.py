"""The embed job as a Ray Data plan: list -> decode -> encode -> write, then index -> publish.

This module (with the train job) is where Ray is. Each stage is a plain callable from
``pipeline.embed.stages``; here they get their resources (:mod:`pipeline.embed.resources`): decoders are CPU
actors, encoders are GPU actors when the cluster has GPUs (CPU otherwise), the writer is a light task. Ray
Data streams batches between them with backpressure, so memory stays bounded whatever the number of videos;
only small uint8 frame tensors cross the object store.
"""

from __future__ import annotations

import functools
import logging
import math
import time
from collections import Counter
from dataclasses import replace
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import ray
import ray.data

from xclip_core.identity import ModelIdentity

from ..library import Library, LibraryWriter, PartInfo, parts_dataset
from ..library import index as faiss_index
from ..models import absolute_source, default_model_source, load_model
from ..storage import StorageOptions, Store
from .options import EmbedOptions, EmbedSummary
from .resources import WRITE_CPUS, stage_resources, time_stages
from .stages.decode import DecodeSettings, DecodeVideos
from .stages.encode import EncodeFrames
from .stages.list import list_objects
from .stages.write import WritePart

log = logging.getLogger(__name__)

PART_ROWS = 256  # rows per Parquet part file
DECODE_TRIES = 3  # a video whose decoding crashes its actor this often is recorded as failed
MAX_INPUT_BLOCKS = 1000  # input blocks of the decode stage (groups of listed objects)


TEXT_COLUMNS = {"uri", "etag", "error", "model_id"}
LISTED_SCHEMA = pa.schema(
    [("uri", pa.string()), ("size", pa.int64()), ("etag", pa.string()), ("mtime", pa.float64())]
)


def _text_columns_typed(stage: type) -> type:
    """The stage, with its nullable text columns handed to Ray as Arrow strings.

    Ray Data stores an all-None numpy column as an Arrow null column, which comes back to the next stage as
    NaN floats; typing the text columns keeps an ``error`` of None a None.
    """

    class Typed(stage):
        def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
            out = super().__call__(batch)
            for name in TEXT_COLUMNS & out.keys():
                out[name] = pa.array([None if v is None else str(v) for v in out[name]], pa.string())
            return out

    Typed.__name__ = Typed.__qualname__ = stage.__name__
    return Typed


@ray.remote(num_cpus=0)
class _CrashLedgerActor:
    """Unfinished decode attempts per video; lives as long as the job, whatever happens to the decoders."""

    def __init__(self) -> None:
        self.unfinished: Counter[str] = Counter()

    def begin(self, uri: str) -> int:
        self.unfinished[uri] += 1
        return self.unfinished[uri] - 1

    def end(self, uri: str) -> None:
        self.unfinished.pop(uri, None)


class CrashLedger:
    """The ``crash_ledger`` of :class:`DecodeVideos`, kept by a Ray actor that outlives crashing decoders."""

    def __init__(self) -> None:
        self.actor = _CrashLedgerActor.remote()

    def begin(self, uri: str) -> int:
        return ray.get(self.actor.begin.remote(uri))

    def end(self, uri: str) -> None:
        self.actor.end.remote(uri)


def connect(address: str | None) -> dict[str, float]:
    """Join the Ray cluster at ``address`` (or start a local one) once per process; its resources."""
    if not ray.is_initialized():
        ray.init(address=address, include_dashboard=False, configure_logging=False, log_to_driver=True)
    return ray.cluster_resources()


def decoded(
    listed: list[dict[str, Any]],
    settings: DecodeSettings,
    storage: StorageOptions,
    decoders: int,
    decode_cpus: float,
) -> ray.data.Dataset:
    """The listed objects as a dataset of decoded rows (the decode stage on an actor pool)."""
    # one small block per group of objects, so decoding starts at once and spreads over the actors
    table = pa.Table.from_pylist(listed, schema=LISTED_SCHEMA)
    step = -(-len(listed) // min(len(listed), MAX_INPUT_BLOCKS))
    blocks = [table.slice(i, step) for i in range(0, len(listed), step)]
    return ray.data.from_blocks(blocks).map_batches(  # block metadata computed here, not in remote tasks
        _text_columns_typed(DecodeVideos),
        fn_constructor_kwargs=dict(
            settings=settings, storage_options=storage, crash_ledger=CrashLedger(), max_tries=DECODE_TRIES
        ),
        batch_size=1,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=decoders),
        num_cpus=decode_cpus,
        # a native crash kills one decoder: Ray Data restarts the actor and retries its task (without limit
        # by default); the crash ledger turns the video into an error row after DECODE_TRIES crashes
    )


def embed(source: str, library: str, options: EmbedOptions) -> EmbedSummary:
    """Build (or add a version to) ``library`` from every object under ``source``."""
    started = time.perf_counter()
    # the manifest records the model for `query`, which may run from another directory
    options = replace(options, model=absolute_source(options.model or default_model_source()))
    model = load_model(options.model, options.storage)  # a bad checkpoint fails here, before any video
    frames = options.frames or model.num_frames
    if frames != model.num_frames:
        raise ValueError(f"the model takes {model.num_frames} frames per video, not {frames}")
    settings = DecodeSettings(frames, model.preprocessor, options.segment_s)
    listed = list_objects(source, options.storage)
    if not listed:
        raise ValueError(f"nothing to embed: {source} lists no objects")

    resources = connect(options.address)
    stages = stage_resources(
        resources.get("CPU", 1),
        resources.get("GPU", 0),
        len(listed),
        options,
        timings=functools.partial(time_stages, listed, settings, options.storage, model),
    )
    log.info(
        "plan: %d decoders (%.2g CPU each), %d encoders (%.2g GPU, %.2g CPU each)",
        stages.decoders,
        stages.cpus_per_decoder,
        stages.encoders,
        stages.gpus_per_encoder,
        stages.cpus_per_encoder,
    )

    store = Store(library, options.storage)
    ds = decoded(listed, settings, options.storage, stages.decoders, stages.cpus_per_decoder)
    ds = ds.map_batches(
        _text_columns_typed(EncodeFrames),
        fn_constructor_kwargs=dict(
            model_src=options.model,
            storage_options=options.storage,
            device=stages.encoder_device,  # the plan decides, not what the actor can see
            batch_size=options.batch_size,
            # on a CPU the encoder runs its share of the cores, rounded up
            threads=None if stages.gpus_per_encoder else math.ceil(stages.cpus_per_encoder),
        ),
        batch_size=options.batch_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=stages.encoders),
        num_cpus=stages.cpus_per_encoder,
        num_gpus=stages.gpus_per_encoder,
    )
    ds = ds.map_batches(
        # a plain Ray task (no actor of its own: writing needs no start-up, and pooled workers start quicker)
        WritePart(store, model.embedding_dim, model.rerank_shape),
        batch_size=PART_ROWS,
        batch_format="numpy",
        num_cpus=WRITE_CPUS,
    )
    writer = LibraryWriter(store, embedding_dim=model.embedding_dim, prompt_shape=model.rerank_shape)
    identity = model.identity
    del model  # the actors load their own copies
    parts = ds.take_all()
    return publish(writer, parts, identity, listed, started)


def publish(
    writer: LibraryWriter,
    parts: list[dict[str, Any]],
    model: ModelIdentity,
    listed: list[dict],
    started: float,
) -> EmbedSummary:
    """Index the written parts and publish them as the library's next version."""
    dim = writer.embedding_dim
    infos = [PartInfo(str(p["path"]), int(p["rows"]), int(p["ok"]), int(p["errors"])) for p in parts]
    columns = ["id", "uri", "error", "embedding"]
    table = parts_dataset(writer.store, infos, writer.schema).to_table(columns=columns)
    ok = table.filter(pc.is_null(table["error"]))
    vectors = ok["embedding"].combine_chunks().flatten().to_numpy().reshape(len(ok), dim)
    index = faiss_index.build_index(ok["id"].to_numpy(), vectors)
    version = writer.publish(infos, index, model=model, base=Library.current_version(writer.store))

    errors = table.filter(pc.is_valid(table["error"]))
    failures = sorted(set(zip(errors["uri"].to_pylist(), errors["error"].to_pylist(), strict=True)))
    ok_uris = set(ok["uri"].to_pylist())
    return EmbedSummary(
        library=writer.uri,
        version=version.number,
        objects=len(listed),
        ok=len(ok_uris),
        failed=len({uri for uri, _ in failures} - ok_uris),
        segments=len(ok),
        seconds=time.perf_counter() - started,
        failures=[{"uri": uri, "error": error} for uri, error in failures],
    )
