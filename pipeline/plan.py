"""The embed job as a Ray Data plan: list -> decode -> encode -> write, then index -> publish.

This is the one module that knows Ray. Each stage is a plain callable from ``pipeline.stages``; here they get
their resources: decoders are CPU actors, encoders are GPU actors when the cluster has GPUs (CPU otherwise),
the writer is one light actor. Ray Data streams batches between them with backpressure, so memory stays
bounded whatever the number of videos; only small uint8 frame tensors cross the object store.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import ray
import ray.data

from xclip_core import XCLIPConfig, XCLIPModel
from xclip_core.video_transforms import VideoPreprocessor

from . import index as faiss_index
from .cpu_shares import share_cpus, time_stages
from .library import Library, LibraryWriter, PartInfo, parts_dataset
from .stages.decode import DecodeVideos
from .stages.encode import EncodeFrames, checkpoint_preprocessor
from .stages.list import list_objects
from .stages.write import WritePart
from .storage import StorageOptions, protocol_of

log = logging.getLogger(__name__)

PART_ROWS = 256  # rows per Parquet part file
DECODE_TRIES = 3  # a video whose decoding crashes its actor this often is recorded as failed
WRITE_CPUS = 0.1
GPU_ENCODER_CPUS = 1.0  # a GPU encoder's CPU: batches in, results out (the frames are normalized on the GPU)
MAX_INPUT_BLOCKS = 1000  # input blocks of the decode stage (groups of listed objects)


@dataclass
class EmbedOptions:
    """Everything ``videosearch embed`` can set; ``None`` means "derive from the model or the cluster"."""

    model: str
    frames: int | None = None  # frames per video/segment; the model's own count by default
    segment_s: float | None = None  # embed fixed-length segments instead of whole videos
    batch_size: int = 4  # videos (segments) per encoder call
    decoders: int | None = None  # decode actors
    encoders: int | None = None  # encode actors
    gpus_per_encoder: float | None = None  # 1 when the cluster has GPUs, else 0
    address: str | None = None  # Ray address; None starts (or joins) a local Ray
    storage: StorageOptions = field(default_factory=StorageOptions)


@dataclass
class EmbedSummary:
    """What a finished job reports: counts, failures and speed."""

    library: str
    version: int
    objects: int
    ok: int
    failed: int
    segments: int
    seconds: float
    failures: list[dict[str, str]]

    @property
    def videos_per_s(self) -> float:
        return self.objects / self.seconds if self.seconds > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "videos_per_s": round(self.videos_per_s, 3)}

    def text(self) -> str:
        lines = [
            f"library {self.library} version {self.version}: {self.objects} objects, {self.ok} embedded "
            f"({self.segments} segments), {self.failed} failed, {self.seconds:.1f} s, "
            f"{self.videos_per_s:.2f} videos/s"
        ]
        lines += [f"  failed: {f['uri']}: {f['error']}" for f in self.failures]
        return "\n".join(lines)


def describe_model(src: str, storage: StorageOptions) -> tuple[XCLIPModel, dict[str, str]]:
    """Load the model once in the driver: a bad checkpoint fails here, before any video is touched, and the
    library records the hash of the weights that built it."""
    model = XCLIPModel.from_pretrained(src, storage_options=storage.for_protocol(protocol_of(src)))
    return model, {"id": src, "sha256": model.weights_sha256()}


def absolute_source(src: str) -> str:
    """``src`` with a local path made absolute; URLs (``s3://``, ``file://``...) unchanged."""
    return src if "://" in src else os.path.abspath(src)


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
    frames: int,
    preprocessor: VideoPreprocessor,
    segment_s: float | None,
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
            num_frames=frames,
            preprocessor=preprocessor,
            segment_s=segment_s,
            storage_options=storage,
            crash_ledger=CrashLedger(),
            max_tries=DECODE_TRIES,
        ),
        batch_size=1,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=decoders),
        num_cpus=decode_cpus,
        # a native crash kills one decoder: Ray Data restarts the actor and retries its task (without limit
        # by default); the crash ledger turns the video into an error row after DECODE_TRIES crashes
    )


@dataclass(frozen=True)
class StageResources:
    """The actors of the decode and encode stages and what each one is given."""

    decoders: int
    cpus_per_decoder: float
    encoders: int
    gpus_per_encoder: float
    cpus_per_encoder: float

    @property
    def encoder_device(self) -> str:
        return "cuda" if self.gpus_per_encoder else "cpu"


def stage_resources(
    cpus: float,
    gpus: float,
    objects: int,
    options: EmbedOptions,
    timings: Callable[[], tuple[float, float]],
) -> StageResources:
    """Share a cluster of ``cpus`` and ``gpus`` between the stages, for ``objects`` listed objects.

    With GPUs (unless ``options.gpus_per_encoder`` is 0), one encoder per ``gpus_per_encoder`` GPUs, and every
    CPU that the encoders and the writer leave decodes. With CPUs only, ``timings()`` (one video's seconds
    to decode and to encode, one thread) shares the CPUs in proportion (:func:`share_cpus`). What
    ``options`` sets is kept; there are never more decoders than objects (each is decoded by one actor).
    """
    gpus_per_encoder = options.gpus_per_encoder if options.gpus_per_encoder is not None else float(gpus > 0)
    encoders = options.encoders or (max(1, int(gpus // gpus_per_encoder)) if gpus_per_encoder else 1)
    if gpus_per_encoder:  # GPUs encode fast: every CPU the encoders and the writer leave decodes
        decoders = options.decoders or max(1, int(cpus - encoders * GPU_ENCODER_CPUS - WRITE_CPUS))
        decode_cpus, encode_cpus = 1.0, GPU_ENCODER_CPUS
    else:  # CPUs only: shared between the stages in proportion to one video's measured cost in each
        decode_s, encode_s = timings()
        shares = share_cpus(cpus, decode_s, encode_s, encoders, options.decoders, reserved=WRITE_CPUS)
        decoders, decode_cpus, encode_cpus = shares.decoders, shares.cpus_per_decoder, shares.cpus_per_encoder
        log.info("one video: decode %.3f s, encode %.3f s (one thread)", decode_s, encode_s)
    return StageResources(min(decoders, objects), decode_cpus, encoders, gpus_per_encoder, encode_cpus)


def embed(source: str, library: str, options: EmbedOptions) -> EmbedSummary:
    """Build (or add a version to) ``library`` from every object under ``source``."""
    started = time.perf_counter()
    # the manifest records the model for `query`, which may run from another directory
    options = replace(options, model=absolute_source(options.model))
    loaded, model = describe_model(options.model, options.storage)
    config = loaded.config
    frames = options.frames or config.vision_config.num_frames
    if frames != config.vision_config.num_frames:
        raise ValueError(f"the model takes {config.vision_config.num_frames} frames per video, not {frames}")
    preprocessor = checkpoint_preprocessor(
        options.model, options.storage.for_protocol(protocol_of(options.model))
    )
    listed = list_objects(source, options.storage)
    if not listed:
        raise ValueError(f"nothing to embed: {source} lists no objects")

    resources = connect(options.address)
    stages = stage_resources(
        resources.get("CPU", 1),
        resources.get("GPU", 0),
        len(listed),
        options,
        timings=functools.partial(time_stages, listed, frames, preprocessor, options.storage, loaded),
    )
    del loaded  # the actors load their own copies
    log.info(
        "plan: %d decoders (%.2g CPU each), %d encoders (%.2g GPU, %.2g CPU each)",
        stages.decoders,
        stages.cpus_per_decoder,
        stages.encoders,
        stages.gpus_per_encoder,
        stages.cpus_per_encoder,
    )

    decoders, decode_cpus = stages.decoders, stages.cpus_per_decoder
    ds = decoded(listed, frames, preprocessor, options.segment_s, options.storage, decoders, decode_cpus)
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
        WritePart(library, config.projection_dim, _prompt_shape(config), options.storage),
        batch_size=PART_ROWS,
        batch_format="numpy",
        num_cpus=WRITE_CPUS,
    )
    parts = ds.take_all()
    return publish(library, parts, config, model, options, listed, started)


def publish(
    library: str,
    parts: list[dict[str, Any]],
    config: XCLIPConfig,
    model: dict[str, str],
    options: EmbedOptions,
    listed: list[dict],
    started: float,
) -> EmbedSummary:
    """Index the written parts and publish them as the library's next version."""
    dim = config.projection_dim
    writer = LibraryWriter(library, options.storage, embedding_dim=dim, prompt_shape=_prompt_shape(config))
    infos = [PartInfo(str(p["path"]), int(p["rows"]), int(p["ok"]), int(p["errors"])) for p in parts]
    table = parts_dataset(library, options.storage, infos, writer.schema).to_table(
        columns=["id", "uri", "error", "embedding"]
    )
    ok = table.filter(pc.is_null(table["error"]))
    vectors = ok["embedding"].combine_chunks().flatten().to_numpy().reshape(len(ok), dim)
    index = faiss_index.build_index(ok["id"].to_numpy(), vectors)
    version = writer.publish(
        infos, index, model=model, base=Library.current_version(library, options.storage)
    )

    errors = table.filter(pc.is_valid(table["error"]))
    failures = sorted(set(zip(errors["uri"].to_pylist(), errors["error"].to_pylist(), strict=True)))
    ok_uris = set(ok["uri"].to_pylist())
    return EmbedSummary(
        library=library,
        version=version.number,
        objects=len(listed),
        ok=len(ok_uris),
        failed=len({uri for uri, _ in failures} - ok_uris),
        segments=len(ok),
        seconds=time.perf_counter() - started,
        failures=[{"uri": uri, "error": error} for uri, error in failures],
    )


def _prompt_shape(config: XCLIPConfig) -> tuple[int, int]:
    return config.vision_config.num_patches, config.projection_dim
