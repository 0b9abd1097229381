"""End to end: the CLI's jobs on a real multi-node Ray cluster on this machine (``tests/cluster.py``), through
Ray's Jobs API, with the videos and the libraries on the moto S3 server.

One cluster for the module, shaped as cluster.yaml's (small): a head without CPUs (dashboard, Jobs API, the
jobs' drivers) and worker nodes of one CPU each, two labelled for decoding and one for encoding. The nodes
have no AWS credentials of their own: a job reaches S3 only with what its runtime environment carries.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pytest
import s3fs
from cluster import LocalCluster
from helpers import CLI_TIMEOUT, MotoS3, Run, cli_env, videosearch, write_video

from pipeline import Library
from pipeline.cli import main
from pipeline.cluster.submit import FORWARDED_ENV, JOBS, job_spec
from pipeline.embed.stages.decode import DecodeSettings, DecodeVideos
from pipeline.embed.stages.encode import EncodeFrames
from pipeline.embed.stages.list import list_objects
from pipeline.models import load_model

if TYPE_CHECKING:
    from ray.job_submission import JobDetails

ROOT = Path(__file__).parents[2]
CLIPS = 8
STAGE = "videosearch-stage"  # the stage label of cluster.yaml's worker types
WORKERS = {"w1": (1, {STAGE: "decode"}), "w2": (1, {STAGE: "decode"}), "w3": (1, {STAGE: "encode"})}
STAGE_CLASSES = {"decode": "DecodeVideos", "encode": "EncodeFrames"}  # the stages' Ray Data actor classes
SECRET = f"secret-{uuid.uuid4().hex}"  # the submitter's AWS secret key: moto takes any


def cli(*args: str, env: dict[str, str] | None = None, timeout: float = CLI_TIMEOUT) -> Run:
    """``videosearch ARGS`` in ``env`` (default: the tests' CLI environment)."""
    return cli_all([list(args)], env, timeout)[0]


def cli_all(commands: list[list[str]], env: dict[str, str] | None = None, timeout: float = 120) -> list[Run]:
    """Several ``videosearch`` commands at once (most of each is Python's imports)."""
    started = time.monotonic()
    procs = [
        subprocess.Popen(
            videosearch(*args),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env or cli_env(),
        )
        for args in commands
    ]
    try:
        outputs = [proc.communicate(timeout=timeout) for proc in procs]
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()
    seconds = time.monotonic() - started
    return [
        Run(p.args, p.returncode, out, err, seconds) for p, (out, err) in zip(procs, outputs, strict=True)
    ]


def node_env() -> dict[str, str]:
    """The nodes' environment: the tests' CLI environment without AWS credentials, region or endpoint, and
    without a Ray address; this interpreter's ``python`` first on the PATH (jobs run ``python ...``)."""
    env = {k: v for k, v in cli_env().items() if k not in FORWARDED_ENV and k != "RAY_ADDRESS"}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.update(
        RAY_AUTH_MODE="disabled",  # whatever token ~/.ray holds: the tests' clients send none
        RAY_USAGE_STATS_ENABLED="0",
        RAY_health_check_period_ms="1000",  # a killed node is found dead in seconds
    )
    return env


@pytest.fixture(scope="module")
def cluster() -> Iterator[LocalCluster]:
    with LocalCluster(node_env()) as local:
        local.start(WORKERS)
        yield local


@pytest.fixture(scope="module")
def submitter(s3: MotoS3) -> dict[str, str]:
    """The submitting environment: the moto endpoint and credentials in the AWS variables (a secret key that
    must never be printed), and RAY_ADDRESS=local, which ``--address`` must win over."""
    return {**cli_env(), "AWS_SECRET_ACCESS_KEY": SECRET, "AWS_ENDPOINT_URL": s3.endpoint_url}


@pytest.fixture(scope="module")
def videos(s3: MotoS3, tmp_path_factory: pytest.TempPathFactory) -> str:
    """A prefix of short clips (2 s at 10 fps) on the moto server."""
    bucket = s3.make_bucket("cluster")
    fs = s3fs.S3FileSystem(endpoint_url=s3.endpoint_url, skip_instance_cache=True)
    directory = tmp_path_factory.mktemp("cluster-clips")
    for i in range(CLIPS):
        clip = write_video(directory / f"{i}.mp4", 20, 48, 40, fps=10, seed=i)
        fs.put_file(clip, f"{bucket}/videos/{i}.mp4")
    return f"s3://{bucket}/videos/"


@pytest.fixture(scope="module")
def submitted(cluster: LocalCluster, videos: str, submitter: dict[str, str]) -> tuple[Run, str]:
    """``videosearch submit embed --precision bf16`` to the cluster, and the library it writes."""
    library = videos.replace("/videos/", "/library-submit")
    command = ["submit", "embed", videos, library, "--precision", "bf16", "--address", cluster.dashboard]
    return cli(*command, env=submitter), library


def job_details(cluster: LocalCluster, job_id: str) -> JobDetails:
    from ray.job_submission import JobSubmissionClient

    return JobSubmissionClient(cluster.dashboard).get_job_info(job_id)


def job_actors(cluster: LocalCluster, job_id: str) -> list:
    """The actors of a submitted job, from Ray's state API (none before its driver starts)."""
    from ray.util.state import list_actors

    ray_job_id = job_details(cluster, job_id).job_id
    filters = [("job_id", "=", ray_job_id)]
    return list_actors(address=cluster.address, filters=filters, detail=True) if ray_job_id else []


def stage_actors(cluster: LocalCluster, job_id: str) -> dict[str, list]:
    """The actors of each stage of a submitted job."""
    actors = job_actors(cluster, job_id)
    return {
        stage: [a for a in actors if a.class_name == f"MapWorker(MapBatches({name}))"]
        for stage, name in STAGE_CLASSES.items()
    }


def summary_placement(log: str) -> dict[str, Counter]:
    """The summary's placement line: "placement: decode on 2 nodes (IP id: n, ...), encode on 1 node (...)"
    as stage -> node -> actors."""
    line = next(line for line in log.splitlines() if line.strip().startswith("placement: "))
    return {
        stage: Counter({node: int(n) for node, n in re.findall(r"([\d.]+ \w+): (\d+)", nodes)})
        for stage, nodes in re.findall(r"(\w+) on \d+ nodes? \(([^)]*)\)", line)
    }


def assert_placement(cluster: LocalCluster, job_id: str, log: str, by_label: bool) -> None:
    """Every stage actor of the job started, on a worker node whose CPUs it fits; with ``by_label``, on a
    node labelled for its stage, else the stages on separate nodes; the job's summary says where."""
    from ray.util.state import list_nodes

    nodes = {node.node_id: node for node in list_nodes(address=cluster.address, detail=True)}
    placement = {}
    for stage, actors in stage_actors(cluster, job_id).items():
        assert actors, f"no {stage} actor"
        for actor in actors:
            node = nodes[actor.node_id]
            assert actor.pid and not node.is_head_node, (stage, actor)
            assert actor.required_resources.get("CPU", 0) <= cluster.node(actor.node_id).cpus, (stage, actor)
            if by_label:
                assert node.labels.get(STAGE) == stage, (stage, node.labels)
        placement[stage] = Counter(f"{nodes[a.node_id].node_ip} {a.node_id[:8]}" for a in actors)
    if not by_label:
        assert not set(placement["decode"]) & set(placement["encode"])
    assert summary_placement(log) == placement


def assert_every_object_once(library: str, s3: MotoS3) -> None:
    table = Library.open(library, s3.options).table(["uri", "error"]).to_pylist()
    assert sorted(row["uri"].rsplit("/", 1)[-1] for row in table) == sorted(f"{i}.mp4" for i in range(CLIPS))
    assert [row["error"] for row in table] == [None] * CLIPS


def test_a_job_carries_the_project_and_the_credentials_off_its_command_line(monkeypatch) -> None:
    assert sorted(JOBS) == sorted(path.stem for path in (ROOT / "jobs").glob("*.py"))
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    spec = job_spec("embed", ["s3://b/videos/", "s3://b/library", "--segment", "2"])
    assert spec.entrypoint == "python jobs/embed.py s3://b/videos/ s3://b/library --segment 2"
    assert spec.runtime_env["env_vars"]["AWS_SECRET_ACCESS_KEY"] == SECRET
    assert SECRET not in repr(spec)
    assert spec.runtime_env["working_dir"] == str(ROOT)
    assert {"/.venv", "/.git", "/tests", "/bench"} <= set(spec.runtime_env["excludes"])
    assert not {"/pipeline", "/xclip_core", "/jobs"} & set(spec.runtime_env["excludes"])
    installed = job_spec("refresh", ["a", "b"], installed=True)
    assert installed.entrypoint == "python -m pipeline.cli refresh a b"
    assert installed.runtime_env == {"env_vars": spec.runtime_env["env_vars"]}


def test_submit_runs_the_job_on_the_cluster_and_exits_as_it(
    cluster: LocalCluster, submitted: tuple[Run, str], s3: MotoS3, submitter: dict[str, str]
) -> None:
    done, library = submitted
    assert done.code == 0, done.stderr[-4000:]
    job_id = done.stdout.strip()
    assert job_id.startswith("videosearch-embed-") and "\n" not in job_id  # stdout: the job's id alone
    assert f"{CLIPS} objects, {CLIPS} embedded" in done.stderr and "SUCCEEDED" in done.stderr
    assert_every_object_once(library, s3)
    assert_placement(cluster, job_id, done.stderr, by_label=True)
    checked = cli("submit", "check", library, "--address", cluster.dashboard, env=submitter)
    assert checked.code == 0 and "no problems" in checked.stderr, checked.stderr[-4000:]


def test_the_jobs_encoders_ran_in_the_precision_it_was_given(
    submitted: tuple[Run, str], videos: str, s3: MotoS3
) -> None:
    """The job's ``--precision bf16`` reached its encoders on the cluster: its embeddings are the bundled
    model's in bfloat16 on the same frames, not float32's."""
    _, library = submitted
    stored = Library.open(library, s3.options).table(["uri", "embedding"]).to_pylist()
    listed = list_objects(videos, s3.options)
    model = load_model(None)
    decode = DecodeVideos(DecodeSettings(model.num_frames, model.preprocessor), s3.options)
    (decoded,) = decode({name: np.array([row[name] for row in listed], dtype=object) for name in listed[0]})
    by_uri = {row["uri"]: row["embedding"] for row in stored}
    got = np.stack([by_uri[uri] for uri in decoded["uri"]])
    expected = {
        p: EncodeFrames(None, device="cpu", precision=p)(decoded)["embedding"] for p in ("bf16", "fp32")
    }
    np.testing.assert_allclose(got, expected["bf16"], atol=2e-4, rtol=0)
    assert np.abs(got - expected["fp32"]).max() > 5e-4


def test_credentials_never_appear_in_output(
    cluster: LocalCluster, submitted: tuple[Run, str], capsys: pytest.CaptureFixture
) -> None:
    done, _ = submitted
    job_id = done.stdout.strip()
    forwarded = job_details(cluster, job_id).runtime_env["env_vars"]
    assert forwarded["AWS_SECRET_ACCESS_KEY"] == SECRET  # on the cluster, the job's to use
    assert SECRET not in done.stdout + done.stderr
    outputs = {}
    for command in (["list"], ["list", "--json"], ["status", job_id], ["status", job_id, "--json"]):
        assert main(["jobs", *command, "--address", cluster.dashboard]) == 0
        out, err = capsys.readouterr()
        assert SECRET not in out + err, command
        outputs[" ".join(command)] = out
    assert job_id in outputs["list"] and "SUCCEEDED" in outputs["list"]
    status = json.loads(outputs[f"status {job_id} --json"])
    assert status["status"] == "SUCCEEDED" and status["driver_exit_code"] == 0
    assert "AWS" not in status["entrypoint"]


def test_rays_own_job_submit_runs_the_entry_point(cluster: LocalCluster, videos: str, s3: MotoS3) -> None:
    """The documented ``ray job submit --working-dir . -- python jobs/embed.py``, with the stage labels
    ignored (``--stage-label ''``): the plan then gives each stage nodes of its own."""
    library, job_id = videos.replace("/videos/", "/library-ray"), f"ray-cli-{uuid.uuid4().hex[:8]}"
    credentials = {name: cli_env()[name] for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")}
    runtime_env = {"env_vars": {**credentials, "AWS_ENDPOINT_URL": s3.endpoint_url}}
    command = [
        str(Path(sys.executable).with_name("ray")), "job", "submit",
        "--address", cluster.dashboard,
        "--submission-id", job_id,
        "--working-dir", ".",
        "--runtime-env-json", json.dumps(runtime_env),
        "--", "python", "jobs/embed.py", videos, library, "--stage-label", "",
    ]  # fmt: skip
    env = {k: v for k, v in cli_env().items() if k != "RAY_ADDRESS"}
    done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=ROOT, timeout=CLI_TIMEOUT)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    assert_every_object_once(library, s3)
    logs = cli("jobs", "logs", job_id, "--address", cluster.dashboard)
    assert f"{CLIPS} objects, {CLIPS} embedded" in logs.stdout
    assert_placement(cluster, job_id, logs.stdout, by_label=False)


def test_a_job_survives_the_loss_of_a_node(
    cluster: LocalCluster, videos: str, submitter: dict[str, str], s3: MotoS3
) -> None:
    """A decode node's raylet is killed while the job's decoders run; a node of its kind replaces it (as an
    autoscaler would): the job succeeds and the library holds every object exactly once. The job runs the
    nodes' installation (``--installed``: this checkout, installed in the tests' environment)."""
    library = videos.replace("/videos/", "/library-lost-node")
    submit = ["submit", "--no-wait", "--installed", "--address", cluster.dashboard, "embed", videos, library]
    started = cli(*submit, env=submitter)
    assert started.code == 0, started.stderr
    job_id = started.stdout.strip()
    deadline = time.monotonic() + CLI_TIMEOUT
    while not (
        decoding := {a.node_id for a in stage_actors(cluster, job_id)["decode"] if a.state == "ALIVE"}
    ):
        assert time.monotonic() < deadline, "no decoder started"
        time.sleep(0.2)
    # of the nodes that decode, the one whose loss costs the job most: the most actors of the job
    actors = Counter(actor.node_id for actor in job_actors(cluster, job_id) if actor.state == "ALIVE")
    lost = cluster.node(max(decoding, key=actors.__getitem__))
    cluster.kill_raylet(lost)
    cluster.add_node("w4", lost.cpus, lost.labels)
    followed = cli("jobs", "logs", job_id, "--follow", "--address", cluster.dashboard)
    assert followed.code == 0, followed.stdout[-4000:]
    assert_every_object_once(library, s3)
    assert_placement(cluster, job_id, followed.stdout, by_label=True)  # a restarted decoder where it reran


def test_submit_exits_with_the_jobs_own_status(
    cluster: LocalCluster, videos: str, submitter: dict[str, str]
) -> None:
    """A job that fails as the CLI's command would (a source that lists nothing: exit 2) makes ``submit``
    exit 2 too, after the job's log, which says why."""
    empty = videos.replace("/videos/", "/nothing-here/")
    done = cli("submit", "embed", empty, empty + "library", "--address", cluster.dashboard, env=submitter)
    assert done.code == 2, done.stderr[-4000:]
    assert "nothing to embed" in done.stderr and "FAILED" in done.stderr


def test_errors_at_the_edge_are_one_line(cluster: LocalCluster, closed_endpoint: str) -> None:
    commands = {
        "unreachable": ["submit", "embed", "s3://b/v/", "s3://b/l", "--address", closed_endpoint],
        "unknown job": ["jobs", "status", "no-such-job", "--address", cluster.dashboard],
        "unknown logs": ["jobs", "logs", "no-such-job", "--follow", "--address", cluster.dashboard],
        "unknown kind": ["submit", "index", "s3://b/v/", "--address", cluster.dashboard],
    }
    runs = dict(zip(commands, cli_all(list(commands.values())), strict=True))
    for what, run in runs.items():
        assert run.code == 2 and len(run.stderr.strip().splitlines()) == 1, (what, run.stderr)
        assert "Traceback" not in run.stderr and run.stdout == "", what
    assert "cannot reach" in runs["unreachable"].stderr
    assert "no job 'no-such-job'" in runs["unknown job"].stderr
    assert "unknown job 'index'" in runs["unknown kind"].stderr


def test_the_library_answers_after_the_cluster_is_gone(
    cluster: LocalCluster, submitted: tuple[Run, str], videos: str, s3: MotoS3
) -> None:
    _, library = submitted
    cluster.shutdown()
    assert cluster.processes() == []
    query = cli("query", library, "a red square", "-k", "3", "--json", "--endpoint-url", s3.endpoint_url)
    hits = query.json()
    assert len(hits) == 3 and all(hit["uri"].startswith(videos) for hit in hits)
