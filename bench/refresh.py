"""Incremental refresh against a full embed of the same library: wall time and bytes written, in one run.

Usage: python bench/refresh.py [--videos 2000] [--change 0.01] [--model DIR] [--workdir DIR]
                               [--long-minutes 10 60]

Generates ``--videos`` short captioned clips (``pipeline.samples.synthetic``: 2 s, 128x128, 12 fps; cached in
the workdir), embeds them into a library with ``videosearch embed`` (the bundled model by default), then adds
``--change`` of them as new clips, rewrites as many with other content under the same names, deletes as many,
and runs ``videosearch refresh``. Each command runs as a user runs it: its own process, its own local Ray.
Prints:

  full embed      wall seconds of ``embed`` of every clip into a new library
  refresh         wall seconds of ``refresh`` after the change; its summary's changes
  nothing         wall seconds of a ``refresh`` that finds nothing changed: the fixed cost without Ray
  reorganized     wall seconds of a ``refresh`` after every clip was moved into a folder (``mv``: same size
                  and modification time): rows moved, nothing decoded; against the full embed
  ratios          refresh / full embed (goal <= 0.05); bytes the refresh wrote / the library's size (goal
                  <= 0.05), and which files they were
  long videos     a decoder's peak RSS (the decode stage in its own process, as an actor runs it) for videos
                  of ``--long-minutes`` (160x90, 10 fps) at ``--segment 10``, 8 frames at 224 px per segment:
                  handing segments on in batches, as the embed job does, against holding them all (goal: the
                  longest within 1.2x of the shortest)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline.samples.synthetic import sample_scenes, write_clip  # noqa: E402


def write_clips(directory: Path, names: list[str], seed: int) -> None:
    """One clip per name, on every core; a scene per name drawn with ``seed``."""
    directory.mkdir(parents=True, exist_ok=True)
    scenes = sample_scenes(len(names), seed=seed, max_shapes=2)
    with ProcessPoolExecutor(os.cpu_count()) as pool:
        list(pool.map(write_clip, [directory / name for name in names], scenes))


def videosearch(*args: str | Path) -> tuple[float, dict]:
    """Run the CLI with ``--json``; its wall seconds and its result."""
    command = [sys.executable, "-m", "pipeline.cli", *map(str, args), "--json"]
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "RAY_ADDRESS": "local"})
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} exited with {done.returncode}:\n{done.stderr[-3000:]}")
    return seconds, json.loads(done.stdout)


DECODER_RSS = """
import resource, sys
import numpy as np
from pipeline.embed.stages.decode import DecodeSettings, DecodeVideos
from pipeline.embed.stages.list import list_objects
from xclip_core import VideoPreprocessor

decoder = DecodeVideos(DecodeSettings(8, VideoPreprocessor(), segment_s=10.0))
(row,) = list_objects(sys.argv[1])
batch = {name: np.array([value], dtype=object) for name, value in row.items()}
segments = sum(len(chunk["uri"]) for chunk in decoder(batch)) if sys.argv[2] == "batches" else len(
    decoder.decode(batch)["uri"]
)
print(segments, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024)
"""


def long_video(path: Path, minutes: float) -> Path:
    """A video of ``minutes`` at 160x90, 10 fps, one keyframe every 10 s (cached)."""
    import av
    import numpy as np

    if path.exists():
        return path
    frames = round(minutes * 60 * 10)
    staging = path.with_suffix(".tmp.mp4")
    with av.open(str(staging), "w") as container:
        stream = container.add_stream("libx264", rate=10, options={"g": "100", "preset": "ultrafast"})
        stream.width, stream.height, stream.pix_fmt = 160, 90, "yuv420p"
        base = np.random.default_rng(0).integers(0, 256, (90, 160, 3), dtype=np.uint8)
        for i in range(frames):
            frame = np.roll(base, i, axis=1)
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    staging.replace(path)
    return path


def decoder_rss(video: Path, mode: str) -> tuple[int, int]:
    """Segments decoded and the decoding process's peak RSS in MiB."""
    done = subprocess.run(
        [sys.executable, "-c", DECODER_RSS, str(video), mode], capture_output=True, text=True, check=True
    )
    segments, rss = done.stdout.split()
    return int(segments), int(rss)


def files(library: Path) -> dict[str, int]:
    """Every file of the library (lock files aside) and its size."""
    return {
        str(p.relative_to(library)): p.stat().st_size
        for p in library.rglob("*")
        if p.is_file() and not p.name.startswith(".")
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--videos", type=int, default=2000)
    parser.add_argument("--change", type=float, default=0.01, help="fraction new, changed and deleted, each")
    parser.add_argument("--model", help="checkpoint directory (default: the bundled model)")
    parser.add_argument("--workdir", help="keeps the clips between runs (default: a temp dir)")
    parser.add_argument(
        "--long-minutes", type=float, nargs="+", default=[10, 60], help="long videos' lengths"
    )
    args = parser.parse_args()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="videosearch-bench-refresh-"))
    changed = max(1, round(args.videos * args.change))
    names = [f"clip-{i:05d}.mp4" for i in range(args.videos)]
    clips = work / f"clips-{args.videos}"
    if not all((clips / name).exists() for name in names):
        write_clips(clips, names, seed=0)
    source, library = work / "source", work / "library"
    for path in (source, library):
        shutil.rmtree(path, ignore_errors=True)
    shutil.copytree(clips, source, copy_function=os.link)
    model = ["--model", args.model] if args.model else []

    full_s, full = videosearch("embed", source, library, *model)
    before = files(library)
    # the change: new clips, other content under existing names, deleted clips
    write_clips(source, [f"new-{i:05d}.mp4" for i in range(changed)], seed=1)
    rewritten = names[:changed]
    for name in rewritten:
        (source / name).unlink()  # a new file: the hard link to the cached clip stays intact
    write_clips(source, rewritten, seed=2)
    for name in names[-changed:]:
        (source / name).unlink()
    refresh_s, refreshed = videosearch("refresh", source, library, *model)
    after = files(library)
    nothing_s, nothing = videosearch("refresh", source, library, *model)
    for path in sorted(source.glob("*.mp4")):  # a reorganization: every clip into a folder of its kind
        kind = path.name.split("-", 1)[0]
        (source / "sorted" / kind).mkdir(parents=True, exist_ok=True)
        path.rename(source / "sorted" / kind / path.name)
    moved_s, moved = videosearch("refresh", source, library, *model)

    manifest = json.loads((library / "versions" / f"{refreshed['version']}.json").read_text())
    named = [name for p in manifest["parts"] for name in (p["path"], p.get("features")) if name] + [
        manifest["index"]["path"],
        f"versions/{refreshed['version']}.json",
    ]
    library_bytes = sum(after[name] for name in named)
    written = {name: size for name, size in after.items() if before.get(name) != size}
    written_bytes = sum(written.values())
    by_kind: dict[str, int] = {}
    for name, size in written.items():
        by_kind[name.split("/", 1)[0]] = by_kind.get(name.split("/", 1)[0], 0) + size

    print(
        f"library: {args.videos} clips of 2 s 128x128; "
        f"change: {changed} new, {changed} changed, {changed} deleted"
    )
    print(f"full embed:   {full_s:7.1f} s  ({full['ok']} embedded, {full['segments']} rows)")
    print(f"refresh:      {refresh_s:7.1f} s  changes {refreshed['changes']}")
    print(
        f"nothing:      {nothing_s:7.1f} s  "
        f"(a refresh that finds nothing changed: published {nothing['published']})"
    )
    print(f"reorganized:  {moved_s:7.1f} s  changes {moved['changes']}")
    print(f"ratio refresh / full embed: {refresh_s / full_s:.3f}  (goal <= 0.05)")
    print(f"ratio reorganized refresh / full embed: {moved_s / full_s:.3f}")
    print(
        f"ratio bytes written / library size: {written_bytes / library_bytes:.3f}  (goal <= 0.05; "
        f"{written_bytes / 2**20:.2f} of {library_bytes / 2**20:.2f} MiB: "
        + ", ".join(f"{kind} {size / 2**20:.2f} MiB" for kind, size in sorted(by_kind.items()))
        + ")"
    )

    peaks = {}
    for minutes in args.long_minutes:
        video = long_video(work / f"long-{minutes:g}min.mp4", minutes)
        for mode in ("batches", "all at once"):
            segments, rss = decoder_rss(video, mode)
            peaks[minutes, mode] = rss
            print(f"decoder, {minutes:g} min video, {segments} segments, {mode}: peak RSS {rss} MiB")
    shortest, longest = min(args.long_minutes), max(args.long_minutes)
    print(
        f"ratio peak RSS {longest:g} min / {shortest:g} min: "
        f"{peaks[longest, 'batches'] / peaks[shortest, 'batches']:.2f} in batches (goal <= 1.2), "
        f"{peaks[longest, 'all at once'] / peaks[shortest, 'all at once']:.2f} all at once"
    )


if __name__ == "__main__":
    main()
