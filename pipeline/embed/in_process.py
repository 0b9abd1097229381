"""The embed stages in the job's own process: a job on this machine without Ray's start-up and hops.

A local Ray costs ~12 s before its first video on a laptop (its services, then each actor's imports and model
load), more than a refresh that adds a few dozen videos spends on them, and on a small machine its per-block
work and actors take CPU from the stages (on 2 cores a 200-video job runs 2-3x as fast here as on Ray). So
when the job runs on this machine (no cluster to join) and either the objects to embed are few
(``IN_PROCESS_MAX_OBJECTS`` and ``IN_PROCESS_MAX_BYTES`` in :mod:`pipeline.embed.options`) or the machine is
small (at most ``IN_PROCESS_MAX_CPUS`` CPUs), the same stage callables run here: decode -> encode -> write,
one part per :data:`~pipeline.library.writer.PART_ROWS` rows, each part recorded in the journal as soon
as it is written, exactly as the Ray plan does. ``--executor ray`` or ``in-process`` overrides the choice.

Decoding runs one decoder per CPU, a few batches ahead of the encoder, and the batches reach the encoder in
the listed order (an encoder given several CPUs takes several batches a call and encodes them side by side,
each on its share of its torch threads: :func:`~pipeline.embed.resources.encoder_lanes`):

- a small change set (at most ``IN_PROCESS_MAX_OBJECTS``) decodes on threads of this process, which start at
  once (PyAV and Pillow release the GIL: 2 threads decode ~1.6x as fast as one);
- a larger job (on a small machine) decodes in worker processes (:mod:`~pipeline.embed.decoder_processes`):
  they cost ~0.6 s to start, share no GIL, and a crash in native decoder code costs one worker, not the job
  (the video is failed after a few tries, as on Ray).

A crash in native decoder code on a decoding thread ends this process. There an :class:`InFlightMarker`
names the videos being decoded; a job for the same library that finds a marker left behind by a dead
process runs on Ray, where each of them is tried a bounded number of times, and resumes from the parts
already written.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import sys
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import numpy as np
import torch

from ..library import LibraryWriter, PartInfo
from ..library.journal import Journal
from ..library.writer import PART_ROWS
from ..models import VideoTextModel
from .compiling import compiles
from .ctrl_c import CtrlC, deferred
from .decoder_processes import DecoderProcesses
from .in_flight import InFlightMarker
from .options import (
    IN_PROCESS_MAX_BYTES,
    IN_PROCESS_MAX_CPUS,
    IN_PROCESS_MAX_OBJECTS,
    EmbedOptions,
    StagesRun,
)
from .parallel import in_parallel
from .resources import (
    COLD_OVER_WARM,
    encode_cpu_s,
    encoder_lanes,
    share_cpus,
    time_decode,
    time_encode,
    torch_threads,
)
from .stages.decode import DecodeSettings, DecodeVideos
from .stages.encode import EncodeFrames
from .stages.write import WritePart, written_part

log = logging.getLogger(__name__)

PLACEMENT = "this process"  # the summary's node name for the stages run here
DECODER_PROCESSES = "decoder processes"  # ... and for the decoder processes it starts (their count)
DECODED_AHEAD = 2  # decoded batches that may wait for the encoder beyond one per decoding thread
TIMED_FROM = 16  # objects from which the job times one video per stage to share the CPUs between them


def runs_in_process(listed: list[dict[str, Any]], options: EmbedOptions, library: str) -> bool:
    """Whether the job embeds ``listed`` here (:func:`embed_in_process`) rather than on Ray.

    ``--executor auto`` runs here when there is no cluster to join (no ``--address``, no ``RAY_ADDRESS``, or
    either is ``local``, and no Ray connected in this process), no actor counts were asked for, ``listed`` is
    at most ``IN_PROCESS_MAX_OBJECTS`` objects of ``IN_PROCESS_MAX_BYTES`` or this machine has at most
    ``IN_PROCESS_MAX_CPUS`` CPUs, and no earlier in-process job of ``library`` died while decoding."""
    if options.executor != "auto":
        return options.executor == "in-process"
    if cluster_to_join(options.address) or options.decoders or options.encoders:
        return False
    size = sum(int(row.get("size") or 0) for row in listed)
    small = len(listed) <= IN_PROCESS_MAX_OBJECTS and size <= IN_PROCESS_MAX_BYTES
    if not small and usable_cpus() > IN_PROCESS_MAX_CPUS:
        return False
    crashed = InFlightMarker(library).left_behind()
    if crashed is not None:
        log.warning("a job died decoding %s: this one runs on Ray, where a crash costs an actor", crashed)
    return crashed is None


def cluster_to_join(address: str | None) -> bool:
    """Whether a job given ``address`` (``--address``) has a Ray cluster to join: an address other than
    ``local`` given or in ``RAY_ADDRESS``, or Ray already connected in this process."""
    address = address or os.environ.get("RAY_ADDRESS") or "local"
    return address != "local" or _ray_connected()


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity, which containers and ``taskset`` narrow)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _ray_connected() -> bool:
    """Whether this process already joined a Ray cluster (without importing Ray when it has not)."""
    ray = sys.modules.get("ray")
    return bool(ray is not None and ray.is_initialized())


def embed_in_process(
    listed: list[dict[str, Any]],
    settings: DecodeSettings,
    options: EmbedOptions,
    writer: LibraryWriter,
    model: VideoTextModel,
    journal: Journal,
) -> tuple[list[PartInfo], StagesRun]:
    """Decode, encode and write ``listed`` on this machine: the new parts, each recorded in ``journal`` as
    soon as it is written, and how the stages ran (the encoder in :data:`PLACEMENT`, the decoders there too
    or in :data:`DECODER_PROCESSES`)."""
    marker = InFlightMarker(writer.store.uri)
    processes = decoding_processes(listed)
    with contextlib.ExitStack() as stack:
        ctrl_c = stack.enter_context(deferred())  # Ctrl-C stops the job where it waits, not in lock code
        stack.callback(marker.clear)  # however the job ends (Ctrl-C, the store down), unless it crashes
        # started first: the worker processes import while this process times the stages
        workers = (
            stack.enter_context(DecoderProcesses(settings, options.storage, processes)) if processes else None
        )
        on_gpu = options.gpus_per_encoder != 0 and torch.cuda.is_available()
        threads = encoder_threads(listed, settings, options, functools.partial(encode_cpu_s, model), on_gpu)
        ctrl_c.check()
        callers_threads = torch.get_num_threads()
        stack.callback(torch.set_num_threads, callers_threads)  # the caller's, whatever the encoder was given
        compiled = compiles(
            options.compile, on_gpu, len(listed), lambda: time_encode(model, threads or callers_threads)
        )
        lanes = encoder_lanes(threads, compiled)
        per_call = options.batch_size * lanes
        groups = (listed[i : i + per_call] for i in range(0, len(listed), per_call))
        batches = (as_batch(group) for group in groups)  # one encoder call's videos each
        if workers is not None:
            decoded = workers.decoded(batches, DECODED_AHEAD, ctrl_c)
        else:
            decode = DecodeVideos(settings, options.storage, crash_ledger=marker)
            decoded = _on_threads(batches, decode, ctrl_c)
        stack.enter_context(contextlib.closing(decoded))  # its decoding stops before the workers do
        encode = EncodeFrames(
            options.model,
            options.storage,
            "cuda" if on_gpu else "cpu",
            options.batch_size,
            threads=threads,
            loaded=model,
            precision=options.precision,
            compiled=compiled,
            lanes=lanes,
        )
        write = WritePart(writer.store, writer.embedding_dim, writer.prompt_shape)
        _encode_and_write(decoded, encode, write, journal)
    decoders = {DECODER_PROCESSES: processes} if processes else {PLACEMENT: 1}
    return journal.parts, StagesRun({"decode": decoders, "encode": {PLACEMENT: 1}}, encode.compiled)


def _encode_and_write(
    decoded: Iterable[list[dict[str, np.ndarray]]], encode: EncodeFrames, write: WritePart, journal: Journal
) -> None:
    """Encode the ``decoded`` batches in order and write them, a part per :data:`PART_ROWS` rows, each
    recorded in ``journal`` as soon as it is written."""
    pending: list[dict[str, np.ndarray]] = []
    for frames in (batch for batches in decoded for batch in batches):
        pending.append(encode(frames))
        while sum(len(b["uri"]) for b in pending) >= PART_ROWS:
            part, pending = _split(pending, PART_ROWS)
            journal.record(_written(write, part))
    if pending and sum(len(b["uri"]) for b in pending):
        journal.record(_written(write, _concat(pending)))


def decoding_processes(listed: list[dict[str, Any]]) -> int:
    """The worker processes that decode ``listed`` (:mod:`~pipeline.embed.decoder_processes`): one per CPU
    for more than ``IN_PROCESS_MAX_OBJECTS`` objects on a POSIX system with more than one CPU; else 0, and
    threads of this process decode (they start ~0.6 s sooner, which is most of a small change set's job)."""
    cpus = usable_cpus()
    return cpus if len(listed) > IN_PROCESS_MAX_OBJECTS and cpus > 1 and os.name == "posix" else 0


def as_batch(group: list[dict[str, Any]]) -> dict[str, np.ndarray]:
    """Listed rows as one batch of columns."""
    return {name: np.array([row[name] for row in group], dtype=object) for name in group[0]}


def _on_threads(
    batches: Iterable[dict[str, np.ndarray]], decode: DecodeVideos, ctrl_c: CtrlC
) -> Iterator[list[dict[str, np.ndarray]]]:
    """Each of ``batches`` decoded by ``decode`` (a list of batches of rows: several for a long video's
    segments), in order, a few ahead, on a thread per CPU (threads waiting on the window cost nothing);
    ``KeyboardInterrupt`` in place of the next batch once ``ctrl_c`` is pressed."""
    calls = ((lambda batch=batch: list(decode(batch))) for batch in batches)
    return in_parallel(calls, usable_cpus(), DECODED_AHEAD, ctrl_c)


def encoder_threads(
    listed: list[dict[str, Any]],
    settings: DecodeSettings,
    options: EmbedOptions,
    encode_cpu_s: Callable[[Callable[[float], bool], Callable[[float], bool]], float],
    on_gpu: bool,
) -> int | None:
    """The encoder's torch threads for ``listed`` (None: torch's default), beside a decoder per CPU;
    ``encode_cpu_s(settled, enough)``: one clip's encoding CPU-seconds
    (:func:`~pipeline.embed.resources.encode_cpu_s`).

    On a GPU, or for fewer than :data:`TIMED_FROM` objects, torch keeps its default. Otherwise the encoder
    gets its share of the CPUs as the Ray plan shares one node (:func:`~pipeline.embed.resources.share_cpus`),
    rounded up, by one video's CPU-seconds in each stage: the bundled model (decode-bound) one torch thread,
    base-patch32 (encode-bound) every core. More torch threads than the encoder keeps busy take cores from
    decoding (their OpenMP threads spin while they wait): the bundled model, 120 clips on 2 cores, spent
    50-65 ms of CPU per video in the encoder's process with two torch threads against 17-20 with one.

    The clip's first (cold) run settles the count when the count is the same for its CPU-seconds and for
    them divided by :data:`~pipeline.embed.resources.COLD_OVER_WARM` (the most a first run was seen to cost
    over a warm one), and it stops as soon as its CPU-seconds so far, so divided, give the encoder every
    core: base-patch32 beside the decoding of a 5 s clip (~0.02 CPU-s) is settled after ~0.05 s of a clip
    that costs ~0.9 s on one core (on 2 cores, 3% of a 64-clip job)."""
    if on_gpu or len(listed) < TIMED_FROM:
        return None
    decode_s, cpus = time_decode(listed, settings, options.storage), usable_cpus()

    def threads_for(encode_s: float, decode_s: float = decode_s) -> int:
        return torch_threads(share_cpus(cpus, decode_s, encode_s).cpus_per_encoder)

    most = threads_for(1.0, decode_s=0.0)  # what the encoder gets were decoding free: every core
    encode_s = encode_cpu_s(
        lambda first: threads_for(first) == threads_for(first / COLD_OVER_WARM),
        lambda so_far: threads_for(so_far / COLD_OVER_WARM) == most,
    )
    threads = threads_for(encode_s)
    # a run stopped early counts what it took so far: the log says "timed", not what a clip costs
    log.info(
        "one video: decode %.3f CPU-s, encode timed %.3f CPU-s: %d torch threads", decode_s, encode_s, threads
    )
    return threads


def _written(write: WritePart, rows: dict[str, np.ndarray]) -> PartInfo:
    described = write(rows)
    return written_part({name: column[0] for name, column in described.items()})


def _concat(batches: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    return {name: np.concatenate([b[name] for b in batches]) for name in batches[0]}


def _split(batches: list[dict[str, np.ndarray]], rows: int) -> tuple[dict[str, np.ndarray], list[dict]]:
    """The first ``rows`` rows of ``batches`` as one batch, and the rest."""
    whole = _concat(batches)
    rest = {name: column[rows:] for name, column in whole.items()}
    return {name: column[:rows] for name, column in whole.items()}, [rest]
