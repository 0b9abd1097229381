"""Reliability at the edges: bad arguments are refused before any work, a setting the decoders' node cannot
honour stops the job in one line, and a job never replaces a library that answered queries with one that
embeds nothing."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from helpers import nvdec_available, run, write_video

from pipeline import Library
from pipeline.cli import main

CPU_ENCODERS = ["--gpus-per-encoder", "0"]


@pytest.fixture(scope="module")
def library(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path) -> tuple[Path, Path]:
    """A source of two good clips and its library (version 1)."""
    root = tmp_path_factory.mktemp("reliability")
    source = root / "videos"
    source.mkdir()
    for i in range(2):
        write_video(source / f"clip-{i}.mp4", 20, 48, 40, fps=10, seed=i)
    summary = run("embed", source, root / "library", "--model", tiny_model, "--json", *CPU_ENCODERS).json()
    assert summary["version"] == 1 and summary["ok"] == 2
    return source, root / "library"


BAD = [
    (["embed", "{src}", "{lib}", "--frames", "0"], "--frames must be at least 1"),
    (["embed", "{src}", "{lib}", "--segment", "-1"], "--segment must be a positive number of seconds"),
    (["embed", "{src}", "{lib}", "--segment", "0"], "--segment must be a positive number of seconds"),
    (["embed", "{src}", "{lib}", "--segment", "nan"], "--segment must be a positive number of seconds"),
    (["embed", "{src}", "{lib}", "--batch-size", "0"], "--batch-size must be at least 1"),
    (["embed", "{src}", "{lib}", "--decoders", "0"], "--decoders must be at least 1"),
    (["refresh", "{src}", "{lib}", "--encoders", "-1"], "--encoders must be at least 1"),
    (["refresh", "{src}", "{lib}", "--gpus-per-encoder", "-1"], "--gpus-per-encoder must be 0 or more"),
    (["refresh", "{src}", "{lib}", "--model", "{lib}/nowhere"], "not found"),
    (["query", "{lib}", "red", "-k", "0"], "-k must be at least 1"),
    (["query", "{lib}", "red", "--version", "9"], "has no version 9; available versions: 1"),
    (["query", "{lib}/nowhere", "red"], "is not a videosearch library"),
    (["query", "{lib}", "   "], "the query text is empty"),
    (["versions", "{lib}/nowhere"], "is not a videosearch library"),
    (["gc", "{lib}", "--keep", "0"], "--keep must be at least 1"),
    (["rollback", "{lib}", "--to", "1"], "version 1 of {lib} is already the current version"),
    (["rollback", "{lib}", "--to", "9"], "has no version 9; available versions: 1"),
    (["eval", "{lib}/nowhere", "--captions", "{src}/captions.csv"], "no such object or file"),
    (["train", "{src}/captions.csv", "{lib}/run", "--epochs", "0"], "epochs and workers must be at least 1"),
]


@pytest.mark.parametrize(("argv", "message"), BAD, ids=[" ".join(argv[:1] + argv[3:]) for argv, _ in BAD])
def test_bad_arguments_exit_2_with_one_line_before_any_work(
    library: tuple[Path, Path], argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    source, lib = library
    args = [a.format(src=source, lib=lib) for a in argv]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    message = message.format(src=source, lib=lib)
    assert message in err and len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert err.startswith(f"videosearch {argv[0]}: error:")
    assert Library.open(str(lib)).version == 1  # nothing published


@pytest.mark.skipif(nvdec_available(), reason="this machine can decode on a GPU")
@pytest.mark.parametrize("executor", ["ray", "in-process"])
def test_decoding_on_a_gpu_where_there_is_none_stops_the_job_in_one_line(
    library: tuple[Path, Path], tiny_model: Path, tmp_path: Path, executor: str
) -> None:
    """On Ray the decoders' error reaches the command through Ray's wrapping: exit 2, the decoders' one line,
    no trace, nothing published (and no video recorded as corrupt)."""
    source, _ = library
    flags = ["--model", tiny_model, "--decode-device", "cuda", "--executor", executor, *CPU_ENCODERS]
    done = run("embed", source, tmp_path / "library", *flags)
    assert done.code == 2 and "Traceback" not in done.stderr, done.stderr[-3000:]
    message = [line for line in done.stderr.splitlines() if line.startswith("videosearch embed: error:")]
    assert len(message) == 1 and "FFmpeg cannot open a CUDA device here" in message[0], done.stderr[-3000:]
    assert Library.current_version(str(tmp_path / "library")) is None


def test_a_job_that_embeds_nothing_does_not_replace_a_library_that_answered(
    library: tuple[Path, Path], tiny_model: Path, tmp_path: Path
) -> None:
    source, lib = library
    broken = tmp_path / "broken"
    shutil.copytree(source, broken)
    for clip in broken.iterdir():
        clip.write_bytes(b"not a video any more")
    worse = tmp_path / "worse-library"
    shutil.copytree(lib, worse)
    refused = run("embed", broken, worse, "--model", tiny_model, *CPU_ENCODERS)
    assert (
        refused.code == 1 and "not published" in refused.stderr and "2 of 2 objects failed" in refused.stderr
    )
    assert "version 1 stays current" in refused.stderr
    assert Library.open(str(worse)).version == 1
    allowed = run("embed", broken, worse, "--model", tiny_model, "--allow-worse", "--json", *CPU_ENCODERS)
    assert allowed.code == 1 and Library.open(str(worse)).version == 2  # published: nothing embedded

    # and taken back: version 1 published again, as version 3
    assert run("rollback", worse, "--to", "1", "--json").json() == {
        "library": str(worse),
        "version": 3,
        "copy_of": 1,
    }
    restored, first = Library.open(str(worse)), Library.open(str(worse), version=1)
    assert restored.version == 3 and restored.manifest["counts"] == first.manifest["counts"]
    assert restored.table(["id", "uri", "embedding"]).equals(first.table(["id", "uri", "embedding"]))
    listed = run("versions", worse).stdout
    assert "rollback: a copy of version 1" in listed
