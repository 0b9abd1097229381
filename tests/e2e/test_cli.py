"""The ``videosearch`` command line: help for every command, and ``classify`` end to end (no Ray needed)."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import decode_frames, write_audio, write_video

from pipeline.cli import _parser, main
from xclip_core import XCLIPModel
from xclip_core.classify import ZeroShotClassifier
from xclip_core.processor import XCLIPProcessor
from xclip_core.sampling import segment_frame_indices

ROOT = Path(__file__).parents[2]


def commands() -> list[str]:
    """Every subcommand the parser has (so that a new one is covered without a change here)."""
    (subcommands,) = [a for a in _parser()._actions if isinstance(a, argparse._SubParsersAction)]
    return sorted(subcommands.choices)


@pytest.mark.parametrize("command", commands())
def test_every_command_has_help(command: str) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", command, "--help"], capture_output=True, text=True, check=True
    ).stdout
    assert f"usage: videosearch {command}" in out


def test_the_parser_imports_neither_torch_nor_ray() -> None:
    """``--help`` and argument errors answer at once: ~0.5 s, against ~3.5 s when the parser's defaults came
    from modules that import torch."""
    code = "import sys, pipeline.cli; print(sorted({'torch', 'ray', 'av'} & set(sys.modules)))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert done.stdout.strip() == "[]"


@pytest.mark.parametrize("script", sorted(p.name for p in (ROOT / "jobs").glob("*.py")))
def test_every_job_entry_point_has_help(script: str) -> None:
    done = subprocess.run(
        [sys.executable, str(ROOT / "jobs" / script), "--help"], capture_output=True, text=True, cwd=ROOT
    )
    assert done.returncode == 0 and "usage: videosearch" in done.stdout, done.stderr


def test_classify_reports_labels_per_video_and_errors_per_bad_file(tmp_path, tiny_model, capsys) -> None:
    videos = tmp_path / "videos"
    videos.mkdir()
    good = write_video(videos / "a.mp4", 12, 64, 48, seed=1)
    write_audio(videos / "b-audio.m4a")
    (videos / "c-empty.mp4").write_bytes(b"")
    labels = tmp_path / "labels.txt"
    labels.write_text("juggling\nswimming\n# a comment\nplaying guitar\n")

    code = main(
        ["classify", str(videos), "--labels", str(labels), "--model", str(tiny_model), "-k", "2", "--json"]
    )
    assert code == 0
    results = {r["uri"].rsplit("/", 1)[-1]: r for r in json.loads(capsys.readouterr().out)}
    assert set(results) == {"a.mp4", "b-audio.m4a", "c-empty.mp4"}
    assert results["b-audio.m4a"]["error"] == "not a video: no video stream"
    assert results["c-empty.mp4"]["error"] == "empty object"

    # the probabilities are the classifier's on the same video, decoded and preprocessed independently
    model = XCLIPModel.from_pretrained(tiny_model)
    processor = XCLIPProcessor.from_pretrained(tiny_model)
    frames = decode_frames(good, segment_frame_indices(12, 4))
    pixel_values = processor(videos=[frames], return_tensors="pt")["pixel_values"]
    expected = ZeroShotClassifier(
        model, processor.tokenizer, labels=["juggling", "swimming", "playing guitar"]
    )
    want = expected.top_k(pixel_values, 2)[0]
    got = results["a.mp4"]["labels"]
    assert [label for label, _ in got] == [label for label, _ in want]
    assert [p for _, p in got] == pytest.approx([p for _, p in want], abs=1e-5)
    assert results["a.mp4"]["error"] is None


def test_bad_labels_is_a_clear_error(tmp_path, tiny_model, capsys) -> None:
    write_video(tmp_path / "a.mp4", 8, 32, 32)
    assert main(["classify", str(tmp_path), "--labels", "kinetics401", "--model", str(tiny_model)]) == 2
    assert "unknown label set 'kinetics401'" in capsys.readouterr().err


@pytest.mark.parametrize(
    "command",
    [["classify", "x.mp4"], ["train", "table.csv", "out"], ["eval", "library", "--captions", "table.csv"]],
)
def test_a_template_that_cannot_make_a_prompt_is_refused_before_anything_runs(command, capsys) -> None:
    with pytest.raises(SystemExit) as exit_:
        main([*command, "--template", "a {kind} of {}"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "argument --template: the template must have one '{}' where the label goes" in err


@pytest.mark.parametrize(
    ("job_args", "says"),
    [
        (["embed", "/data/videos", "s3://b/lib", "--frams", "3"], "unrecognized arguments: --frams 3"),
        (["embed", "videos", "s3://b/lib"], "videos is a relative path, which the job would look for"),
        (["train", "/data/t.csv", "s3://b/run", "--model", "."], ". is a relative path"),
        (["eval", "s3://b/lib", "--captions", "t.csv"], "t.csv is a relative path"),
    ],
)
def test_a_submitted_jobs_arguments_are_checked_before_the_cluster_is_asked(job_args, says, capsys) -> None:
    """A typo or a relative path fails here at once (exit 2), not in a job on the cluster: the address
    below answers nothing, and the error is not that it cannot be reached."""
    try:
        code = main(["submit", *job_args, "--address", "http://127.0.0.1:9"])
    except SystemExit as exit_:  # argparse's own usage error
        code = exit_.code
    err = capsys.readouterr().err
    assert code == 2 and says in err and "cannot reach" not in err
