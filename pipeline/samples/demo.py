"""``videosearch demo``: the main job on the embedded default, start to finish on a laptop.

Generates a few captioned sample videos, embeds them on a local Ray with the default model (no download),
then runs some of the captions as text queries and prints the top results next to the expected video.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import TextIO

from ..embed.job import embed
from ..embed.options import EmbedOptions
from ..search import Searcher
from .synthetic import sample_scenes, write_clip

DEMO_VIDEOS = 12
DEMO_QUERIES = 6


def run_demo(workdir: str | None = None, out: TextIO | None = None) -> None:
    """Generate, embed, query; print each step to ``out`` (default: stdout). ``workdir`` keeps the files
    (default: a temp dir)."""
    with tempfile.TemporaryDirectory(prefix="videosearch-demo-") as tmp:
        root = Path(workdir or tmp)
        videos, library = root / "videos", root / "library"
        videos.mkdir(parents=True, exist_ok=True)
        scenes = sample_scenes(DEMO_VIDEOS, seed=0)
        expected = {}
        for i, scene in enumerate(scenes):
            path = write_clip(videos / f"clip-{i:02d}.mp4", scene)
            expected[scene.caption] = path
        print(f"wrote {len(scenes)} sample videos to {videos}", file=out)

        summary = embed(str(videos), str(library), EmbedOptions())  # the bundled model
        print(summary.text(), file=out)

        lib = Searcher.open(str(library))
        right = 0
        for caption in list(expected)[:: len(expected) // DEMO_QUERIES][:DEMO_QUERIES]:
            hits = lib.search(caption, k=3)
            top_is_right = bool(hits) and hits[0].uri.endswith(Path(expected[caption]).name)
            right += top_is_right
            print(f"\nquery: {caption!r}   (expected {Path(expected[caption]).name})", file=out)
            for rank, hit in enumerate(hits, 1):
                mark = "  <- expected" if hit.uri.endswith(Path(expected[caption]).name) else ""
                print(f"  {rank}. {hit.score:.4f}  {Path(hit.uri).name}{mark}", file=out)
        print(f"\nright video first for {right} of {DEMO_QUERIES} queries", file=out)
