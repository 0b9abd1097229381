"""The embed job: list -> compare with the current version -> decode, encode, write -> index -> publish.

The stages (``pipeline.embed.stages``) run on Ray Data (:mod:`pipeline.embed.on_ray`, imported only then) or,
for a small change set on this machine, in this process (:mod:`pipeline.embed.in_process`): the same
callables, the same journal, the same library either way. Around them this module does what needs the
library: the plan of what changed (:mod:`pipeline.library.refresh`), resuming a killed run's parts, the
index, the checks before publishing, and the summary.
"""

from __future__ import annotations

import logging
import time
from dataclasses import replace
from typing import Any

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from xclip_core.identity import ModelIdentity

from ..flags import NodeSettingError
from ..library import Library, LibraryWriter, PartInfo, Version, WorseVersionError
from ..library import index as faiss_index
from ..library.journal import Journal, resumable
from ..library.local_cache import LocalCache
from ..library.reader import embedded_rows
from ..library.refresh import (
    RefreshPlan,
    copy_rows,
    index_delta,
    plan_refresh,
    rewrite_parts,
    same_local_bytes,
    version_rows,
    whole_videos,
)
from ..library.writer import IndexDelta, count_videos
from ..models import VideoTextModel, absolute_source
from ..storage import StorageError, Store, as_store
from ..worker_errors import worker_errors
from .in_flight import InFlightMarker
from .job_model import JobModel
from .options import EmbedOptions, EmbedSummary, StagesRun
from .stages.list import list_objects

log = logging.getLogger(__name__)

# what a worker raises that the command reports in one line: the store down, a setting its node cannot honour
WORKER_ERRORS = (StorageError, NodeSettingError)


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
    store = Store(library, options.storage)
    # loaded here unless the library recorded these files (then only if something is to be embedded)
    model = JobModel(options.model, options.storage, Library.current_version(store))
    frames = options.frames or model.num_frames
    if frames != model.num_frames:
        raise ValueError(f"the model takes {model.num_frames} frames per video, not {frames}")
    listed = list_objects(source, options.storage)
    if not listed:
        raise ValueError(f"nothing to embed: {source} lists no objects")

    # what the rows depend on besides the model (exact sampling is not named: libraries from before it)
    decode = {"frames": frames, "segment_s": options.segment_s}
    if options.sampling != "exact":
        decode["sampling"] = options.sampling
    command = "refresh" if refresh else "embed"
    with Journal(store, model.identity.sha256, decode, command) as journal:  # the lease: one writer at a time
        base = Library.current_version(store)
        # a remote library's parts and index file are read from local copies where this machine has them
        cache = None if store.is_local else LocalCache.from_env()
        reusable = _reusable(base, model.identity, decode, refresh)
        reused = Library(store, base, cache=cache) if reusable else None
        local = as_store(source, options.storage).is_local  # a new file without an ETag: compare its bytes
        plan = plan_refresh(reused, listed, options.retry_failed, same_local_bytes if local else None)
        if reused is not None and refresh and plan.changes.nothing:
            journal.finish()
            rows = version_rows(store, reused.schema, plan, reused.snapshot.parts, ["uri", "error"], cache)
            return _summary(
                store.uri, base.number, rows, listed, started, plan.changes.to_dict(), published=False
            )

        writer = LibraryWriter(store, embedding_dim=model.embedding_dim, prompt_shape=model.rerank_shape)
        resumed, covered = resumable(journal, plan.to_embed, model.embedding_dim, model.rerank_shape)
        to_embed = [row for row in plan.to_embed if row["uri"] not in covered]
        embedded: list[PartInfo] = []
        ran, executor = StagesRun(), None
        if to_embed:
            with worker_errors(WORKER_ERRORS):  # out of Ray's wrapping: exit 2 and one line, not a trace
                embedded, ran, executor = _embed_objects(
                    to_embed, frames, options, writer, model.loaded(), journal
                )
        copied = copy_rows(writer, reused, plan) if reused is not None and plan.copies else []
        new_parts = resumed + copied + whole_videos(writer, embedded)
        changes = replace(plan.changes, resumed_rows=sum(p.rows - len(p.deleted) for p in resumed)).to_dict()
        # the version's rows, read once before publishing: nothing is read after it (a store failing then
        # would report an error for a published version)
        rows = version_rows(
            store, writer.schema, plan, plan.kept + plan.rewrite + new_parts, ["id", "uri", "error"], cache
        )
        if base is not None and not options.allow_worse:
            _refuse_worse(base, rows)  # before anything is rewritten or indexed for it
        # the base index's delta names parts by path: their rows are rewritten into parts it can name
        added = reused.manifest["index"].get("added", ()) if reused is not None else ()
        rewritten, readded = rewrite_parts(writer, plan.rewrite, frozenset(added))
        index, trained_on = _index(writer, plan, new_parts, reused, rewritten, readded)
        version = writer.publish(
            plan.kept + rewritten + readded + new_parts,
            index,
            model.identity,
            base,
            decode=decode,
            changes=changes,
            trained_on=trained_on,
            model_files=model.files,
            rows=rows,  # read once: not again
        )
        _finish(journal)
    InFlightMarker(store.uri).clear()  # whichever way this job ran, nothing of the library is in flight
    return _summary(store.uri, version.number, rows, listed, started, changes, ran=ran, executor=executor)


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
    frames: int,
    options: EmbedOptions,
    writer: LibraryWriter,
    model: VideoTextModel,
    journal: Journal,
) -> tuple[list[PartInfo], StagesRun, str]:
    """Decode, encode and write ``listed`` in this process or on Ray: the new parts, how the stages ran, and
    the executor (``"in-process"`` or ``"ray"``)."""
    # torch, the decoders and Ray only for a job that embeds something
    import torch

    from .in_process import embed_in_process, runs_in_process
    from .stages.decode import DecodeSettings
    from .stages.encode import compute_dtype

    settings = DecodeSettings(
        frames, model.preprocessor, options.segment_s, options.sampling, options.decode_device
    )
    # in the dtype a CPU encoder runs it in: both executors time a clip of it to share the CPUs
    model.to(dtype=compute_dtype(torch.device("cpu"), options.precision))
    if runs_in_process(listed, options, writer.store.uri):
        log.info("embedding %d objects in this process (no Ray)", len(listed))
        return (*embed_in_process(listed, settings, options, writer, model, journal), "in-process")
    from .on_ray import embed_on_ray

    return (*embed_on_ray(listed, settings, options, writer, model, journal), "ray")


def _index(
    writer: LibraryWriter,
    plan: RefreshPlan,
    new_parts: list[PartInfo],
    base: Library | None,
    rewritten: list[PartInfo],
    readded: list[PartInfo],
) -> tuple[faiss.Index | IndexDelta, int]:
    """The new version's index and the vectors its centroids saw: the base's with a delta (small changes),
    the base's updated in place (its changed and deleted rows out, the new rows in), or built anew (no base,
    or too much drift). ``rewritten`` and ``readded``: the parts that ``plan.rewrite``'s rows were written
    into, rows of the base's index file and of its delta's parts (:func:`rewrite_parts`)."""
    ids, vectors = embedded_rows(writer.store, new_parts, writer.schema)
    if base is not None:
        entry = base.manifest["index"]
        trained_on = entry.get("trained_on") or entry["ntotal"]
        total = entry["ntotal"] - len(plan.gone_ids) + len(ids)
        if not faiss_index.needs_rebuild(entry["kind"], total, trained_on):
            parts = plan.kept + rewritten + readded + new_parts
            delta = index_delta(entry, plan.gone_ids, new_parts + readded, parts, total)
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
    ran: StagesRun | None = None,
    executor: str | None = None,
) -> EmbedSummary:
    """What version ``version`` of ``library`` holds (its ``rows``' ``uri`` and ``error``): embedded videos
    and segments, and the failures with their reasons; how and where the stages ran (``None`` and empty when
    nothing was embedded)."""
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
        placement=ran.placement if ran else {},
        executor=executor,
        compiled=ran.compiled if ran else False,
    )
