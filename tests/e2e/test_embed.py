"""End to end: ``videosearch embed`` and ``videosearch query`` run as subprocesses (the real CLI, a real local
Ray per job) on real encoded videos, on the moto S3 server over HTTP and on the local disk.

Every embedding in a library is checked against ``xclip_core`` called directly on frames that this file
decodes itself (PyAV, every frame from the first, no seeking) and samples with X-CLIP's rule, and every
query result against a brute-force X-CLIP score of all the library's ok rows: what the Ray plan does in
between (actors, batching, Arrow round trips, Parquet, FAISS) must not change a number.

Ray jobs are the slow part (about 25 s each on 2 cores), so each is a module fixture shared by several tests:
one S3 job, two local jobs (the second publishes version 2). The failing invocations stop before Ray starts
and run concurrently.
"""

from __future__ import annotations

import io
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import av
import numpy as np
import pytest
import s3fs
import torch
import torch.nn.functional as F
from helpers import (
    DecoderKiller,
    MotoS3,
    Run,
    free_port,
    pattern_frames,
    run,
    run_all,
    write_audio,
    write_frames,
    write_video,
)
from PIL import Image

from pipeline import Library, Searcher
from pipeline.cli import main
from pipeline.embed.on_ray import DECODE_TRIES
from xclip_core import XCLIPModel
from xclip_core.sampling import segment_frame_indices
from xclip_core.tokenizer import CLIPTokenizer
from xclip_core.video_transforms import VideoPreprocessor

FRAMES, CROP = 4, 32  # the tiny model's frames per video and input size
TOL = 1e-4
CPU_ENCODERS = ["--gpus-per-encoder", "0"]  # float32, as the parity to TOL needs (a GPU runs half precision)
QUERIES = ("a red square moving left", "noise")

# ------------------------------------------------------------------------------------------------ helpers


class Reference:
    """The tiny model called directly: embeddings of frames, full X-CLIP scores of texts."""

    def __init__(self, model_dir: Path):
        self.model = XCLIPModel.from_pretrained(model_dir)
        self.tokenizer = CLIPTokenizer.from_pretrained(model_dir)
        self.preprocessor = VideoPreprocessor(size=CROP, crop_size=CROP)  # what the checkpoint was saved with

    @torch.inference_mode()
    def encode(self, frames: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """uint8 (FRAMES, H, W, 3) as decoded -> normalized embedding (P,), prompt features (patches, P)."""
        pixels = self.preprocessor(frames)["pixel_values"]
        out = self.model.encode_videos(pixels)
        return F.normalize(out.video_embeds, dim=-1)[0].numpy(), out.prompt_features[0].numpy()

    @torch.inference_mode()
    def scores(self, text: str, embeddings: np.ndarray, prompt_features: np.ndarray) -> np.ndarray:
        """The full X-CLIP score of ``text`` against each video, as a cosine: logits / logit scale."""
        tokens = self.tokenizer(text, padding=False)  # unpadded: padding must not change a text embedding
        text_embeds = self.model.get_text_features(tokens["input_ids"], tokens["attention_mask"])
        video, prompt = torch.from_numpy(np.stack(embeddings)), torch.from_numpy(np.stack(prompt_features))
        logits = self.model.logits(video, prompt, text_embeds)[:, 0]
        return (logits / self.model.logit_scale.exp()).numpy()


@pytest.fixture(scope="module")
def reference(tiny_model: Path) -> Reference:
    return Reference(tiny_model)


def every_frame(path: str | os.PathLike) -> np.ndarray:
    """All frames of a local video, decoded by PyAV from the first to the last, as uint8 (N, H, W, 3) RGB."""
    with av.open(os.fspath(path)) as container:
        return np.stack([frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)])


def assert_ranked(hits: list[dict[str, Any]], expected: dict[tuple[str, int], float], k: int) -> None:
    """``hits`` are the ``k`` best of ``expected`` ((uri, segment) -> score), best first, with its scores.

    Where two expected scores lie within the tolerance, either order is accepted.
    """
    ranked = sorted(expected.items(), key=lambda item: -item[1])
    assert len(hits) == min(k, len(expected))
    for rank, hit in enumerate(hits):
        key = (hit["uri"], hit["segment"])
        assert key in expected, f"hit {key} is no ok row of the library"
        assert abs(hit["score"] - expected[key]) <= TOL, (key, hit["score"], expected[key])
        assert abs(expected[key] - ranked[rank][1]) <= TOL, f"rank {rank}: {key}, expected {ranked[rank]}"
    assert len({(hit["uri"], hit["segment"]) for hit in hits}) == len(hits)


def rows_by_key(table: Any) -> dict[tuple[str, int], dict[str, Any]]:
    rows = table.to_pylist()
    keyed = {(row["uri"], row["segment"]): row for row in rows}
    assert len(keyed) == len(rows), "a (uri, segment) is in the library twice"
    return keyed


# ------------------------------------------------------------------------------------------------ S3 job

GOOD = {  # name -> (frames, width, height, fps, codec, pattern); AVI: no timestamps, frames are counted
    "h264.mp4": (30, 64, 48, 10, "libx264", "shapes"),
    "mpeg4.avi": (25, 56, 40, 10, "mpeg4", "shapes"),
    "odd-yuv444.mkv": (12, 33, 25, 10, "libx264", "shapes"),
    "noise-1.7MB.mp4": (50, 320, 240, 25, "libx264", "noise"),  # larger than one 1 MiB ranged read
    "one-frame.mp4": (1, 64, 48, 10, "libx264", "shapes"),  # decodes: its one frame, repeated
    "sub/dir/nested.mp4": (20, 48, 64, 10, "libx264", "shapes"),  # listing is recursive
}
BAD = {  # name -> what the error must say
    "zero-bytes.mp4": "empty object",
    "truncated.mp4": "truncated or corrupt",  # first half of an MP4 whose index (moov) is at the end
    "truncated-faststart.mp4": "no decodable frames|truncated or corrupt",  # index first, half of the data
    "random-bytes.mp4": "not a video|corrupt",
    "notes.txt": "not a video",
    "audio-only.m4a": "not a video: no video stream",
    "picture.jpg": "not a video: an image",
}


def write_s3_videos(directory: Path) -> dict[str, Path]:
    files = {}
    for i, (name, (count, width, height, fps, codec, pattern)) in enumerate(GOOD.items()):
        (directory / name).parent.mkdir(parents=True, exist_ok=True)
        files[name] = Path(write_video(directory / name, count, width, height, fps, codec, pattern, seed=i))
    (directory / "zero-bytes.mp4").write_bytes(b"")
    whole = (directory / "h264.mp4").read_bytes()
    (directory / "truncated.mp4").write_bytes(whole[: len(whole) // 2])
    faststart = write_frames(
        directory / "fs.mp4", pattern_frames(40, 64, 48, "shapes", 7), 10, faststart=True
    )
    data = Path(faststart).read_bytes()
    (directory / "truncated-faststart.mp4").write_bytes(data[: len(data) // 2])
    os.unlink(faststart)
    (directory / "random-bytes.mp4").write_bytes(np.random.default_rng(0).bytes(5000))
    (directory / "notes.txt").write_text("a list of videos to watch\n")
    write_audio(directory / "audio-only.m4a")
    Image.fromarray(pattern_frames(1, 40, 30, "shapes", 9)[0]).save(directory / "picture.jpg")
    for name in BAD:
        files[name] = directory / name
    return files


@dataclass
class S3Job:
    s3: MotoS3
    library: str
    files: dict[str, Path]  # uri -> the local file uploaded there
    embed: Run


@pytest.fixture(scope="module")
def s3_job(s3: MotoS3, tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> S3Job:
    bucket = s3.make_bucket("e2e")
    fs = s3fs.S3FileSystem(endpoint_url=s3.endpoint_url, skip_instance_cache=True)
    files = {}
    for name, path in write_s3_videos(tmp_path_factory.mktemp("s3-videos")).items():
        fs.put_file(str(path), f"{bucket}/videos/{name}")
        files[f"s3://{bucket}/videos/{name}"] = path
    fs.call_s3("put_object", Bucket=bucket, Key="videos/empty-folder/", Body=b"")  # a "folder" marker key
    fs.pipe_file(f"{bucket}/elsewhere/other.mp4", files[f"s3://{bucket}/videos/h264.mp4"].read_bytes())
    library = f"s3://{bucket}/libraries/e2e"
    embed = run(
        "embed",
        f"s3://{bucket}/videos/",
        library,
        "--model",
        tiny_model,
        "--endpoint-url",
        s3.endpoint_url,
        *CPU_ENCODERS,
        "--executor",
        "ray",  # a handful of videos would run in the job's process (auto): this is the Ray Data plan's test
        "--compile",
        "on",  # the encoder actors compile (the embeddings are still held to the reference's)
        "--json",
    )
    s3fs.S3FileSystem.clear_instance_cache()
    return S3Job(s3, library, files, embed)


def test_s3_embed_summary(s3_job: S3Job) -> None:
    summary = s3_job.embed.json()
    failed = {uri for uri in s3_job.files if uri.rsplit("/", 1)[-1] in BAD}
    assert summary["library"] == s3_job.library and summary["version"] == 1
    assert (summary["objects"], summary["ok"], summary["failed"], summary["segments"]) == (13, 6, 7, 6)
    assert [f["uri"] for f in summary["failures"]] == sorted(failed)
    assert summary["seconds"] > 0 and summary["videos_per_s"] > 0
    assert summary["executor"] == "ray" and set(summary["placement"]) == {"decode", "encode"}
    assert summary["compiled"] is True


def test_s3_every_object_is_in_the_library_once(s3_job: S3Job) -> None:
    assert s3_job.embed.code == 0, s3_job.embed.stderr[-4000:]
    library = Library.open(s3_job.library, s3_job.s3.options)
    assert library.version == 1 and library.manifest["counts"] == {
        "videos": 13,
        "segments": 6,
        "ok": 6,
        "failed": 7,
    }
    rows = rows_by_key(library.table(columns=[n for n in library.schema.names if n != "prompt_features"]))
    assert {uri for uri, _ in rows} == set(s3_job.files)  # not the folder marker, not other prefixes
    assert all(segment == 0 for _, segment in rows)
    for uri, path in s3_job.files.items():
        row, name = rows[(uri, 0)], uri.split("/videos/", 1)[1]
        assert row["size"] == path.stat().st_size and row["etag"] and row["mtime"] > 0
        assert row["model_id"] == f"{library.model.source}@{library.model.sha256[:16]}"
        if name in BAD:
            assert row["error"], f"{name} has no error"
            assert any(reason in row["error"] for reason in BAD[name].split("|")), (name, row["error"])
            assert row["thumbnail"] == b"" and not np.any(row["embedding"])
            continue
        count, width, height, fps, _, _ = GOOD[name]
        assert row["error"] is None, (name, row["error"])
        assert (row["frame_count"], row["width"], row["height"], row["fps"]) == (count, width, height, fps)
        assert row["start_s"] == 0 and row["end_s"] == row["duration_s"] == pytest.approx(count / fps)
        assert row["thumbnail"][:2] == b"\xff\xd8"  # a JPEG
        assert np.linalg.norm(row["embedding"]) == pytest.approx(1, abs=1e-5)


def test_s3_embeddings_equal_the_model_on_the_same_frames(s3_job: S3Job, reference: Reference) -> None:
    assert s3_job.embed.code == 0, s3_job.embed.stderr[-4000:]
    library = Library.open(s3_job.library, s3_job.s3.options)
    rows = rows_by_key(library.table(columns=["uri", "segment", "error", "embedding", "prompt_features"]))
    patches, dim = library.manifest["prompt_shape"]
    embeddings = []
    for uri, path in s3_job.files.items():
        row = rows[(uri, 0)]
        if row["error"] is not None:
            continue
        frames = every_frame(path)
        embedding, prompt = reference.encode(frames[segment_frame_indices(len(frames), FRAMES)])
        np.testing.assert_allclose(row["embedding"], embedding, atol=TOL, rtol=0, err_msg=uri)
        stored = np.array(row["prompt_features"], np.float32).reshape(patches, dim)  # stored as float16
        np.testing.assert_allclose(stored, prompt, atol=1e-3, rtol=1e-3, err_msg=uri)
        embeddings.append(embedding)
    assert len(embeddings) == 6
    assert min(np.linalg.norm(a - b) for i, a in enumerate(embeddings) for b in embeddings[i + 1 :]) > 1e-3


def expected_scores(
    reference: Reference, text: str, files: dict[str, Path], segments: dict[tuple[str, int], list[int]]
) -> dict[tuple[str, int], float]:
    """Brute force: every ok (uri, segment) of a library -> the model's full score of ``text`` on it, from
    frames decoded here (``segments`` gives the frame indices of each)."""
    keys = list(segments)
    features = [reference.encode(every_frame(files[uri])[segments[(uri, s)]]) for uri, s in keys]
    scores = reference.scores(text, [e for e, _ in features], [p for _, p in features])
    return dict(zip(keys, scores.tolist(), strict=True))


def test_s3_query_ranks_by_the_full_xclip_score(s3_job: S3Job, reference: Reference) -> None:
    assert s3_job.embed.code == 0, s3_job.embed.stderr[-4000:]
    ok = {}
    for uri, path in s3_job.files.items():
        if uri.split("/videos/", 1)[1] in GOOD:
            ok[(uri, 0)] = segment_frame_indices(len(every_frame(path)), FRAMES)
    text = QUERIES[0]
    expected = expected_scores(reference, text, s3_job.files, ok)
    query = run("query", s3_job.library, text, "-k", "4", "--json", "--endpoint-url", s3_job.s3.endpoint_url)
    hits = query.json()
    assert_ranked(hits, expected, k=4)
    assert all(hit["start_s"] == 0 and hit["end_s"] > 0 for hit in hits)
    assert query.seconds < 60

    # the Python API gives the same hits
    library = Searcher.open(s3_job.library, s3_job.s3.options)
    api = [hit.to_dict() for hit in library.search(text, k=4)]
    assert [(h["uri"], h["id"]) for h in api] == [(h["uri"], h["id"]) for h in hits]
    np.testing.assert_allclose([h["score"] for h in api], [h["score"] for h in hits], atol=1e-6, rtol=0)
    # asked for more than there are: every ok row, and no error row
    for text in QUERIES:
        expected = expected_scores(reference, text, s3_job.files, ok)
        assert_ranked([hit.to_dict() for hit in library.search(text, k=50)], expected, k=50)


# ------------------------------------------------------------------------------------------------ local jobs

FPS = 10  # of the local videos
LONG_SEGMENTS = {  # long.mp4, 10 s in segments of 4 s; segment -> (start_s, end_s, X-CLIP's 4 frames of the
    # segment's frames [start_s * FPS, end_s * FPS))
    0: (0.0, 4.0, [5, 15, 25, 35]),
    1: (4.0, 8.0, [45, 55, 65, 75]),
    2: (8.0, 10.0, [82, 87, 92, 97]),
}
SHORT_SEGMENTS = {0: (0.0, 2.5, [3, 9, 15, 21])}  # short.mkv: 25 frames, shorter than a segment
ADDED_SEGMENTS = {0: (0.0, 3.0, [3, 11, 18, 26])}  # added.mp4, in the second job only: 30 frames


@dataclass
class LocalJobs:
    videos: Path
    library: Path
    first: Run
    first_rows: dict[tuple[str, int], dict[str, Any]]  # read right after the first job
    second: Run


@pytest.fixture(scope="module")
def local_jobs(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> LocalJobs:
    """Two jobs into one library: two videos embedded in 4 s segments, then again with a third added.

    The jobs run with the model given as a path relative to their working directory.
    """
    root = tmp_path_factory.mktemp("local")
    videos, library = root / "videos", root / "library"
    videos.mkdir()
    write_frames(
        videos / "long.mp4", pattern_frames(100, 64, 48, "shapes", 11), FPS, gop=10
    )  # keyframe every 1 s
    write_video(videos / "short.mkv", 25, 48, 48, fps=FPS, seed=12)
    model_cwd = tiny_model.parent
    args = ["--model", tiny_model.name, "--segment", "4", *CPU_ENCODERS, "--json"]
    first = run("embed", videos, library, *args, cwd=model_cwd)
    first_rows = rows_by_key(Library.open(str(library)).table()) if first.code == 0 else {}
    write_video(videos / "added.mp4", 30, 64, 48, fps=FPS, seed=13)
    second = run("embed", videos, library, *args, cwd=model_cwd)
    return LocalJobs(videos, library, first, first_rows, second)


def local_segments(jobs: LocalJobs, added: bool) -> dict[tuple[str, int], tuple[float, float, list[int]]]:
    names = {"long.mp4": LONG_SEGMENTS, "short.mkv": SHORT_SEGMENTS}
    if added:
        names["added.mp4"] = ADDED_SEGMENTS
    return {
        (str(jobs.videos / name), s): spec for name, segments in names.items() for s, spec in segments.items()
    }


def test_segments_cover_the_video_and_equal_the_model_on_their_frames(
    local_jobs: LocalJobs, reference: Reference
) -> None:
    summary = local_jobs.first.json()
    assert (summary["version"], summary["objects"], summary["ok"], summary["failed"]) == (1, 2, 2, 0)
    assert summary["segments"] == 4 and summary["failures"] == []
    expected = local_segments(local_jobs, added=False)
    rows = local_jobs.first_rows
    assert set(rows) == set(expected)
    assert len({row["id"] for row in rows.values()}) == len(rows)
    for (uri, segment), (start, end, indices) in expected.items():
        row = rows[(uri, segment)]
        frames = every_frame(uri)
        assert row["error"] is None
        assert (row["start_s"], row["end_s"]) == (start, end)
        assert (row["frame_count"], row["duration_s"]) == (len(frames), len(frames) / FPS)
        # the frames are those X-CLIP samples from the segment's frames [start * fps, end * fps)
        assert indices == segment_frame_indices(len(frames), FRAMES, round(start * FPS), round(end * FPS))
        embedding, _ = reference.encode(frames[indices])
        np.testing.assert_allclose(row["embedding"], embedding, atol=TOL, rtol=0, err_msg=f"{uri} #{segment}")


def test_second_embed_publishes_version_2_and_version_1_stays_readable(local_jobs: LocalJobs) -> None:
    # a few local videos: the stages ran in the job's own process (the S3 job's tests cover Ray's plan)
    assert (
        local_jobs.first.json()["executor"] == "in-process" and local_jobs.first.json()["compiled"] is False
    )
    summary = local_jobs.second.json()
    assert (summary["version"], summary["objects"], summary["ok"], summary["segments"]) == (2, 3, 3, 5)
    uri = str(local_jobs.library)
    current = Library.open(uri)
    assert current.version == 2 and current.versions() == [1, 2] and current.manifest["parent"] == 1
    assert set(rows_by_key(current.table(columns=["uri", "segment"]))) == set(
        local_segments(local_jobs, True)
    )

    old = Library.open(uri, version=1)
    assert old.version == 1 and old.manifest["counts"]["videos"] == 2
    old_rows = rows_by_key(old.table())
    assert old_rows.keys() == local_jobs.first_rows.keys()
    for key, row in old_rows.items():
        assert row == local_jobs.first_rows[key]
    # the same video and segment keeps its id, and the same frames give the same embedding
    new_rows = rows_by_key(current.table(columns=["uri", "segment", "id", "embedding"]))
    for key, row in old_rows.items():
        assert new_rows[key]["id"] == row["id"]
        np.testing.assert_allclose(new_rows[key]["embedding"], row["embedding"], atol=TOL, rtol=0)
    # version 1 still searches, with its own index: only its own rows
    hits = [hit.to_dict() for hit in Searcher(old).search("a red square", k=10)]
    assert {(h["uri"], h["segment"]) for h in hits} == set(local_jobs.first_rows)


def test_query_from_another_directory_finds_segments(
    local_jobs: LocalJobs,
    reference: Reference,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The library records its model; ``query`` finds it from any working directory."""
    local_jobs.second.json()
    segments = local_segments(local_jobs, added=True)
    files = {uri: Path(uri) for uri, _ in segments}
    text = QUERIES[0]
    expected = expected_scores(reference, text, files, {key: spec[2] for key, spec in segments.items()})
    hits = run("query", local_jobs.library, text, "-k", "3", "--json", cwd=tmp_path).json()
    assert_ranked(hits, expected, k=3)
    for hit in hits:
        start, end, _ = segments[(hit["uri"], hit["segment"])]
        assert (hit["start_s"], hit["end_s"]) == (start, end)

    # within one video, named relative to the working directory: its segments, ranked the same (the CLI in
    # this process: its model is loaded already)
    monkeypatch.chdir(local_jobs.videos)
    capsys.readouterr()
    assert main(["query", str(local_jobs.library), text, "-k", "10", "--under", "long.mp4", "--json"]) == 0
    within = json.loads(capsys.readouterr().out)
    assert_ranked(within, {key: score for key, score in expected.items() if key[0].endswith("/long.mp4")}, 10)
    assert main(["query", str(local_jobs.library), text, "--under", "elsewhere"]) == 0
    nowhere = capsys.readouterr()
    assert nowhere.out.strip() == ""
    assert f"no embedded video under {local_jobs.videos / 'elsewhere'}" in nowhere.err

    # many texts, one a line, from a file or stdin: a JSON object a line, each ranked as alone
    (tmp_path / "queries.txt").write_text(f"{QUERIES[0]}\n\n  {QUERIES[1]}  \n")
    assert main(["query", str(local_jobs.library), "--queries", str(tmp_path / "queries.txt"), "--json"]) == 0
    answers = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [answer["query"] for answer in answers] == list(QUERIES)
    assert_ranked(answers[0]["hits"], expected, k=10)
    monkeypatch.setattr("sys.stdin", io.StringIO("\n".join(QUERIES)))
    assert main(["query", str(local_jobs.library), "--queries", "-", "-k", "3"]) == 0
    batch = capsys.readouterr().out
    alone = []
    for query in QUERIES:
        assert main(["query", str(local_jobs.library), query, "-k", "3"]) == 0
        alone.append(f"{query}\n{capsys.readouterr().out}\n")  # the text, its ranked lines, a blank line
    assert batch == "".join(alone)
    assert main(["query", str(local_jobs.library), text, "--queries", "-"]) == 2
    assert "give one of a TEXT to look for, --like VIDEO or --queries FILE" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------ failures


@dataclass
class FailedRuns:
    runs: dict[str, Run]
    empty_source: str
    closed_endpoint: str


@pytest.fixture(scope="module")
def failed_runs(s3: MotoS3, tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> FailedRuns:
    """Invocations that must fail before any video is read (and before Ray starts), run concurrently."""
    root = tmp_path_factory.mktemp("failures")
    (root / "videos").mkdir()
    write_video(root / "videos" / "a.mp4", 8, 32, 32)
    bucket = s3.make_bucket("empty")
    fs = s3fs.S3FileSystem(endpoint_url=s3.endpoint_url, skip_instance_cache=True)
    fs.pipe_file(f"{bucket}/elsewhere/a.mp4", (root / "videos" / "a.mp4").read_bytes())  # not under videos/
    empty_source, closed_endpoint = f"s3://{bucket}/videos/", f"http://127.0.0.1:{free_port()}"
    runs = run_all(
        {
            "empty source": [
                "embed",
                empty_source,
                f"s3://{bucket}/lib",
                "--model",
                tiny_model,
                "--endpoint-url",
                s3.endpoint_url,
            ],
            "bad model": ["embed", root / "videos", root / "lib", "--model", root / "no-such-model"],
            "unreachable": [
                "embed",
                "s3://some-bucket/videos/",
                "s3://some-bucket/lib",
                "--model",
                tiny_model,
                "--endpoint-url",
                closed_endpoint,
            ],
        }
    )
    fs.invalidate_cache()
    assert not fs.exists(f"{bucket}/lib") and not (root / "lib").exists()  # nothing written
    return FailedRuns(runs, empty_source, closed_endpoint)


def test_source_that_lists_nothing_fails_with_a_clear_message(failed_runs: FailedRuns) -> None:
    result = failed_runs.runs["empty source"]
    assert result.code == 2 and result.stdout == ""
    assert f"nothing to embed: {failed_runs.empty_source} lists no objects" in result.stderr
    assert "Traceback" not in result.stderr


def test_bad_model_path_exits_2_naming_it(failed_runs: FailedRuns) -> None:
    result = failed_runs.runs["bad model"]
    assert result.code == 2 and result.stdout == ""
    assert "no-such-model" in result.stderr and "not found" in result.stderr
    assert "Traceback" not in result.stderr


def test_unreachable_endpoint_exits_2_quickly(failed_runs: FailedRuns) -> None:
    result = failed_runs.runs["unreachable"]
    assert result.code == 2 and result.stdout == ""
    assert "cannot reach" in result.stderr and failed_runs.closed_endpoint in result.stderr
    assert "--endpoint-url" in result.stderr and "Traceback" not in result.stderr
    # Nothing is configured: botocore's and s3fs's own retries of a refused connection (5 to 10 s). Measured
    # against the same command on a reachable endpoint, which fails at the same step (the listing), so that
    # the start-up of Python on a loaded machine does not count.
    baseline = failed_runs.runs["empty source"]
    assert result.seconds - baseline.seconds < 30, (result.seconds, baseline.seconds)


# ----------------------------------------------------------------------------- a decoder that dies mid-video


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="finds the decoders through /proc")
def test_a_video_that_kills_its_decoder_is_failed_after_bounded_tries(
    tiny_model: Path, tmp_path: Path
) -> None:
    videos = tmp_path / "videos"
    videos.mkdir()
    write_video(videos / "a-fine.mp4", 20, 64, 48, fps=FPS, seed=21)
    # with one keyframe, so that its decoder keeps it open (~0.3 s) long enough to be seen and killed
    poison = Path(
        write_frames(videos / "z-poison.mp4", pattern_frames(300, 160, 120, "noise", 22), FPS, gop=300)
    )
    killer = DecoderKiller(poison, b"DecodeVideos")  # Ray's decode actors
    killer.start()
    try:
        embed = run("embed", videos, tmp_path / "library", "--model", tiny_model, "--decoders", "1", "--json")
    finally:
        killer.done.set()
        killer.join()
    summary = embed.json()
    assert len(killer.killed) == DECODE_TRIES  # each try crashed a fresh decoder; none was tried again
    assert (summary["objects"], summary["ok"], summary["failed"]) == (2, 1, 1)
    assert summary["failures"] == [
        {
            "uri": str(poison.resolve()),
            "error": f"the decoder crashed on this video {DECODE_TRIES} times; not retried",
        }
    ]
    rows = rows_by_key(Library.open(str(tmp_path / "library")).table())
    assert sorted(uri.rsplit("/", 1)[-1] for uri, _ in rows) == ["a-fine.mp4", "z-poison.mp4"]
