"""A job whose library recorded its checkpoint's files takes the model's facts from the library: a refresh
that embeds nothing neither loads the model nor imports torch, and weights changed in place are found."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import cli_env, write_video

from pipeline.embed.job import embed, refresh
from pipeline.embed.job_model import files_digest
from pipeline.embed.options import EmbedOptions
from pipeline.library import Library

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def embedded(tiny_model: Path, tmp_path: Path) -> tuple[Path, Path, Path]:
    """A copy of the tiny model, three videos, and a library of them embedded with it."""
    model = Path(shutil.copytree(tiny_model, tmp_path / "model"))
    videos = tmp_path / "videos"
    videos.mkdir()
    for i in range(3):
        write_video(videos / f"{i}.mp4", 8, 48, 40, fps=6, seed=i)
    embed(str(videos), str(tmp_path / "library"), EmbedOptions(model=str(model)))
    return model, videos, tmp_path / "library"


def test_a_refresh_that_embeds_nothing_never_imports_torch(embedded: tuple[Path, Path, Path]) -> None:
    model, videos, library = embedded
    (videos / "0.mp4").unlink()
    script = (
        "import json, sys\n"
        "from pipeline.embed.job import refresh\n"
        "from pipeline.embed.options import EmbedOptions\n"
        f"options = EmbedOptions(model={str(model)!r})\n"
        f"deleted = refresh({str(videos)!r}, {str(library)!r}, options)\n"
        f"nothing = refresh({str(videos)!r}, {str(library)!r}, options)\n"
        "print(json.dumps([deleted.changes['deleted'], deleted.published, nothing.published,"
        " 'torch' in sys.modules]))\n"
    )
    env = cli_env() | {"PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == [1, True, False, False]
    first, second = (Library.open(str(library), version=n).manifest for n in (1, 2))
    assert second["model"] == first["model"] and second["model_files"] == first["model_files"]


def test_a_model_whose_files_changed_is_loaded_and_its_weights_checked(
    embedded: tuple[Path, Path, Path],
) -> None:
    model, videos, library = embedded
    recorded = Library.open(str(library)).manifest
    write_video(videos / "new.mp4", 8, 48, 40, fps=6, seed=7)

    # touched (a copy, a download again): the same weights, loaded and hashed once more, and recorded anew
    os.utime(model / "config.json")
    summary = refresh(str(videos), str(library), EmbedOptions(model=str(model)))
    assert summary.changes["new"] == 1 and summary.ok == 4
    now = Library.open(str(library)).manifest
    assert now["model"] == recorded["model"] and now["model_files"] not in (None, recorded["model_files"])

    # other weights with the same sizes and dates: the digest cannot tell, the hash of the loaded model does
    weights = model / "model.safetensors"
    stat = weights.stat()
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # the last byte of the last tensor
    weights.write_bytes(bytes(data))
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert files_digest(str(model)) == now["model_files"]
    write_video(videos / "newer.mp4", 8, 48, 40, fps=6, seed=8)
    with pytest.raises(ValueError, match="changed without changing their files' sizes or dates"):
        refresh(str(videos), str(library), EmbedOptions(model=str(model)))
    assert Library.open(str(library)).version == now["version"]  # nothing published


def test_the_digest_is_of_the_files_listing(tiny_model: Path, tmp_path: Path) -> None:
    model = Path(shutil.copytree(tiny_model, tmp_path / "model"))
    digest = files_digest(str(model))
    assert digest is not None and files_digest(str(model)) == digest
    (model / "extra.txt").write_text("a file more")
    assert files_digest(str(model)) != digest
    assert files_digest(str(tmp_path / "nothing-here")) is None  # loading the model will say why
