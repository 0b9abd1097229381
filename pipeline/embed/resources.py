"""How the embed job places its stages on a cluster (no Ray here: the job passes the alive :class:`Node`).

Sizes come from nodes, never from the cluster's total: an actor never asks for more than the node it is
meant for offers, and the actors of a stage share one size (a Ray Data actor pool asks the same of each), a
whole fraction of those nodes, so that they pack. Ray places actors in any order, so on several nodes each
node serves one stage: one stage cannot then take the room the other was planned.

- One node with CPUs (a head without CPUs aside): the stages share it. With GPUs, one encoder per
  ``gpus_per_encoder`` GPUs with one CPU each, and every CPU that the encoders and the writer's tasks
  (:data:`WRITE_CPUS`) leave decodes, one CPU per decoder. With CPUs only, which stage is the bottleneck
  depends on the model and the videos: base-patch32 encodes a video in seconds and decodes it in a tenth of
  one, the bundled tiny model encodes in a fiftieth and is decode-bound. So the driver measures one video's
  CPU-seconds in each stage (the first listed videos, decoded as the job will; the loaded model on a zero
  clip, one thread) and shares the CPUs in proportion (:func:`share_cpus`).
- Several nodes, with GPUs: the GPU nodes encode (one encoder per GPU share, one CPU each) and the others
  decode, ``floor(node CPUs)`` decoders of one CPU each; a cluster of GPU nodes only shares every node as
  one node is shared.
- Several nodes, CPUs only: the encoders take ``m`` nodes of one size ``s``, one encoder of
  ``s - WRITE_CPUS`` CPUs on each (the rest is the writer's room), and the other nodes decode, one decoder
  per CPU; ``s`` and ``m`` maximize the modelled rate ``min(decode CPUs / decode_s, encode CPUs / encode_s)``
  of the timed video.

Which node serves which stage: when the alive nodes carry the stage label (``EmbedOptions.stage_label``,
default ``videosearch-stage``) with both values, ``decode`` and ``encode``, those nodes do: each stage selects
its value (Ray's ``label_selector``), which also tells an autoscaler which node type to start for more
actors; ``cluster.yaml`` labels its worker types so. Otherwise the plan assigns the nodes as above and keeps
each stage off the other's nodes by the label Ray gives every node, ``ray.io/node-id``.

Counts default to what the alive nodes fit. On an autoscaling cluster (:mod:`pipeline.embed.autoscaling`
finds its node types), a stage's pool starts at that count and may grow to what the node types that serve
it host at their ``max_workers`` (:func:`with_bounds`): Ray Data adds actors while their stage is the
bottleneck, and the pending ones make the autoscaler start nodes of their kind. Which type serves which
stage: its stage label when the plan goes by labels, else, in a GPU plan, encode for the types with an
encoder's GPUs and decode for the others; a CPU-only plan without labels does not say, and keeps its pools
fixed. What ``options`` sets is kept (a given count is a fixed pool); there are never more decoders than
objects (each is decoded by one actor).
"""

from __future__ import annotations

import functools
import logging
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from ..models import VideoTextModel
from ..storage import StorageOptions, Store
from .autoscaling import NodeType
from .options import EmbedOptions
from .stages.decode import DecodeSettings, decode_video

log = logging.getLogger(__name__)

WRITE_CPUS = 0.1  # the write stage's tasks
GPU_ENCODER_CPUS = 1.0  # a GPU encoder's CPU: batches in, results out (the frames are normalized on the GPU)
DECODE, ENCODE = "decode", "encode"  # the stages, and the values of the stage label
NODE_ID_LABEL = "ray.io/node-id"  # the label Ray gives every node: its id
EPS = 1e-9  # CPU sums that should be equal, compared as floats
MAX_ENCODER_LANES = 4  # sub-batches a CPU encoder encodes at once (see encoder_lanes)

FALLBACK_DECODE_S = 0.1  # per video, when none of the first videos decodes (a typical 10 s 360p clip)
TIMED_VIDEOS = 3  # listed videos tried for the decode timing
# a first run's seconds over a warm run's, at most: 1.15-1.27 by the thread clock for the bundled model and
# base-patch32 (2026-12-02); up to 2 for a small model by the wall clock
COLD_OVER_WARM = 2.0


@dataclass(frozen=True)
class CpuShares:
    decoders: int
    cpus_per_decoder: float
    cpus_per_encoder: float
    decode_s: float  # measured CPU-seconds per decoded row (video or segment), one thread
    encode_s: float  # measured CPU-seconds per encoded row, one thread


def torch_threads(cpus: float) -> int:
    """The torch threads a CPU encoder runs on its share of ``cpus``: rounded up (a float sum that should be
    whole, 2.0000000001, is not one more)."""
    return max(1, math.ceil(cpus - EPS))


def encoder_lanes(threads: int | None, compiled: bool) -> int:
    """How many sub-batches a CPU encoder of ``threads`` torch threads encodes side by side, each on
    ``threads / lanes`` of them (:class:`~pipeline.embed.stages.encode.EncodeFrames`): the largest divisor of
    ``threads`` up to :data:`MAX_ENCODER_LANES`; 1 without a thread count (a GPU, or a job too small to share
    the CPUs) or compiled (one graph, one batch at a time).

    Side by side on one model (torch releases the GIL) each core stays on its own matrices, where one batch
    on all of them makes the cores wait for each other after every operation: on 2 cores one torch thread
    encoded base-patch32 at 1.27 videos/s, one batch on 2 threads at 2.27-2.30, two batches side by side at
    2.32-2.47. Each lane holds its sub-batch's activations (base-patch32, 4 videos: ~75 MB), hence the cap."""
    if not threads or compiled:
        return 1
    return max(n for n in range(1, min(threads, MAX_ENCODER_LANES) + 1) if threads % n == 0)


def time_decode(listed: list[dict[str, Any]], settings: DecodeSettings, storage: StorageOptions) -> float:
    """CPU-seconds to decode the first listed video that decodes (of :data:`TIMED_VIDEOS`), as a whole,
    warm (:func:`warm_seconds` on this process's CPU clock: neither the store's latency nor the processes
    starting beside it count, while the store client's own thread does: s3fs reads on its event loop's
    thread, ~8 of a 46 ms decode from a local S3 server). A segment costs about as much as a whole video: the
    same frames, sought."""
    whole = replace(settings, segment_s=None)
    for row in [row for row in listed if row["size"]][:TIMED_VIDEOS]:
        try:
            decode = functools.partial(decode_video, Store(row["uri"], storage), whole)
            return warm_seconds(decode, clock=time.process_time)
        except Exception:  # noqa: BLE001 - a bad video is the job's business, not the timing's
            continue
    return FALLBACK_DECODE_S


def warm_seconds(
    call: Callable[[], object],
    clock: Callable[[], float] = time.perf_counter,
    settled: Callable[[float], bool] | None = None,
) -> float:
    """Seconds of ``call``'s second run by ``clock`` (wall-clock by default): the first pays one-time costs
    (the file's first read, the codec's and the kernels' set-up, memory) that can double a small model's or a
    short video's time, and that alone once tipped a job's CPU share to the encoder (2 torch threads spinning
    beside 2 decoders). ``settled(first)``: whether the first run's seconds (at least a warm run's, at most
    :data:`COLD_OVER_WARM` times it) already answer the caller; then they are returned without a second run
    (base-patch32's clip costs ~1 CPU-s per run)."""
    started = clock()
    call()
    first = clock() - started
    if settled is not None and settled(first):
        return first
    started = clock()
    call()
    return clock() - started


def time_encode(model: VideoTextModel, threads: int = 1) -> float:
    """Seconds (wall-clock) for one clip through the model's video side on ``threads`` torch threads, warm
    (:func:`warm_seconds`): how long the encoding of a job takes (``--compile auto``)."""
    return _timed_encode(model, threads, time.perf_counter)


def encode_cpu_s(
    model: VideoTextModel,
    settled: Callable[[float], bool] | None = None,
    enough: Callable[[float], bool] | None = None,
) -> float:
    """CPU-seconds for one clip through the model's video side on one torch thread, warm: this thread's CPU
    clock (one torch thread computes on the calling thread), so the processes starting beside it do not count.
    A job's CPU share goes by it: timed by the wall clock beside the decoder processes starting up, the
    bundled model's clip took 0.02-0.20 s, and the larger figures gave it 2 spinning torch threads.
    ``settled``: as :func:`warm_seconds` takes it. ``enough(seconds)``: whether any clip costing at least
    ``seconds`` answers the caller alike; a run stops once its seconds so far are enough (between two of the
    model's modules) and counts as costing those: base-patch32 beside a cheap decode gets every core after
    ~50 ms of its ~1 s clip."""
    return _timed_encode(model, 1, time.thread_time, settled, enough)


class _Enough(Exception):
    """Raised inside a timed run whose seconds so far already answer its caller."""


@torch.inference_mode()
def _timed_encode(
    model: VideoTextModel,
    threads: int,
    clock: Callable[[], float],
    settled: Callable[[float], bool] | None = None,
    enough: Callable[[float], bool] | None = None,
) -> float:
    height, width = model.preprocessor.crop_size
    clip = torch.zeros(1, model.num_frames, 3, height, width, dtype=next(model.parameters()).dtype)

    def run() -> None:
        started = clock()

        def stop_if_enough(*_: object) -> None:
            if enough(clock() - started):
                raise _Enough

        hooks = (
            [module.register_forward_pre_hook(stop_if_enough) for module in model.modules()] if enough else []
        )
        try:
            model.encode_videos(clip)
        except _Enough:
            pass
        finally:
            for hook in hooks:
                hook.remove()

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return warm_seconds(run, clock, settled)
    finally:
        torch.set_num_threads(before)


def share_cpus(
    cpus: float,
    decode_s: float,
    encode_s: float,
    encoders: int = 1,
    decoders: int | None = None,
    reserved: float = 0.0,
) -> CpuShares:
    """Split ``cpus`` (less ``reserved``, e.g. the writer's) between the decoders and the encoders in
    proportion to their seconds per row; each encoder keeps at least half a CPU, and ``decoders`` (one core
    each at most: decoding is single-threaded) is derived when not given."""
    free = max(cpus - reserved, 0.5 * encoders + 0.1)
    encode_total = max(0.5 * encoders, free * encode_s / (decode_s + encode_s))
    encode_total = min(encode_total, free - 0.1)  # and the decoders at least a tenth
    decode_total = free - encode_total
    decoders = decoders or max(1, math.ceil(decode_total - 0.25))
    return CpuShares(decoders, decode_total / decoders, encode_total / encoders, decode_s, encode_s)


@dataclass(frozen=True)
class Node:
    """An alive node as the plan sees it (from ``ray.nodes()``: ``Resources``, ``Labels``, ``NodeID``)."""

    cpus: float
    gpus: float = 0.0
    labels: Mapping[str, str] = field(default_factory=dict)
    node_id: str = ""


def actor_hosts(nodes: list[Node]) -> list[Node]:
    """The nodes that can host an actor (those with CPUs); with none (a head waiting for its workers), one
    node of one CPU, where the actors wait for the workers to come."""
    return [node for node in nodes if node.cpus > 0] or [Node(cpus=1.0)]


@dataclass(frozen=True)
class StageResources:
    """The actors of the decode and encode stages, what each one is given and where it may run."""

    decoders: int
    cpus_per_decoder: float
    encoders: int
    gpus_per_encoder: float
    cpus_per_encoder: float
    decode_selector: dict[str, str] = field(default_factory=dict)  # a Ray label selector; {}: any node
    encode_selector: dict[str, str] = field(default_factory=dict)
    max_decoders: int | None = None  # how far an autoscaling cluster lets each pool grow; None: fixed
    max_encoders: int | None = None

    @property
    def encoder_device(self) -> str:
        return "cuda" if self.gpus_per_encoder else "cpu"


def stage_resources(
    nodes: list[Node],
    objects: int,
    options: EmbedOptions,
    timings: Callable[[], tuple[float, float]],
    node_types: list[NodeType] | None = None,
) -> StageResources:
    """Place the stages on the alive ``nodes``, for ``objects`` listed objects (the module's rules), the
    pools growing on the autoscaler's ``node_types`` (:func:`with_bounds`).

    GPU encoders (one per ``options.gpus_per_encoder`` GPUs; by default 1 when a node has GPUs) unless that
    is 0; ``timings()`` (one video's seconds to decode and to encode, one thread) is called only when the
    CPUs are shared between the stages by their costs. Raises ``ValueError`` when GPU encoders are asked
    and no node has the GPUs of one.
    """
    hosts = actor_hosts(nodes)
    if options.gpus_per_encoder is not None:
        gpus_per_encoder = options.gpus_per_encoder
    else:
        gpus_per_encoder = float(any(node.gpus for node in hosts))
    labelled = _labelled(hosts, options.stage_label)
    if gpus_per_encoder:
        plan = _gpu_plan(hosts, labelled, gpus_per_encoder, options)
    elif labelled is None and len(hosts) == 1:
        plan = _shared_cpu_plan(hosts[0], options, timings)
    else:
        plan = _split_cpu_plan(hosts, labelled, options, timings)
    if labelled is not None:  # each stage selects its label, which the autoscaler also reads
        plan = replace(
            plan, decode_selector={options.stage_label: DECODE}, encode_selector={options.stage_label: ENCODE}
        )
    plan = replace(plan, decoders=min(plan.decoders, objects))
    if node_types and (labelled is not None or gpus_per_encoder):
        plan = with_bounds(plan, node_types, objects, options, by_label=labelled is not None)
    return plan


def with_bounds(
    plan: StageResources, node_types: list[NodeType], objects: int, options: EmbedOptions, by_label: bool
) -> StageResources:
    """``plan`` with each pool's bound: the actors of its size that the node types serving the stage
    (``by_label``: their stage label; else GPU types encode and the others decode) host at their
    ``max_workers`` (an unbounded type: as many as there are objects to give them), never fewer than the
    plan starts with; a count that ``options`` sets stays fixed."""
    decoders = encoders = 0
    for kind in node_types:
        if by_label:
            stage = kind.labels.get(options.stage_label)
        else:
            stage = ENCODE if kind.gpus >= plan.gpus_per_encoder else DECODE
        left = kind.cpus
        hosted = {DECODE: 0, ENCODE: 0}
        if stage == ENCODE:
            hosted[ENCODE] = int(left / plan.cpus_per_encoder + EPS)
            if plan.gpus_per_encoder:
                hosted[ENCODE] = min(hosted[ENCODE], int(kind.gpus / plan.gpus_per_encoder + EPS))
            left -= hosted[ENCODE] * plan.cpus_per_encoder
        if stage == DECODE or (stage == ENCODE and not by_label and not plan.decode_selector):
            hosted[DECODE] = int(left / plan.cpus_per_decoder + EPS)  # GPU nodes only: they decode too
        count = objects if kind.max_workers is None else kind.max_workers
        decoders += hosted[DECODE] * count
        encoders += hosted[ENCODE] * count
    encoders = min(encoders, math.ceil(objects / options.batch_size))  # never more than batches
    max_decoders = min(max(decoders, plan.decoders), objects)
    max_encoders = max(encoders, plan.encoders)
    return replace(
        plan,  # a pool that cannot grow, or whose count was given, stays fixed (None)
        max_decoders=max_decoders if not options.decoders and max_decoders > plan.decoders else None,
        max_encoders=max_encoders if not options.encoders and max_encoders > plan.encoders else None,
    )


def _labelled(hosts: list[Node], key: str) -> tuple[list[int], list[int]] | None:
    """The hosts labelled ``key=encode`` and ``key=decode``, or None unless there are both."""
    encode = [i for i, node in enumerate(hosts) if key and node.labels.get(key) == ENCODE]
    decode = [i for i, node in enumerate(hosts) if key and node.labels.get(key) == DECODE]
    return (encode, decode) if encode and decode else None


def _gpu_plan(
    hosts: list[Node],
    labelled: tuple[list[int], list[int]] | None,
    gpus_per_encoder: float,
    options: EmbedOptions,
) -> StageResources:
    """GPU encoders on the GPU nodes, decoders on the others (on every node when all have GPUs); decoders
    that decode on a GPU (``--decode-device cuda``) on the GPU nodes, and only there."""
    on_gpus = options.decode_device == "cuda" and labelled is None
    if labelled is not None:
        encode, decode = labelled
    else:
        encode = [i for i, node in enumerate(hosts) if node.gpus >= gpus_per_encoder]
        if on_gpus:
            decode = [i for i, node in enumerate(hosts) if node.gpus > 0]
        else:
            decode = [i for i in range(len(hosts)) if i not in encode] or list(range(len(hosts)))
    slots = {i: int(hosts[i].gpus // gpus_per_encoder) for i in encode}
    if not any(slots.values()):
        raise ValueError(
            f"no node has the {gpus_per_encoder:g} GPUs an encoder asks (--gpus-per-encoder; "
            f"{max(node.gpus for node in hosts):g} at most): pass --gpus-per-encoder 0 to encode on CPUs"
        )
    # one CPU per encoder, less on a node too small for that; at most half a node the decoders share
    cpus = min(hosts[i].cpus / n / (2 if i in decode else 1) for i, n in slots.items() if n)
    encoders = options.encoders or sum(slots.values())
    plan = _with_decoders(
        hosts, encode, decode, slots, encoders, min(GPU_ENCODER_CPUS, cpus), gpus_per_encoder, options
    )
    if on_gpus:  # off every node without a GPU, not just the encoders' (they are among the decoders' here)
        plan = replace(plan, decode_selector=_avoiding(hosts, set(range(len(hosts))) - set(decode)))
    return plan


def _shared_cpu_plan(
    node: Node, options: EmbedOptions, timings: Callable[[], tuple[float, float]]
) -> StageResources:
    """One node's CPUs shared between the stages by one video's measured cost in each."""
    decode_s, encode_s = timings()
    log.info("one video: decode %.3f s, encode %.3f s (one thread)", decode_s, encode_s)
    encoders = options.encoders or 1
    shares = share_cpus(node.cpus, decode_s, encode_s, encoders, options.decoders, reserved=WRITE_CPUS)
    asked = shares.decoders * shares.cpus_per_decoder + encoders * shares.cpus_per_encoder
    # encoders keep half a CPU each: more than a small node has halves for are shrunk to fit
    scale = min(1.0, (node.cpus - WRITE_CPUS) / asked)
    return StageResources(
        shares.decoders, shares.cpus_per_decoder * scale, encoders, 0.0, shares.cpus_per_encoder * scale
    )


def _split_cpu_plan(
    hosts: list[Node],
    labelled: tuple[list[int], list[int]] | None,
    options: EmbedOptions,
    timings: Callable[[], tuple[float, float]],
) -> StageResources:
    """CPU encoders on some nodes, decoders on the others: the labelled ones, else ``m`` nodes of one size
    for the encoders, the split with the best modelled rate."""
    if labelled is not None:
        return _cpu_split(hosts, *labelled, options)
    splits = []
    for size in sorted({node.cpus for node in hosts}):
        same = [i for i, node in enumerate(hosts) if node.cpus == size]
        for m in range(1, len(same) + 1):
            encode = same[:m]
            if len(encode) < len(hosts):
                splits.append(
                    _cpu_split(hosts, encode, [i for i in range(len(hosts)) if i not in encode], options)
                )
    if len(splits) == 1:
        return splits[0]
    decode_s, encode_s = timings()
    log.info("one video: decode %.3f s, encode %.3f s (one thread)", decode_s, encode_s)
    return max(
        splits,
        key=lambda s: min(
            s.decoders * s.cpus_per_decoder / decode_s, s.encoders * s.cpus_per_encoder / encode_s
        ),
    )


def _cpu_split(
    hosts: list[Node], encode: list[int], decode: list[int], options: EmbedOptions
) -> StageResources:
    """CPU encoders on the ``encode`` nodes, ``k`` on the smallest (one unless ``options.encoders`` asks
    more), leaving the writer's room there; decoders on the ``decode`` nodes."""
    per_node = math.ceil(options.encoders / len(encode)) if options.encoders else 1
    cpus = (min(hosts[i].cpus for i in encode) - WRITE_CPUS) / per_node
    slots = {i: int(hosts[i].cpus / cpus + EPS) for i in encode}
    encoders = options.encoders or sum(slots.values())
    return _with_decoders(hosts, encode, decode, slots, encoders, cpus, 0.0, options)


def _with_decoders(
    hosts: list[Node],
    encode: list[int],
    decode: list[int],
    slots: dict[int, int],
    encoders: int,
    cpus_per_encoder: float,
    gpus_per_encoder: float,
    options: EmbedOptions,
) -> StageResources:
    """The plan with ``encoders`` filling the ``slots`` of the ``encode`` nodes in order, the writer's room
    on a node they leave it (else on the decode node with the most CPUs left) and decoders on the ``decode``
    nodes: one CPU each, or all that the largest has left when that is less; each stage kept off the nodes
    of the other only."""
    left = {i: node.cpus for i, node in enumerate(hosts)}
    unplaced = encoders
    for i in encode:
        placed = min(unplaced, slots[i])
        left[i] -= placed * cpus_per_encoder
        unplaced -= placed
    if not any(left[i] >= WRITE_CPUS - EPS for i in left if i not in decode):
        most = max(decode, key=left.get)
        left[most] -= WRITE_CPUS
    cpus_per_decoder = min(1.0, max(left[i] for i in decode))
    decoders = options.decoders or max(1, sum(int(left[i] / cpus_per_decoder + EPS) for i in decode))
    return StageResources(
        decoders,
        cpus_per_decoder,
        encoders,
        gpus_per_encoder,
        cpus_per_encoder,
        decode_selector=_avoiding(hosts, set(encode) - set(decode)),
        encode_selector=_avoiding(hosts, set(decode) - set(encode)),
    )


def _avoiding(hosts: list[Node], indices: set[int]) -> dict[str, str]:
    """A label selector of every node but ``hosts[indices]`` (new nodes included): by Ray's node-id label."""
    ids = sorted(hosts[i].node_id for i in indices)
    return {NODE_ID_LABEL: f"!in({','.join(ids)})"} if ids else {}
