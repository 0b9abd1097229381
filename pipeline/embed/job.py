"""The embed job as a Ray Data plan: list -> decode -> encode -> write, then index -> publish.

This module (with the train job) is where Ray is. Each stage is a plain callable from
``pipeline.embed.stages``; here they get their resources (:mod:`pipeline.embed.resources`): decoders are CPU
actors, encoders are GPU actors when the cluster has GPUs (CPU otherwise), the writer is a light task. Ray
Data streams batches between them with backpressure, so memory stays bounded whatever the number of videos;
only small uint8 frame tensors cross the object store. The plan sees the alive nodes (:func:`cluster_nodes`)
and keeps each stage on its nodes by label selectors; every stage actor records its node as it starts
(:class:`PlacementLedger`), which the summary reports.
"""

from __future__ import annotations

import functools
import logging
import math
import time
from collections import Counter
from dataclasses import replace
from typing import Any

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray
import ray.data
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from xclip_core.identity import ModelIdentity

from ..library import Library, LibraryWriter, PartInfo, Version, WorseVersionError
from ..library import index as faiss_index
from ..library.journal import Journal, resumable
from ..library.reader import embedded_rows, read_parts
from ..library.refresh import (
    RefreshPlan,
    index_delta,
    plan_refresh,
    rewrite_parts,
    whole_videos,
)
from ..library.writer import IndexDelta, count_videos
from ..models import VideoTextModel, absolute_source, load_model
from ..storage import StorageError, StorageOptions, Store, worker_storage_errors
from .options import EmbedOptions, EmbedSummary
from .resources import WRITE_CPUS, Node, stage_resources, time_stages
from .stages.decode import DecodeSettings, DecodeVideos
from .stages.encode import EncodeFrames
from .stages.list import list_objects
from .stages.write import WritePart, written_part

log = logging.getLogger(__name__)

PART_ROWS = 256  # rows per Parquet part file
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
            super().__init__(*args, **kwargs)
            if placement is not None:
                placement.record(name)

        def __call__(self, batch: dict[str, Any]) -> Any:
            out = super().__call__(batch)  # a batch, or a generator of batches (the decode stage's)
            return typed(out) if isinstance(out, dict) else (typed(chunk) for chunk in out)

    Typed.__name__ = Typed.__qualname__ = stage.__name__
    return Typed


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


def decoded(
    listed: list[dict[str, Any]],
    settings: DecodeSettings,
    storage: StorageOptions,
    decoders: int,
    decode_cpus: float,
    label_selector: dict[str, str] | None = None,
    placement: PlacementLedger | None = None,
) -> ray.data.Dataset:
    """The listed objects as a dataset of decoded rows (the decode stage on an actor pool, on the nodes that
    ``label_selector`` selects; the actors' nodes recorded in ``placement``)."""
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
        compute=ray.data.ActorPoolStrategy(size=decoders),
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


def embed(source: str, library: str, options: EmbedOptions) -> EmbedSummary:
    """Publish a version of ``library`` holding exactly the objects under ``source``, reusing the current
    version's rows of unchanged objects when it was made with the same model and decoding."""
    return _run(source, library, options, refresh=False)


def refresh(source: str, library: str, options: EmbedOptions) -> EmbedSummary:
    """Like :func:`embed`, but refuse a model or decoding other than the library's, and publish nothing
    when nothing changed."""
    return _run(source, library, options, refresh=True)


def _run(source: str, library: str, options: EmbedOptions, refresh: bool) -> EmbedSummary:
    """list -> compare with the current version -> decode, encode, write what changed -> index -> publish."""
    started = time.perf_counter()
    # the manifest records the model for `query`, which may run from another directory
    options = replace(options, model=absolute_source(options.model))
    model = load_model(options.model, options.storage)  # a bad checkpoint fails here, before any video
    frames = options.frames or model.num_frames
    if frames != model.num_frames:
        raise ValueError(f"the model takes {model.num_frames} frames per video, not {frames}")
    settings = DecodeSettings(frames, model.preprocessor, options.segment_s)
    listed = list_objects(source, options.storage)
    if not listed:
        raise ValueError(f"nothing to embed: {source} lists no objects")

    store = Store(library, options.storage)
    decode = {"frames": frames, "segment_s": options.segment_s}
    with Journal(store, model.identity.sha256, decode) as journal:  # the lease: one writer at a time
        base = Library.current_version(store)
        reused = Library(store, base) if _reusable(base, model.identity, decode, refresh) else None
        plan = plan_refresh(reused, listed, options.retry_failed)
        if refresh and base is not None and plan.changes.nothing:
            journal.finish()
            rows = Library(store, base).table(["uri", "error"])
            return _summary(
                store.uri, base.number, rows, listed, started, plan.changes.to_dict(), published=False
            )

        writer = LibraryWriter(store, embedding_dim=model.embedding_dim, prompt_shape=model.rerank_shape)
        resumed, covered = resumable(journal, plan.to_embed, model.embedding_dim, model.rerank_shape)
        to_embed = [row for row in plan.to_embed if row["uri"] not in covered]
        _quiet_ray_data_console()
        with worker_storage_errors():  # a worker's StorageError, out of Ray's wrapping: exit 2, not a trace
            embedded, placement = (
                _embed_objects(to_embed, settings, options, writer, model, journal) if to_embed else ([], {})
            )
        new_parts = resumed + whole_videos(writer, embedded)
        index, trained_on = _index(writer, plan, new_parts, reused)
        changes = replace(plan.changes, resumed_rows=sum(p.rows - len(p.deleted) for p in resumed)).to_dict()
        # the version's rows, read once before publishing: nothing is read after it (a store failing then
        # would report an error for a published version)
        rows = read_parts(writer.store, plan.kept + plan.rewrite + new_parts, writer.schema, ["uri", "error"])
        if base is not None and not options.allow_worse:
            _refuse_worse(base, rows)
        version = writer.publish(
            plan.kept + rewrite_parts(writer, plan.rewrite) + new_parts,
            index,
            model.identity,
            base,
            decode=decode,
            changes=changes,
            trained_on=trained_on,
        )
        _finish(journal)
    return _summary(store.uri, version.number, rows, listed, started, changes, placement=placement)


FAILURE_JUMP = 0.5  # a version whose share of failed objects is this much above the current one's is refused


def _finish(journal: Journal) -> None:
    """Remove the journal of a job whose version is published; a store failing now costs a stale journal (a
    later job or ``gc`` removes it), not an error for a published version."""
    try:
        journal.finish()
    except StorageError as e:
        log.warning("published; the run's journal stays behind: %s", e)


def _refuse_worse(base: Version, rows: pa.Table) -> None:
    """Raise :class:`WorseVersionError` if the new version's ``rows`` (``uri``, ``error``) embed nothing where
    ``base`` embedded something, or fail a far larger share of its objects (:data:`FAILURE_JUMP`): a wrong
    flag, a model that cannot encode these videos or a storage outage must not replace a library that
    answered queries."""
    after, before = count_videos(rows), base.manifest["counts"]
    rate_before = before["failed"] / max(before["videos"], 1)
    rate = after["failed"] / max(after["videos"], 1)
    if before["ok"] and (after["ok"] == 0 or rate - rate_before >= FAILURE_JUMP):
        reasons = rows.filter(pc.is_valid(rows["error"]))["error"].to_pylist()
        common = max(set(reasons), key=reasons.count) if reasons else "?"
        raise WorseVersionError(
            f"{after['failed']} of {after['videos']} objects failed (version {base.number} has "
            f"{before['failed']} of {before['videos']}; most often: {common}): version {base.number} stays "
            f"current. Pass --allow-worse to publish anyway (e.g. when the source really has no videos left)"
        )


def _reusable(base: Version | None, identity: ModelIdentity, decode: dict[str, Any], refresh: bool) -> bool:
    """Whether the rows of ``base`` can stay in a version made with ``identity`` and ``decode``; a refresh
    refuses what cannot."""
    if base is None:
        return False
    problem = None
    if base.model.sha256 != identity.sha256:
        problem = (
            f"version {base.number} was embedded with another model ({base.model.source}, "
            f"sha256 {base.model.sha256[:16]}...), not {identity.source}"
        )
    elif base.manifest.get("decode") != decode:
        recorded = base.manifest.get("decode") or "nothing (written by an older videosearch)"
        problem = f"version {base.number} records decoding {recorded}, not {decode}"
    if problem and refresh:
        raise ValueError(f"cannot refresh: {problem}; re-embed everything with `videosearch embed`")
    return problem is None


def _embed_objects(
    listed: list[dict[str, Any]],
    settings: DecodeSettings,
    options: EmbedOptions,
    writer: LibraryWriter,
    model: VideoTextModel,
    journal: Journal,
) -> tuple[list[PartInfo], dict[str, dict[str, int]]]:
    """Decode, encode and write ``listed`` on Ray Data: the new parts, each recorded in ``journal`` as soon
    as it is written, and where the stages ran (:meth:`PlacementLedger.placement`)."""
    connect(options.address)
    stages = stage_resources(
        cluster_nodes(),
        len(listed),
        options,
        timings=functools.partial(time_stages, listed, settings, options.storage, model),
    )
    log.info(
        "plan: %d decoders (%.2g CPU each, nodes %s), %d encoders (%.2g GPU, %.2g CPU each, nodes %s)",
        stages.decoders,
        stages.cpus_per_decoder,
        stages.decode_selector or "any",
        stages.encoders,
        stages.gpus_per_encoder,
        stages.cpus_per_encoder,
        stages.encode_selector or "any",
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
    )
    ds = ds.map_batches(
        _text_columns_typed(EncodeFrames, "encode"),
        fn_constructor_kwargs=dict(
            model_src=options.model,
            storage_options=options.storage,
            device=stages.encoder_device,  # the plan decides, not what the actor can see
            batch_size=options.batch_size,
            # on a CPU the encoder runs its share of the cores, rounded up
            threads=None if stages.gpus_per_encoder else math.ceil(stages.cpus_per_encoder),
            placement=placement,
        ),
        batch_size=options.batch_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=stages.encoders),
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
    return journal.parts, placement.placement()


def _index(
    writer: LibraryWriter, plan: RefreshPlan, new_parts: list[PartInfo], base: Library | None
) -> tuple[faiss.Index | IndexDelta, int]:
    """The new version's index and the vectors its centroids saw: the base's with a delta (small changes),
    the base's updated in place (its changed and deleted rows out, the new rows in), or built anew (no base,
    or too much drift)."""
    ids, vectors = embedded_rows(writer.store, new_parts, writer.schema)
    if base is not None:
        entry = base.manifest["index"]
        trained_on = entry.get("trained_on") or entry["ntotal"]
        total = entry["ntotal"] - len(plan.gone_ids) + len(ids)
        if not faiss_index.needs_rebuild(entry["kind"], total, trained_on):
            parts = plan.kept + new_parts
            delta = None if plan.rewrite else index_delta(entry, plan.gone_ids, new_parts, parts, total)
            if delta is not None:
                return delta, trained_on
            index = faiss_index.remove(base.read_index(), plan.gone_ids)
            faiss_index.add(index, ids, vectors)
            return index, trained_on
    kept_ids, kept_vectors = embedded_rows(writer.store, plan.kept + plan.rewrite, writer.schema)
    index = faiss_index.build_index(np.concatenate([kept_ids, ids]), np.concatenate([kept_vectors, vectors]))
    return index, index.ntotal


def _summary(
    library: str,
    version: int,
    rows: pa.Table,
    listed: list[dict[str, Any]],
    started: float,
    changes: dict[str, int],
    published: bool = True,
    placement: dict[str, dict[str, int]] | None = None,
) -> EmbedSummary:
    """What version ``version`` of ``library`` holds (its ``rows``' ``uri`` and ``error``): embedded videos
    and segments, and the failures with their reasons; where the stages ran (empty when nothing was
    embedded)."""
    errors = rows.filter(pc.is_valid(rows["error"]))
    ok_uris = set(rows.filter(pc.is_null(rows["error"]))["uri"].to_pylist())
    failures = sorted(set(zip(errors["uri"].to_pylist(), errors["error"].to_pylist(), strict=True)))
    return EmbedSummary(
        library=library,
        version=version,
        objects=len(listed),
        ok=len(ok_uris),
        failed=len({uri for uri, _ in failures} - ok_uris),
        segments=rows.num_rows - errors.num_rows,
        seconds=time.perf_counter() - started,
        failures=[{"uri": uri, "error": error} for uri, error in failures],
        changes=changes,
        published=published,
        placement=placement or {},
    )
