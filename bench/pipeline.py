"""The embed pipeline against its own stages and against a plain loop: throughput measured in one run.

Usage: python bench/pipeline.py [--videos 200] [--distinct N] [--seconds 10] [--width 640 --height 360]
                                [--gop N] [--model PRESET_OR_DIR] [--batch-size 4] [--sampling exact|fast]
                                [--precision auto|fp32|bf16] [--rounds N] [--stage-videos N] [--no-ray]
                                [--workdir DIR]

Generates ``--videos`` real H.264 clips (moving shapes from ``pipeline.samples.synthetic``, 25 fps; cached in
the workdir, so re-runs reuse them) and a checkpoint (``--model``: a preset's geometry with seeded random
weights, default ``xclip-base-patch32``; ``videosearch-tiny``, the bundled model; or an existing checkpoint
directory). Then, one after the other in this process, it times:

  decode alone    ``DecodeVideos`` over every video (the first ``--stage-videos``), one video per call, in
                  this process
  encode alone    ``EncodeFrames`` over the pre-decoded frames, ``--batch-size`` videos per call, with torch's
                  default thread count, and again as the pipeline runs its encoder (its threads and lanes)
  pipeline        ``pipeline.embed.job.embed`` into a fresh library on a local Ray with the default plan;
                  Ray is started before the clock starts (``ray.init`` is timed and reported on its own);
                  then the same job on one video and a trivial Ray Data job of the same shape (start-up
                  floor); not with ``--no-ray`` (a machine without Ray: the lent GPU's)
  one video here  the one-video job in this process (``--executor in-process``, what ``auto`` runs for a
                  small job)
  plain loop      decord ``VideoReader`` + ``segment_frame_indices`` + ``VideoPreprocessor`` +
                  ``XCLIPModel.encode_videos``, one video at a time (the first ``--stage-videos``)
  in-process      the whole job in this process (``--executor in-process``: what ``auto`` runs when there
                  is no cluster to join for at most 64 objects, or any number on a machine of at most 4
                  CPUs), model load included

``--rounds N`` runs the plain loop and the in-process job N times each, alternating, and reports the best
run of each: their ratio is the goal these machines' drifts (10-40% over minutes) blur the most.

``--sampling fast`` runs the decode stage and both jobs with fast sampling, ``--precision bf16`` the encode
stage and both jobs in bfloat16 (the plain loop stays decord's exact sampling and float32 on CPUs: the
baseline). It prints videos/s and cores busy (CPU time / wall time of this process) for each, the ratios
pipeline / slowest stage alone (goal >= 0.85) and pipeline / plain loop (goal >= 1.3; 1.0 where encoding is
the slowest stage), on a machine without a GPU the CPU bound (cores / the two stages' CPU-seconds per video:
the most any schedule of them on these cores can reach, start-up excluded) and the best whole-job ratios it
allows after Ray Data's start-up floor, the driver's peak RSS (getrusage), the Ray workers' peak RSS (psutil,
sampled during the pipeline run; RSS counts the object-store pages a worker touched, so the sum double-counts
those), and the machine: cores, torch threads, load average before and after (other processes skew every
figure alike). Stage and loop figures exclude model loading (reported separately); the pipeline figure
includes everything its job does after Ray is up (model check and hash in the driver, actor start-up and model
load, indexing).
"""

from __future__ import annotations

import argparse
import functools
import logging
import os
import resource
import shutil
import sys
import tempfile
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline.embed.job import embed  # noqa: E402
from pipeline.embed.options import SAMPLINGS, EmbedOptions  # noqa: E402
from pipeline.embed.stages.decode import DecodeSettings, DecodeVideos  # noqa: E402
from pipeline.embed.stages.encode import EncodeFrames, compute_dtype  # noqa: E402
from pipeline.embed.stages.list import list_objects  # noqa: E402
from pipeline.flags import PRECISIONS  # noqa: E402
from pipeline.models import BUNDLED, default_model_source, load_model  # noqa: E402
from pipeline.samples.synthetic import Scene, all_shapes, sample_scenes, write_clip  # noqa: E402
from xclip_core import XCLIPModel  # noqa: E402
from xclip_core.config import preset  # noqa: E402
from xclip_core.processor import XCLIPProcessor  # noqa: E402
from xclip_core.sampling import segment_frame_indices  # noqa: E402
from xclip_core.tokenizer import CLIPTokenizer  # noqa: E402
from xclip_core.video_transforms import VideoPreprocessor  # noqa: E402

FPS = 25
SEED = 0
RSS_SAMPLE_S = 0.2  # how often the Ray workers' memory is sampled during the pipeline run


@dataclass
class Result:
    """One timed measurement: ``videos`` processed in ``seconds``; ``cpu_seconds`` the CPU time this process
    spent meanwhile (all its threads; None where the work ran in other processes); ``peak_rss_mib`` is the
    driver's peak RSS at its end (cumulative over the run so far), ``load`` the 1-minute load average then."""

    name: str
    videos: int
    seconds: float
    detail: str = ""
    cpu_seconds: float | None = None
    peak_rss_mib: float = field(default_factory=lambda: driver_peak_rss_mib())
    load: float = field(default_factory=lambda: os.getloadavg()[0])

    @property
    def rate(self) -> float:
        return self.videos / self.seconds


def steady_rate(result: Result, one_video_s: float) -> float | None:
    """Videos/s once a job runs: the extra videos over the extra time of the N-video job against the same
    job on one video."""
    extra_s = result.seconds - one_video_s
    return (result.videos - 1) / extra_s if result.videos > 1 and extra_s > 0 else None


def driver_peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


# ------------------------------------------------------------------------------------------------ inputs
def make_videos(
    workdir: Path,
    count: int,
    seconds: float,
    width: int,
    height: int,
    distinct: int | None = None,
    gop: int | None = None,
) -> list[Path]:
    """``count`` cached H.264 clips of moving shapes, of which ``distinct`` (all by default) are different
    files and the rest repeat them, a keyframe every ``gop`` frames (x264's default, 250, if None); only the
    missing ones are written, on every core."""
    cache = workdir / (f"videos-{width}x{height}-{seconds:g}s-{FPS}fps" + (f"-gop{gop}" if gop else ""))
    cache.mkdir(parents=True, exist_ok=True)
    distinct = min(count, distinct or count)
    scenes = sample_scenes(min(distinct, len(all_shapes())), seed=SEED, max_shapes=2)
    paths = [cache / f"clip-{i:04d}.mp4" for i in range(distinct)]
    missing = [(path, scenes[i % len(scenes)]) for i, path in enumerate(paths) if not path.exists()]
    if missing:
        started = time.perf_counter()
        with ProcessPoolExecutor(os.cpu_count()) as pool:
            write = functools.partial(
                write_clip_atomically, seconds=seconds, width=width, height=height, gop=gop
            )
            list(pool.map(write, *zip(*missing, strict=True)))  # re-raises what a writer raised
        print(f"wrote {len(missing)} videos to {cache} in {time.perf_counter() - started:.0f} s", flush=True)
    return [paths[i % distinct] for i in range(count)]


def write_clip_atomically(
    path: Path, scene: Scene, seconds: float, width: int, height: int, gop: int | None
) -> None:
    """One clip, written under a temporary name and renamed: an interrupted run leaves no partial clip."""
    partial = path.with_suffix(f".tmp-{os.getpid()}.mp4")
    write_clip(partial, scene, seconds=seconds, fps=FPS, width=width, height=height, gop=gop)
    partial.replace(path)


def make_source(source: Path, videos: list[Path]) -> Path:
    """A directory holding exactly these videos (hard links into the cache, one name per position in the
    list: a repeated clip is listed as another video), for the pipeline to list."""
    source.mkdir(parents=True)
    for i, path in enumerate(videos):
        os.link(path, source / f"video-{i:05d}{path.suffix}")
    return source


def make_checkpoint(workdir: Path, model: str) -> str:
    """A checkpoint directory: ``model`` itself if it is one, the bundled model's by its name, else the
    preset with seeded random weights."""
    if Path(model).is_dir():
        return model
    if model == BUNDLED:
        return default_model_source()
    config = preset(model)
    target = workdir / "models" / f"{model.removeprefix('microsoft/')}-random-{SEED}"
    if not (target / "model.safetensors").exists():
        torch.manual_seed(SEED)
        staging = target.with_name(f"{target.name}.tmp-{os.getpid()}")
        XCLIPModel(config).save_pretrained(staging)
        size = config.vision_config.image_size
        processor = XCLIPProcessor(
            CLIPTokenizer.from_pretrained(), VideoPreprocessor(size=size, crop_size=size)
        )
        processor.save_pretrained(staging)
        staging.replace(target)
    return str(target)


# ---------------------------------------------------------------------------------------- measurements
def measure_decode(source: Path, model_dir: str, sampling: str) -> tuple[Result, list[np.ndarray]]:
    """The decode stage alone: ``DecodeVideos`` on one listed video per call (as the plan batches it)."""
    model = load_model(model_dir)
    decoder = DecodeVideos(DecodeSettings(model.num_frames, model.preprocessor, sampling=sampling))
    listed = list_objects(str(source))
    frames = []
    started, cpu = time.perf_counter(), time.process_time()
    for row in listed:
        out = decoder.decode({name: np.array([value], dtype=object) for name, value in row.items()})
        if out["error"][0] is not None:
            raise RuntimeError(f"decoding {row['uri']} failed: {out['error'][0]}")
        frames.append(out["frames"][0])
    seconds, cpu = time.perf_counter() - started, time.process_time() - cpu
    resize = "FFmpeg's scaler" if sampling == "fast" else "Pillow"
    detail = f"PyAV, one thread, {sampling} sampling, {resize} resize"
    return Result("decode stage alone", len(listed), seconds, detail, cpu), frames


def measure_encode(
    frames: list[np.ndarray], job: EmbedOptions, threads: int | None, lanes: int = 1
) -> Result:
    """The encode stage alone as ``job`` runs it: ``EncodeFrames`` on the pre-decoded frames, ``batch_size``
    videos per lane and call, in its precision, after one untimed warm-up call. ``threads`` None keeps torch's
    current thread count; ``lanes``: sub-batches side by side, ``threads / lanes`` torch threads each."""
    previous, batch_size = torch.get_num_threads(), job.batch_size * lanes
    started = time.perf_counter()
    encoder = EncodeFrames(
        job.model, batch_size=job.batch_size, threads=threads, precision=job.precision, lanes=lanes
    )
    load_s = time.perf_counter() - started
    try:
        used = torch.get_num_threads()

        def batch(start: int) -> dict[str, np.ndarray]:
            chunk = frames[start : start + batch_size]
            return {"error": np.full(len(chunk), None, dtype=object), "frames": np.stack(chunk)}

        encoder(batch(0))  # warm-up
        started, cpu = time.perf_counter(), time.process_time()
        for start in range(0, len(frames), batch_size):
            encoder(batch(start))
        seconds, cpu = time.perf_counter() - started, time.process_time() - cpu
    finally:
        torch.set_num_threads(previous)
    plural = "s" * (used > 1)
    in_lanes = f" in {lanes} lanes" if lanes > 1 else ""
    name = "encode stage alone" if threads is None else f"encode alone, {threads} thread{'s' * (threads > 1)}"
    name += in_lanes
    each = " each" * (lanes > 1)
    detail = (
        f"{encoder.device.type}, batch {job.batch_size}{in_lanes}, torch {used} thread{plural}{each}; "
        f"model load {load_s:.1f} s"
    )
    return Result(name, len(frames), seconds, detail, cpu)


class WorkerUsage:
    """Samples this driver's child processes in a background thread: the RSS of its Ray workers (titled
    ``ray::...``; each worker's peak under its most specific title, and the peak of their sum), and the CPU
    time of every child (workers, raylet, GCS...) spent while sampling, with the machine's busy CPU time."""

    def __init__(self, interval_s: float = RSS_SAMPLE_S):
        import psutil

        self.psutil, self.interval_s = psutil, interval_s
        self.peaks: dict[int, tuple[str, float]] = {}  # pid -> (title, peak RSS MiB)
        self.peak_sum_mib = 0.0
        self.cpu: dict[int, tuple[str, float, float]] = {}  # pid -> (title, CPU s at first sight, latest)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> WorkerUsage:
        self._started = time.time()
        self._machine = self._machine_busy_s()
        self._driver = time.process_time()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.driver_cpu_s = time.process_time() - self._driver
        self.machine_busy_s = self._machine_busy_s() - self._machine

    def _machine_busy_s(self) -> float:
        times = self.psutil.cpu_times()
        return sum(times) - times.idle - getattr(times, "iowait", 0.0)

    def _run(self) -> None:
        me = self.psutil.Process()
        while not self._stop.wait(self.interval_s):
            total = 0.0
            for proc in me.children(recursive=True):
                try:
                    title = (proc.cmdline() or [""])[0]
                    rss = proc.memory_info().rss / 2**20
                    cpu = sum(proc.cpu_times()[:2])
                    born_during = proc.create_time() >= self._started
                except self.psutil.Error:
                    continue
                short = title.removeprefix("ray::") if title.startswith("ray::") else Path(title).name
                old_title, first, _ = self.cpu.get(proc.pid, (short, 0.0 if born_during else cpu, 0.0))
                self.cpu[proc.pid] = (short if short != "IDLE" else old_title, first, cpu)
                if not title.startswith("ray::") or "Agent" in title:  # Ray's own agents are not workers
                    continue
                total += rss
                old_title, old_rss = self.peaks.get(proc.pid, ("ray::IDLE", 0.0))
                self.peaks[proc.pid] = (title if title != "ray::IDLE" else old_title, max(rss, old_rss))
            self.peak_sum_mib = max(self.peak_sum_mib, total)

    def report(self) -> list[str]:
        rows = sorted(self.peaks.values(), key=lambda item: -item[1])
        return [f"{rss:7.0f} MiB  {title.removeprefix('ray::')[:80]}" for title, rss in rows]

    def cpu_by_title(self) -> dict[str, float]:
        """CPU seconds spent while sampling, per process title (the driver as ``driver``)."""
        spent = {"driver": self.driver_cpu_s}
        for title, first, latest in self.cpu.values():
            spent[title[:60]] = spent.get(title[:60], 0.0) + latest - first
        return dict(sorted(spent.items(), key=lambda item: -item[1]))


@dataclass
class PipelineRun:
    result: Result
    ray_init_s: float
    summary_s: float  # the job's own timer (EmbedSummary.seconds)
    one_video_s: float  # the same job on one video, Ray up: the job's fixed cost plus one video
    plan: logging.LogRecord | None  # the embed job's "plan: ..." record (encoder_threads, encoder_lanes)
    workers: WorkerUsage
    floor_s: float  # a trivial Ray Data job of the pipeline's shape on one row: start-up no job avoids

    @property
    def steady_rate(self) -> float | None:
        """Videos/s once the job runs on Ray (:func:`steady_rate`)."""
        return steady_rate(self.result, self.one_video_s)

    @property
    def encoder_threads(self) -> int | None:
        """The torch threads the embed job gives a CPU encoder in all (its lanes share them); None for GPU
        encoders."""
        return getattr(self.plan, "encoder_threads", None)

    @property
    def encoder_lanes(self) -> int:
        """The sub-batches the embed job's encoder encodes side by side."""
        return getattr(self.plan, "encoder_lanes", 1)


def measure_pipeline(run_dir: Path, videos: list[Path], job: EmbedOptions) -> PipelineRun:
    """The whole job: ``embed`` on a local Ray that is started (and timed) before the clock starts; then the
    same job on one video (after, so that its start-up is the warmer one: its cost is not overstated)."""
    import ray
    import ray.data

    ray.data.DataContext.get_current().enable_progress_bars = False
    plan_log = _capture_log("pipeline.embed.on_ray")
    options = replace(job, executor="ray")
    started = time.perf_counter()
    ray.init(address="local", include_dashboard=False, configure_logging=False, log_to_driver=True)
    ray_init_s = time.perf_counter() - started
    try:
        with WorkerUsage() as workers:
            started = time.perf_counter()
            summary = embed(str(make_source(run_dir / "all", videos)), str(run_dir / "library"), options)
            seconds = time.perf_counter() - started
        one = str(make_source(run_dir / "one", videos[:1]))
        started = time.perf_counter()
        embed(one, str(run_dir / "library-one"), options)
        one_video_s = time.perf_counter() - started
        floor_s = measure_ray_data_floor()
    finally:
        ray.shutdown()
    if summary.ok != summary.objects:
        raise RuntimeError(f"the pipeline did not embed every video:\n{summary.text()}")
    plan = next((r for r in plan_log if r.msg.startswith("plan:")), None)
    result = Result("full Ray pipeline", summary.objects, seconds, "embed() wall time, Ray already up")
    return PipelineRun(result, ray_init_s, summary.seconds, one_video_s, plan, workers, floor_s)


def measure_one_video_here(run_dir: Path, videos: list[Path], job: EmbedOptions) -> float:
    """Seconds of the one-video job in this process (what ``--executor auto`` runs for a small job)."""
    one = str(make_source(run_dir / "one-here", videos[:1]))
    started = time.perf_counter()
    embed(one, str(run_dir / "library-one-here"), replace(job, executor="in-process"))
    return time.perf_counter() - started


class _ImportsStageModules:
    """An actor that does nothing but import what the pipeline's actors import."""

    def __init__(self) -> None:
        import av  # noqa: F401
        import torch  # noqa: F401

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return batch


def _pass(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return batch


def measure_ray_data_floor() -> float:
    """Seconds of a job shaped like the pipeline (two one-actor pools whose actors import torch and PyAV,
    then a task) on one row that none of them works on, Ray already up: the start-up that no job avoids."""
    import ray.data

    started = time.perf_counter()
    ds = ray.data.from_items([{"row": 0}])
    for _ in range(2):
        pool = ray.data.ActorPoolStrategy(size=1)
        ds = ds.map_batches(_ImportsStageModules, batch_size=1, compute=pool, num_cpus=0.5)
    ds.map_batches(_pass, num_cpus=0.1).take_all()
    return time.perf_counter() - started


def measure_plain_loop(videos: list[Path], model_dir: str) -> Result:
    """One process, one video at a time: decord, X-CLIP sampling and preprocessing, ``encode_videos``
    (embedding + prompt features, the pipeline's work). One untimed warm-up video first."""
    import decord

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = compute_dtype(device)
    model = load_model(model_dir, dtype=dtype, device=device)
    preprocessor, num_frames = model.preprocessor, model.num_frames

    @torch.inference_mode()
    def embed_one(path: Path) -> np.ndarray:
        reader = decord.VideoReader(str(path))
        frames = reader.get_batch(segment_frame_indices(len(reader), num_frames)).asnumpy()
        pixels = preprocessor(frames)["pixel_values"].to(device, dtype)
        embedding, rerank = model.encode_videos(pixels)
        rerank.to(torch.float16).cpu()
        return torch.nn.functional.normalize(embedding.float(), dim=-1).cpu().numpy()

    embed_one(videos[0])  # warm-up
    started, cpu = time.perf_counter(), time.process_time()
    for path in videos:
        embed_one(path)
    seconds, cpu = time.perf_counter() - started, time.process_time() - cpu
    detail = f"decord + preprocessor + encode_videos, {device.type}, torch {torch.get_num_threads()} threads"
    return Result("plain loop", len(videos), seconds, detail, cpu)


def measure_in_process(run_dir: Path, videos: list[Path], job: EmbedOptions, round_: int = 0) -> Result:
    """The whole job in this process (``--executor in-process``, what ``auto`` runs with no cluster to join
    for at most 64 objects, or any number on a machine of at most 4 CPUs): model load and hash, decoding a
    few batches ahead (threads for a small change set, else decoder processes: their CPU time counts too),
    encoding, writing, indexing, publishing. Each ``round_`` embeds into a library of its own."""
    options = replace(job, executor="in-process")
    source = str(make_source(run_dir / f"in-process-{round_}", videos))
    started, cpu = time.perf_counter(), time.process_time() + _children_cpu_s()
    summary = embed(source, str(run_dir / f"library-in-process-{round_}"), options)
    seconds = time.perf_counter() - started
    cpu = time.process_time() + _children_cpu_s() - cpu
    if summary.ok != summary.objects:
        raise RuntimeError(f"the in-process job did not embed every video:\n{summary.text()}")
    decoders = ", ".join(f"{count} {name}" for name, count in summary.placement["decode"].items())
    return Result("whole job in this process", len(videos), seconds, f"decoders: {decoders}", cpu)


def _children_cpu_s() -> float:
    """CPU-seconds of this process's children that ended (the decoder processes, once the job closed them)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _capture_log(name: str) -> list[logging.LogRecord]:
    """The INFO records that logger ``name`` will emit from now on (kept, not printed)."""
    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.INFO)
    handler.emit = records.append  # type: ignore[method-assign]
    logger = logging.getLogger(name)
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    return records


# ------------------------------------------------------------------------------------------------ report
def print_report(
    args: argparse.Namespace,
    stages: list[Result],
    pipeline: PipelineRun | None,
    plain: Result,
    here: Result,
    one_video_here_s: float,
    load: tuple[float, float],
) -> None:
    """The figures and their ratios; ``pipeline`` None where the in-process job ran alone (``--no-ray``)."""
    cores, usable, threads = os.cpu_count(), len(os.sched_getaffinity(0)), torch.get_num_threads()
    cuda = "yes" if torch.cuda.is_available() else "no"
    print(
        f"\nmachine: {cores} cores ({usable} usable), torch {torch.__version__} with {threads} threads by "
        f"default, CUDA {cuda}; load average {load[0]:.2f} before, {load[1]:.2f} after"
    )
    model = args.model if args.model == args.checkpoint else f"{args.model} ({args.checkpoint})"
    print(
        f"input: {args.videos} H.264 videos ({min(args.distinct or args.videos, args.videos)} distinct), "
        f"{args.seconds:g} s {args.width}x{args.height} at {FPS} fps, a keyframe every {args.gop or 250} "
        f"frames; model {model}, {load_model(args.checkpoint).num_frames} frames per video, "
        f"batch size {args.batch_size}, {args.sampling} sampling, {args.precision} precision"
    )
    if pipeline is not None:
        print(pipeline.plan.getMessage() if pipeline.plan else "plan: (not logged)")
    run = pipeline.result if pipeline is not None else None
    for r in [*stages, *([run] if run else []), plain, here]:
        busy = f"{r.cpu_seconds / r.seconds:4.2f}" if r.cpu_seconds is not None else " n/a"
        print(
            f"  {r.name:26s} {r.rate:8.2f} videos/s   {r.videos} in {r.seconds:6.1f} s   cores busy {busy}   "
            f"load {r.load:4.1f}   driver peak RSS {r.peak_rss_mib:5.0f} MiB   ({r.detail})"
        )
    steady = pipeline.steady_rate if pipeline is not None else None
    if pipeline is not None:
        with_init = run.videos / (run.seconds + pipeline.ray_init_s)
        print(
            f"  {'pipeline incl. ray.init':26s} {with_init:8.2f} videos/s   ray.init "
            f"{pipeline.ray_init_s:.1f} s; the job's own summary: {pipeline.summary_s:.1f} s"
        )
        print(
            f"  {'pipeline once running':26s} "
            + (f"{steady:8.2f} videos/s" if steady else "     n/a")
            + f"   (N-1) / (T_N - T_1): the same job on 1 video took {pipeline.one_video_s:.1f} s"
        )
    steady_here = steady_rate(here, one_video_here_s)
    print(
        f"  {'in this process, running':26s} "
        + (f"{steady_here:8.2f} videos/s" if steady_here else "     n/a")
        + f"   (N-1) / (T_N - T_1): the same job on 1 video took {one_video_here_s:.1f} s"
    )

    standard = [r for r in stages if not r.name.startswith("encode alone,")]
    slowest = min(standard, key=lambda r: r.rate)
    print("ratios:")
    with_start_up = " (start-up included)"
    # issue 20: where encoding dominates (base-patch32 on CPUs) the job must not lose to the loop, which
    # encodes with the same model; where decoding does (the bundled model), it must beat it by 1.3x
    over_loop = 1.0 if slowest.name.startswith("encode") else 1.3
    ratios = [
        ("whole job in this process / plain loop", here.rate / plain.rate, over_loop, with_start_up),
        ("whole job in this process / slowest stage alone", here.rate / slowest.rate, 0.85, with_start_up),
    ]
    if run is not None:
        ratios = [
            (
                f"pipeline / slowest stage alone ({slowest.name.split()[0]})",
                run.rate / slowest.rate,
                0.85,
                "",
            ),
            ("pipeline / plain loop", run.rate / plain.rate, over_loop, ""),
            *ratios,
        ]
    for label, value, goal, note in ratios:
        verdict = "met" if value >= goal else "MISSED"
        print(f"  {label:48s} {value:5.2f}   goal >= {goal}: {verdict}{note}")
    for r in stages:
        if r.name.startswith("encode alone,") and run is not None:
            print(
                f"  {'pipeline / ' + r.name:48s} {run.rate / r.rate:5.2f}   (the pipeline encoder's threads)"
            )
    if steady:
        print(f"  {'pipeline once running / slowest stage alone':48s} {steady / slowest.rate:5.2f}")
    if steady_here:
        print(f"  {'in this process, running / slowest stage alone':48s} {steady_here / slowest.rate:5.2f}")
    floor_s = pipeline.floor_s if pipeline is not None else None
    print_cpu_bound(standard, run, steady, plain, slowest, floor_s, here, steady_here)
    if pipeline is None:
        print(f"  one-video job in this process (--executor auto's choice): {one_video_here_s:.1f} s")
        return
    start_up = one_video_here_s / (pipeline.floor_s + 3)
    print(
        f"  one-video job in this process (--executor auto's choice): {one_video_here_s:.1f} s; "
        f"/ (Ray Data floor + 3 s) = {start_up:.2f}   goal <= 1: {'met' if start_up <= 1 else 'MISSED'}"
        f"   (on Ray: {pipeline.one_video_s:.1f} s)"
    )

    cpu = pipeline.workers.cpu_by_title()
    total = sum(cpu.values())
    busy = pipeline.workers.machine_busy_s / run.seconds
    print(
        f"CPU time during the pipeline: the machine was busy {busy:.2f} cores on average; this driver and "
        f"its children spent {total:.1f} CPU-s "
        f"({total / run.videos:.3f} per video):"
    )
    for title, seconds in cpu.items():
        if seconds >= 0.1:
            print(f"    {seconds:7.1f} s  {title}")
    print(f"memory: driver peak RSS {driver_peak_rss_mib():.0f} MiB over the whole run (getrusage)")
    print(
        f"  Ray workers' peak RSS (psutil every {RSS_SAMPLE_S} s), peak of their sum "
        f"{pipeline.workers.peak_sum_mib:.0f} MiB:"
    )
    for line in pipeline.workers.report():
        print(f"    {line}")


def print_cpu_bound(
    stages: list[Result],
    run: Result | None,
    steady: float | None,
    plain: Result,
    slowest: Result,
    floor_s: float | None,
    here: Result,
    steady_here: float | None,
) -> None:
    """Where decoding and encoding share the same cores (no GPU), no schedule beats cores / (CPU-seconds
    per video of both stages): print that bound, the figures against it (the Ray pipeline's, where ``run``,
    and the whole job in this process's, its CPU-seconds per video against the stages'), and the best
    whole-job ratios any Ray Data job could reach: this many videos at the bound after Ray Data's start-up
    floor (``floor_s``)."""
    if torch.cuda.is_available() or any(r.cpu_seconds is None for r in stages):
        return
    cores = len(os.sched_getaffinity(0))
    per_video = {r.name.split()[0]: r.cpu_seconds / r.videos for r in stages}
    bound = cores / sum(per_video.values())
    spent = " + ".join(f"{name} {seconds:.3f}" for name, seconds in per_video.items())
    print(
        f"CPU bound: both stages share {cores} cores, so no schedule exceeds cores / CPU-seconds per video "
        f"({spent}) = {bound:.2f} videos/s,\n  i.e. {bound / slowest.rate:.2f} x slowest stage alone and "
        f"{bound / plain.rate:.2f} x the plain loop; "
        + (f"the pipeline reaches {run.rate / bound:.2f} of it" if run is not None else "")
        + (f" ({steady / bound:.2f} once running)" if steady else "")
        + (", " if run is not None else "")
        + f"the whole job in this process {here.rate / bound:.2f}"
    )
    if steady_here:
        verdict = "met" if steady_here / bound >= 0.85 else "MISSED"
        print(
            f"  the job in this process once running: {steady_here / bound:.2f} of it "
            f"(goal >= 0.85: {verdict})"
        )
    if here.cpu_seconds is not None:
        spent_here = here.cpu_seconds / here.videos
        ratio = spent_here / sum(per_video.values())
        print(
            f"  whole job in this process: {spent_here:.3f} CPU-s per video, {ratio:.2f} x the two stages "
            f"alone (goal <= 1.3: {'met' if ratio <= 1.3 else 'MISSED'})"
        )
    if run is None or floor_s is None:
        return
    best = run.videos / (floor_s + run.videos / bound)
    print(
        f"  Ray Data start-up floor (a trivial job of the same shape, one row): {floor_s:.1f} s; at the "
        f"bound after it, {run.videos} videos run at {best:.2f} videos/s at best: "
        f"{best / slowest.rate:.2f} x slowest stage alone, {best / plain.rate:.2f} x the plain loop"
    )


def _progress(result: Result) -> Result:
    print(f"{result.name}: {result.rate:.2f} videos/s", flush=True)
    return result


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--videos", type=int, default=200)
    parser.add_argument(
        "--distinct",
        type=int,
        help="different clips written (default: --videos); the others repeat them, for large runs without"
        " the wait for writing them",
    )
    parser.add_argument("--seconds", type=float, default=10.0, help="length of each video")
    parser.add_argument("--width", type=int, default=640)
    parser.add_argument("--height", type=int, default=360)
    parser.add_argument(
        "--gop", type=int, help="frames between keyframes (default: x264's, 250; streaming encoders use ~2 s)"
    )
    parser.add_argument(
        "--model",
        default="xclip-base-patch32",
        help=f"a preset name (random weights), {BUNDLED} (the bundled model) or a checkpoint dir",
    )
    parser.add_argument("--batch-size", type=int, default=4, help="videos per encoder call")
    parser.add_argument(
        "--sampling",
        choices=SAMPLINGS,
        default="exact",
        help="the decode stage's and the jobs' sampling (the plain loop samples exactly, with decord)",
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="runs of the plain loop and the in-process job, alternating; the best of each is reported",
    )
    parser.add_argument(
        "--precision",
        choices=PRECISIONS,
        default="auto",
        help="the encode stage's and the jobs' precision (the plain loop runs float32 on CPUs: the baseline)",
    )
    parser.add_argument(
        "--stage-videos",
        type=int,
        help="videos that the stages alone and the plain loop run (default: all); the jobs run every one",
    )
    parser.add_argument(
        "--no-ray",
        action="store_true",
        help="no Ray pipeline: the job in this process alone (--executor in-process) against stages and loop",
    )
    parser.add_argument(
        "--workdir",
        type=Path,
        default=Path(tempfile.gettempdir()) / "videosearch-bench-pipeline",
        help="where videos and checkpoints are cached",
    )
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    if args.width % 2 or args.height % 2:
        raise SystemExit("--width and --height must be even (H.264 in yuv420p)")
    load_before = os.getloadavg()[0]
    args.workdir.mkdir(parents=True, exist_ok=True)
    videos = make_videos(
        args.workdir, args.videos, args.seconds, args.width, args.height, args.distinct, args.gop
    )
    args.checkpoint = make_checkpoint(args.workdir, args.model)
    run_dir = args.workdir / f"run-{os.getpid()}"
    # the stages alone and the plain loop on the first --stage-videos: their rates are per video
    alone = videos[: args.stage_videos or len(videos)]
    try:
        source = make_source(run_dir / "videos", alone)
        job = EmbedOptions(
            model=args.checkpoint,
            batch_size=args.batch_size,
            sampling=args.sampling,
            precision=args.precision,
        )
        decode, frames = measure_decode(source, args.checkpoint, args.sampling)
        _progress(decode)
        stages = [decode, _progress(measure_encode(frames, job, threads=None))]
        pipeline = None if args.no_ray else measure_pipeline(run_dir, videos, job)
        if pipeline is not None:
            _progress(pipeline.result)
        one_video_here_s = measure_one_video_here(run_dir, videos, job)
        plains, heres = [], []
        for round_ in range(args.rounds):  # alternating, so that the machine's drifts fall on both alike
            plains.append(_progress(measure_plain_loop(alone, args.checkpoint)))
            heres.append(_progress(measure_in_process(run_dir, videos, job, round_)))
        plain, here = (max(results, key=lambda r: r.rate) for results in (plains, heres))
        threads = pipeline.encoder_threads if pipeline is not None else None
        lanes = pipeline.encoder_lanes if pipeline is not None else 1
        # the encoder again as the pipeline runs it, where that differs: its threads, its lanes
        if threads is not None and (threads != torch.get_num_threads() or lanes > 1):
            stages.append(_progress(measure_encode(frames, job, threads, lanes)))
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)
    print_report(args, stages, pipeline, plain, here, one_video_here_s, (load_before, os.getloadavg()[0]))


if __name__ == "__main__":
    main()
