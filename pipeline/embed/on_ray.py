"""The embed stages as a Ray Data plan: decode -> encode -> write on actor pools sized to the cluster.

This module (with the train job) is where Ray is. Each stage is a plain callable from
``pipeline.embed.stages``; here they get their resources (:mod:`pipeline.embed.resources`): decoders are CPU
actors, encoders are GPU actors when the cluster has GPUs (CPU otherwise), the writer is a light task. Ray
Data streams batches between them with backpressure, so memory stays bounded whatever the number of videos;
only small uint8 frame tensors cross the object store. The plan sees the alive nodes (:func:`cluster_nodes`)
and keeps each stage on its nodes by label selectors; every stage actor records its node as it starts
(:class:`PlacementLedger`), which the summary reports.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pyarrow as pa
import ray
import ray._private.state
import ray.data
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from ..flags import NodeSettingError
from ..library import LibraryWriter, PartInfo
from ..library.journal import Journal
from ..library.writer import PART_ROWS
from ..models import VideoTextModel
from ..storage import StorageOptions
from .autoscaling import BOOTSTRAP_CONFIG, NodeType, launcher_node_types, reported_node_types
from .compiling import compiles
from .options import EmbedOptions, StagesRun
from .resources import (
    WRITE_CPUS,
    Node,
    encode_cpu_s,
    encoder_lanes,
    stage_resources,
    time_decode,
    time_encode,
    torch_threads,
)
from .stages.decode import DecodeSettings, DecodeVideos
from .stages.encode import EncodeFrames
from .stages.write import WritePart, written_part

log = logging.getLogger(__name__)

DECODE_TRIES = 3  # a video whose decoding crashes its actor this often is recorded as failed
MAX_INPUT_BLOCKS = 1000  # input blocks of the decode stage (groups of listed objects)

TEXT_COLUMNS = {"uri", "etag", "error", "model_id"}
LISTED_SCHEMA = pa.schema(
    [("uri", pa.string()), ("size", pa.int64()), ("etag", pa.string()), ("mtime", pa.float64())]
)


def _text_columns_typed(stage: type, name: str) -> type:
    """The stage, with its nullable text columns handed to Ray as Arrow strings, and its actors' nodes
    recorded as ``name`` in the ``placement`` ledger that its constructor takes (when given one).

    Ray Data stores an all-None numpy column as an Arrow null column, which comes back to the next stage as
    NaN floats; typing the text columns keeps an ``error`` of None a None.
    """

    def typed(out: dict[str, Any]) -> dict[str, Any]:
        for name in TEXT_COLUMNS & out.keys():
            out[name] = pa.array([None if v is None else str(v) for v in out[name]], pa.string())
        return out

    class Typed(stage):
        def __init__(self, *args: Any, placement: PlacementLedger | None = None, **kwargs: Any) -> None:
            self._unable: NodeSettingError | None = None
            try:
                super().__init__(*args, **kwargs)
            except NodeSettingError as e:  # raised by the first call: from an actor's constructor, an error
                self._unable = e  # reaches the driver as text only (ActorDiedError)
            if placement is not None:
                placement.record(name)

        def __call__(self, batch: dict[str, Any]) -> Any:
            if self._unable is not None:
                return _raising(self._unable)
            out = super().__call__(batch)  # a batch, or a generator of batches (the decode stage's)
            return typed(out) if isinstance(out, dict) else (typed(chunk) for chunk in out)

    Typed.__name__ = Typed.__qualname__ = stage.__name__
    return Typed


def _raising(error: Exception) -> Iterator[dict[str, Any]]:
    """A stage's output that raises ``error``: Ray Data hands an error raised while it iterates a stage's
    output to the driver as itself (``RayTaskError(type)``, its ``cause``); one raised by the call itself, as
    a ``UserCodeException`` without it."""
    raise error
    yield  # a generator


def _beside_the_driver(actor: Any) -> Any:
    """A new ``actor`` (a Ray actor class) on the driver's node: a ledger must outlive the loss of any worker
    node, and the job ends with the driver's node anyway."""
    here = ray.get_runtime_context().get_node_id()
    return actor.options(scheduling_strategy=NodeAffinitySchedulingStrategy(here, soft=False)).remote()


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
        self.actor = _beside_the_driver(_CrashLedgerActor)

    def begin(self, uri: str) -> int:
        return ray.get(self.actor.begin.remote(uri))

    def end(self, uri: str) -> None:
        self.actor.end.remote(uri)


@ray.remote(num_cpus=0)
class _PlacementLedgerActor:
    """The node of every stage actor: stage -> actor id -> node id (a restarted actor counts once)."""

    def __init__(self) -> None:
        self.nodes: dict[str, dict[str, str]] = {}

    def record(self, stage: str, actor_id: str, node_id: str) -> None:
        self.nodes.setdefault(stage, {})[actor_id] = node_id

    def placement(self) -> dict[str, dict[str, str]]:
        return self.nodes


class PlacementLedger:
    """Where the actors of each stage ran, recorded by each as it starts (:func:`_text_columns_typed`)."""

    def __init__(self) -> None:
        self.actor = _beside_the_driver(_PlacementLedgerActor)

    def record(self, stage: str) -> None:
        """Record the calling actor as one of ``stage`` on its node."""
        context = ray.get_runtime_context()
        ray.get(self.actor.record.remote(stage, context.get_actor_id(), context.get_node_id()))

    def placement(self) -> dict[str, dict[str, int]]:
        """Stage -> node ("IP short-node-id", as :class:`EmbedSummary` shows it) -> actors."""
        names = {node["NodeID"]: f"{node['NodeManagerAddress']} {node['NodeID'][:8]}" for node in ray.nodes()}
        recorded = ray.get(self.actor.placement.remote())
        return {
            stage: dict(Counter(names.get(node, node[:8]) for node in actors.values()))
            for stage, actors in recorded.items()
        }


def connect(address: str | None) -> dict[str, float]:
    """Join the Ray cluster at ``address`` (or start a local one) once per process; its resources."""
    if not ray.is_initialized():
        ray.init(address=address, include_dashboard=False, configure_logging=False, log_to_driver=True)
    return ray.cluster_resources()


def cluster_nodes() -> list[Node]:
    """The alive nodes of the connected cluster, as :func:`stage_resources` plans on them."""
    return [
        Node(
            cpus=node["Resources"].get("CPU", 0.0),
            gpus=node["Resources"].get("GPU", 0.0),
            labels=node.get("Labels") or {},
            node_id=node["NodeID"],
        )
        for node in ray.nodes()
        if node["Alive"]
    ]


def pool(size: int, max_size: int | None = None) -> ray.data.ActorPoolStrategy:
    """An actor pool of ``size`` actors, or starting at ``size`` and growing to ``max_size``."""
    if max_size is None or max_size <= size:
        return ray.data.ActorPoolStrategy(size=size)
    return ray.data.ActorPoolStrategy(min_size=size, max_size=max_size)


def autoscaled_node_types(bootstrap: str = BOOTSTRAP_CONFIG) -> list[NodeType]:
    """The worker node types of the connected cluster's autoscaler: those of the cluster config it reported
    to the GCS, else those of the cluster launcher's config on this (the head) node; [] when neither
    exists (see :mod:`pipeline.embed.autoscaling`)."""
    try:
        config = ray._private.state.state.get_cluster_config()
    except Exception as error:  # noqa: BLE001 - a private API (Ray Data's own source): failing means none
        log.debug("no cluster config in the GCS: %s", error)
        config = None
    return reported_node_types(config) or launcher_node_types(bootstrap)


def decoded(
    listed: list[dict[str, Any]],
    settings: DecodeSettings,
    storage: StorageOptions,
    decoders: int,
    decode_cpus: float,
    label_selector: dict[str, str] | None = None,
    placement: PlacementLedger | None = None,
    max_decoders: int | None = None,
) -> ray.data.Dataset:
    """The listed objects as a dataset of decoded rows (the decode stage on a pool of ``decoders`` actors,
    up to ``max_decoders``, on the nodes that ``label_selector`` selects; the actors' nodes recorded in
    ``placement``)."""
    # one small block per group of objects, so decoding starts at once and spreads over the actors
    table = pa.Table.from_pylist(listed, schema=LISTED_SCHEMA)
    step = -(-len(listed) // min(len(listed), MAX_INPUT_BLOCKS))
    blocks = [table.slice(i, step) for i in range(0, len(listed), step)]
    return ray.data.from_blocks(blocks).map_batches(  # block metadata computed here, not in remote tasks
        _text_columns_typed(DecodeVideos, "decode"),
        fn_constructor_kwargs=dict(
            settings=settings,
            storage_options=storage,
            crash_ledger=CrashLedger(),
            max_tries=DECODE_TRIES,
            placement=placement,
        ),
        batch_size=1,
        batch_format="numpy",
        compute=pool(decoders, max_decoders),
        num_cpus=decode_cpus,
        label_selector=label_selector or None,
        # a native crash kills one decoder: Ray Data restarts the actor and retries its task (without limit
        # by default); the crash ledger turns the video into an error row after DECODE_TRIES crashes
    )


class _NoTraceback(logging.Filter):
    """Keeps Ray Data's errors and their tracebacks off the console (they stay in the session's
    ``ray-data.log``): the command reports a failed job in one line, with its cause."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno < logging.ERROR and record.exc_info is None


def _quiet_ray_data_console() -> None:
    """Unless the command is verbose, :class:`_NoTraceback` on the console handlers of Ray Data's logger."""
    if logging.getLogger().isEnabledFor(logging.INFO):
        return
    for handler in logging.getLogger("ray.data").handlers:
        console = isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler)
        if console and not any(isinstance(f, _NoTraceback) for f in handler.filters):
            handler.addFilter(_NoTraceback())


def embed_on_ray(
    listed: list[dict[str, Any]],
    settings: DecodeSettings,
    options: EmbedOptions,
    writer: LibraryWriter,
    model: VideoTextModel,
    journal: Journal,
) -> tuple[list[PartInfo], StagesRun]:
    """Decode, encode and write ``listed`` on Ray Data: the new parts, each recorded in ``journal`` as soon
    as it is written, and how the stages ran (where: :meth:`PlacementLedger.placement`)."""
    connect(options.address)
    _quiet_ray_data_console()
    stages = stage_resources(
        cluster_nodes(),
        len(listed),
        options,
        timings=lambda: (time_decode(listed, settings, options.storage), encode_cpu_s(model)),
        node_types=autoscaled_node_types(),
    )
    compiled = compiles(
        options.compile,
        stages.gpus_per_encoder > 0,
        len(listed) / stages.encoders,
        lambda: time_encode(model, torch_threads(stages.cpus_per_encoder)),
    )
    # on a CPU the encoder runs its share of the cores, rounded up, in lanes of sub-batches side by side
    threads = None if stages.gpus_per_encoder else torch_threads(stages.cpus_per_encoder)
    lanes = encoder_lanes(threads, compiled)
    log.info(
        "plan: %d decoders (up to %d; %.2g CPU each, nodes %s), %d encoders (up to %d; %.2g GPU, %.2g CPU "
        "each, %d lane(s) of %d video(s), nodes %s)",
        stages.decoders,
        stages.max_decoders or stages.decoders,
        stages.cpus_per_decoder,
        stages.decode_selector or "any",
        stages.encoders,
        stages.max_encoders or stages.encoders,
        stages.gpus_per_encoder,
        stages.cpus_per_encoder,
        lanes,
        options.batch_size,
        stages.encode_selector or "any",
        extra={"encoder_threads": threads, "encoder_lanes": lanes},  # None: a GPU encoder
    )
    placement = PlacementLedger()
    ds = decoded(
        listed,
        settings,
        options.storage,
        stages.decoders,
        stages.cpus_per_decoder,
        stages.decode_selector,
        placement,
        stages.max_decoders,
    )
    ds = ds.map_batches(
        _text_columns_typed(EncodeFrames, "encode"),
        fn_constructor_kwargs=dict(
            model_src=options.model,
            storage_options=options.storage,
            device=stages.encoder_device,  # the plan decides, not what the actor can see
            batch_size=options.batch_size,
            threads=threads,
            compiled=compiled,
            precision=options.precision,
            placement=placement,
            lanes=lanes,
        ),
        batch_size=options.batch_size * lanes,
        batch_format="numpy",
        compute=pool(stages.encoders, stages.max_encoders),
        num_cpus=stages.cpus_per_encoder,
        num_gpus=stages.gpus_per_encoder,
        label_selector=stages.encode_selector or None,
    )
    ds = ds.map_batches(
        # a plain Ray task (no actor of its own: writing needs no start-up, and pooled workers start quicker)
        WritePart(writer.store, writer.embedding_dim, writer.prompt_shape),
        batch_size=PART_ROWS,
        batch_format="numpy",
        num_cpus=WRITE_CPUS,
    )
    for written in ds.iter_rows():
        journal.record(written_part(written))
    return journal.parts, StagesRun(placement.placement(), compiled)
