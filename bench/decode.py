"""Decoding one video into model frames, one thread, side by side: decord, our exact sampling, our fast one.
And how much fast sampling changes retrieval.

Usage: python bench/decode.py [--videos 24] [--seconds 10] [--width 640 --height 360] [--fps 25] [--gop 50]
                              [--model DIR] [--workdir DIR] [--nvdec]

Writes ``--videos`` captioned synthetic clips (``pipeline.samples.synthetic``: moving shapes; H.264, a
keyframe every ``--gop`` frames, as streaming encoders put one every 2 s; cached in the workdir), then, in
this process with one thread (torch and FFmpeg), the CPU-seconds per video of:

  decord     ``VideoReader(num_threads=1).get_batch`` of X-CLIP's frame indices, then Pillow's resize and
             centre crop per frame (``resize_center_crop``): the baseline
  exact      ``decode_video`` with exact sampling (the embed job's decode stage: ranged reads, seeking,
             unreferenced frames skipped, the frames shown at X-CLIP's times)
  fast       ``decode_video`` with ``sampling="fast"``: the cheapest frames within half a sampling interval

and, with ``--nvdec`` (an NVIDIA GPU), both samplings decoded on the GPU's video decoder (``device="cuda"``),
whose frames are compared with the CPU's; for these the wall-clock seconds per video are printed beside the
CPU-seconds (NVDEC's own work is not CPU time).

Printed: the CPU efficiency of each against decord (goals: exact >= 1.15x, fast >= 3x), fast's recorded time
errors, and then what fast sampling does to retrieval with ``--model`` (default: the bundled model, which
knows the synthetic world): every clip's caption as a query against every clip, ranked by the cosine of the
embeddings from exact frames and from fast frames: the mean Spearman rank correlation of the two rankings per
query, and recall@1 of the right clip under each (``bench/retrieval.py``).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import av
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from retrieval import agreement  # noqa: E402  (bench/, this script's directory)

from pipeline.embed.stages.decode import (  # noqa: E402
    DecodeSettings,
    decode_video,
    nvdec_decodes,
    open_cuda_decoder,
)
from pipeline.models import load_model  # noqa: E402
from pipeline.samples.synthetic import render, sample_scenes  # noqa: E402
from xclip_core.sampling import segment_frame_indices  # noqa: E402
from xclip_core.video_transforms import resize_center_crop  # noqa: E402


def write_clips(directory: Path, args: argparse.Namespace) -> list[tuple[Path, str]]:
    """``--videos`` clips and their captions (cached by their parameters)."""
    directory.mkdir(parents=True, exist_ok=True)
    clips = []
    for i, scene in enumerate(sample_scenes(args.videos, seed=11, max_shapes=2)):
        path = directory / f"clip-{i:04d}.mp4"
        if not path.exists():
            frames = render(scene, round(args.seconds * args.fps), args.width, args.height)
            with av.open(str(path), "w") as container:
                stream = container.add_stream("libx264", rate=args.fps)
                stream.width, stream.height, stream.pix_fmt = args.width, args.height, "yuv420p"
                stream.codec_context.gop_size = args.gop
                for frame in frames:
                    container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
                container.mux(stream.encode())
        clips.append((path, scene.caption))
    return clips


def with_decord(path: Path, settings: DecodeSettings) -> np.ndarray:
    import decord

    reader = decord.VideoReader(str(path), num_threads=1)
    frames = reader.get_batch(segment_frame_indices(len(reader), settings.num_frames)).asnumpy()
    pre = settings.preprocessor
    return resize_center_crop(frames, pre.size, pre.crop_size)


def interleaved_cpu_seconds(
    decoders: dict[str, Callable], paths: list[Path]
) -> dict[str, tuple[float, list]]:
    """CPU-seconds per video of each of ``decoders`` over ``paths`` (after one warm-up each), and its outputs.
    The decoders take turns on each video, so that this machine's drifts in speed (up to 40% between
    back-to-back runs of a few seconds) fall on all of them alike instead of on whichever ran then."""
    spent = dict.fromkeys(decoders, 0.0)
    outputs: dict[str, list] = {name: [] for name in decoders}
    for decode in decoders.values():
        decode(paths[0])
    for path in paths:
        for name, decode in decoders.items():
            started = time.process_time()
            outputs[name].append(decode(path))
            spent[name] += time.process_time() - started
    return {name: (spent[name] / len(paths), outputs[name]) for name in decoders}


def timed(decode, paths: list[Path]) -> tuple[float, float, list]:
    """CPU-seconds and wall-clock seconds per video of ``decode`` over ``paths`` (after one warm-up), and
    its outputs."""
    decode(paths[0])
    started, wall = time.process_time(), time.perf_counter()
    outputs = [decode(path) for path in paths]
    return (time.process_time() - started) / len(paths), (time.perf_counter() - wall) / len(paths), outputs


def clip_flags(parser: argparse.ArgumentParser) -> None:
    """The flags of the captioned clips (and ``--model``), as this benchmark and ``bench/precision.py`` take
    them."""
    parser.add_argument("--videos", type=int, default=24)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--width", type=int, default=640)
    parser.add_argument("--height", type=int, default=360)
    parser.add_argument("--fps", type=int, default=25)
    parser.add_argument(
        "--gop", type=int, default=50, help="frames between keyframes (default 2 s at 25 fps)"
    )
    parser.add_argument("--model", help="checkpoint (default: the bundled model)")
    parser.add_argument(
        "--workdir", type=Path, default=Path(tempfile.gettempdir()) / "videosearch-bench-decode"
    )


def cached_clips(args: argparse.Namespace) -> list[tuple[Path, str]]:
    """The clips :func:`clip_flags` describe and their captions, written once into the workdir."""
    name = f"clips-{args.videos}-{args.seconds:g}s-{args.width}x{args.height}-{args.fps}fps-gop{args.gop}"
    return write_clips(args.workdir / name, args)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    clip_flags(parser)
    parser.add_argument("--nvdec", action="store_true", help="also decode on the GPU (NVDEC)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    os.environ["OMP_NUM_THREADS"] = "1"
    clips = cached_clips(args)
    paths = [path for path, _ in clips]
    model = load_model(args.model).eval()
    exact = DecodeSettings(model.num_frames, model.preprocessor)
    fast = DecodeSettings(model.num_frames, model.preprocessor, sampling="fast")

    measured = interleaved_cpu_seconds(
        {
            "decord": lambda p: with_decord(p, exact),
            "exact": lambda p: decode_video(p, exact)[0],
            "fast": lambda p: decode_video(p, fast)[0],
        },
        paths,
    )
    (decord_s, _), (exact_s, exact_rows), (fast_s, fast_rows) = measured.values()
    errors = np.array([row["sample_error_s"] for row in fast_rows])
    interval = args.seconds / model.num_frames
    print(
        f"{len(paths)} clips of {args.seconds:g} s {args.width}x{args.height} at {args.fps} fps, a keyframe "
        f"every {args.gop} frames; {model.num_frames} frames per video at {exact.preprocessor.crop_size}; "
        "one thread"
    )
    print(f"  decord + Pillow resize   {decord_s * 1000:7.1f} ms CPU per video")
    for label, seconds, goal in (("exact", exact_s, 1.15), ("fast", fast_s, 3.0)):
        ratio = decord_s / seconds
        verdict = "met" if ratio >= goal else "missed"
        print(
            f"  {label:24s} {seconds * 1000:7.1f} ms CPU per video   efficiency / decord {ratio:5.2f}x"
            f"   (goal >= {goal}x: {verdict})"
        )
    if args.nvdec:
        cpu_wall_s = timed(lambda p: decode_video(p, exact)[0], paths)[1]
        print(f"  exact, wall-clock          {cpu_wall_s * 1000:7.1f} ms per video")
        device = open_cuda_decoder()  # held, as a decoder holds it: each video's NVDEC decoder opens cheaply
        decoded_by = "NVDEC" if nvdec_decodes(str(paths[0])) else "FFmpeg's software decoder: NVDEC fell back"
        print(f"  on the GPU, the first clip's pictures come from {decoded_by}")
        for label, settings, cpu_rows in (("exact", exact, exact_rows), ("fast", fast, fast_rows)):
            on_gpu = replace(settings, device="cuda")
            seconds, wall, rows = timed(lambda p, s=on_gpu: decode_video(p, s)[0], paths)
            pairs = zip(rows, cpu_rows, strict=True)
            diff = max(np.abs(a["frames"].astype(int) - b["frames"]).max() for a, b in pairs)
            print(
                f"  {label + ', NVDEC':24s} {seconds * 1000:7.1f} ms CPU per video   efficiency / decord "
                f"{decord_s / seconds:5.2f}x   wall-clock {wall * 1000:6.1f} ms; max difference from the "
                f"CPU's frames {diff}"
            )
        del device
    print(
        f"  fast's time error per video: median {np.median(errors):.3f} s, max {errors.max():.3f} s "
        f"(bound: half the sampling interval, {interval / 2:.3f} s)"
    )

    with torch.inference_mode():

        def embed(rows: list[dict]) -> torch.Tensor:
            frames = torch.from_numpy(np.stack([row["frames"] for row in rows]))
            pixels = model.preprocessor.normalize(frames.flatten(0, 1)).unflatten(0, frames.shape[:2])
            embedding, _ = model.encode_videos(pixels)
            return embedding

        texts = model.encode_texts([caption for _, caption in clips])
        measured = agreement(texts, embed(exact_rows), embed(fast_rows))
    print(
        f"retrieval ({len(clips)} caption queries, {model.identity.source}): {measured.text('exact', 'fast')}"
    )


if __name__ == "__main__":
    main()
