"""Submitting the CLI's jobs to a Ray cluster through Ray's Jobs API, and following them.

A job runs the entry point ``jobs/<kind>.py`` (the CLI's command of that name, with its arguments) in a
runtime environment that carries two things (:func:`job_spec`):

- The code. By default the project is uploaded as the job's ``working_dir``: ``pipeline/``, ``xclip_core/``
  (with the bundled model) and ``jobs/``, about 21 MB, nothing else of the checkout (Ray refuses packages of
  512 MiB). The job then runs exactly the code that submitted it, whatever version the nodes have installed
  (they need its dependencies only: cluster.yaml's setup commands, an image), and Ray keeps uploads by
  content hash, so an unchanged project is sent once. ``installed=True`` uploads nothing and runs the nodes'
  own installation, ``python -m pipeline.cli <kind>`` (the call ``jobs/<kind>.py`` makes; an installed
  package has no ``jobs/``): for nodes that pin a release, and for a submitter that is an installed package.
- The storage settings: the AWS variables of the submitting environment (:data:`FORWARDED_ENV`) as the
  runtime environment's ``env_vars``, Ray's documented way (the job's storage flags are among its own
  arguments). Never in the entrypoint, which ``ray job list`` and the dashboard show and the job's log
  starts with. The runtime environment is kept by the cluster too (its dashboard shows it to whoever can
  reach it), so what ``videosearch jobs`` prints (:func:`describe`) leaves it out.

Ray is imported when a :class:`Jobs` is made, not with this module: the CLI imports it to parse arguments.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shlex
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

if TYPE_CHECKING:
    from ray.job_submission import JobDetails

# jobs/<kind>.py: the CLI's commands of those names
JOBS = ("embed", "refresh", "reindex", "check", "train", "eval")
UPLOADED = ("pipeline", "xclip_core", "jobs")  # the project's folders that a job's working_dir carries
FORWARDED_ENV = (
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_PROFILE",
    "AWS_REGION",
    "AWS_DEFAULT_REGION",
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
)
ADDRESS_ENV = ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS")  # in the order Ray's own CLI reads them
DEFAULT_ADDRESS = "http://127.0.0.1:8265"


class ClusterError(Exception):
    """The cluster cannot be reached or refuses a request (an unknown job, say); the message is one line."""


@dataclass(frozen=True)
class JobSpec:
    """What is submitted: the shell command the job runs, and its runtime environment."""

    kind: str
    entrypoint: str
    runtime_env: dict[str, Any] = field(repr=False)  # holds the forwarded credentials


def project_root() -> Path | None:
    """The checkout this package runs from (the folder of ``pipeline/`` and ``jobs/``); None when the
    package is installed."""
    root = Path(__file__).resolve().parents[2]
    return root if (root / "jobs").is_dir() else None


def job_spec(kind: str, args: Sequence[str], installed: bool = False) -> JobSpec:
    """The job that runs ``videosearch <kind> <args>`` on a cluster: this project uploaded, or with
    ``installed`` the nodes' installation; the AWS settings of this environment in its ``env_vars``."""
    if kind not in JOBS:
        raise ClusterError(f"unknown job {kind!r}: one of {', '.join(JOBS)}")
    env_vars = {name: os.environ[name] for name in FORWARDED_ENV if os.environ.get(name)}
    runtime_env: dict[str, Any] = {"env_vars": env_vars} if env_vars else {}
    if installed:
        return JobSpec(kind, shlex.join(["python", "-m", "pipeline.cli", kind, *args]), runtime_env)
    root = project_root()
    if root is None:
        raise ClusterError(
            "this videosearch is an installed package, not a checkout: there is no project to upload "
            "(pass --installed to run the nodes' installation)"
        )
    excludes = [f"/{path.name}" for path in sorted(root.iterdir()) if path.name not in UPLOADED]
    runtime_env.update(working_dir=str(root), excludes=[*excludes, "__pycache__", "*.pyc"])
    return JobSpec(kind, shlex.join(["python", f"jobs/{kind}.py", *args]), runtime_env)


def resolve_address(flag: str | None) -> str:
    """``--address``, else ``RAY_API_SERVER_ADDRESS``, else ``RAY_ADDRESS`` (as Ray's CLI), else the local
    dashboard."""
    return flag or next((os.environ[name] for name in ADDRESS_ENV if os.environ.get(name)), DEFAULT_ADDRESS)


def describe(details: JobDetails) -> dict[str, Any]:
    """What is shown of a job: never its runtime environment, which holds the forwarded credentials."""
    return {
        "submission_id": details.submission_id,
        "status": str(details.status),
        "message": details.message,
        "entrypoint": details.entrypoint,
        "start_time": details.start_time,  # milliseconds since the epoch
        "end_time": details.end_time,
        "driver_exit_code": details.driver_exit_code,
    }


def when(milliseconds: int | None) -> str:
    """A job's start or end time as local time, ``-`` when there is none (yet)."""
    if milliseconds is None:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(milliseconds / 1000))


def exit_code(details: JobDetails) -> int:
    """The exit status of a finished job as the CLI's commands report theirs: 0 when it succeeded, else its
    driver's exit code when it ended with one (1: nothing embedded or not published, 2: a usage or storage
    error), else 1 (stopped, killed, or its runtime environment could not be set up)."""
    if str(details.status) == "SUCCEEDED":
        return 0
    code = details.driver_exit_code
    return code if code is not None and 0 < code < 128 else 1


@contextlib.contextmanager
def _without(names: Sequence[str]) -> Iterator[None]:
    """These environment variables unset for the duration (Ray's client lets them override its address)."""
    saved = {name: os.environ.pop(name) for name in names if name in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)


class Jobs:
    """The Jobs API of the cluster whose dashboard is at ``address``; Ray's errors become
    :class:`ClusterError`."""

    def __init__(self, address: str) -> None:
        self.address = address
        with self._errors(), _without(ADDRESS_ENV):
            from ray.job_submission import JobSubmissionClient

            self.client = JobSubmissionClient(address)

    @contextlib.contextmanager
    def _errors(self, job_id: str | None = None) -> Iterator[None]:
        from ray.exceptions import RayError

        try:
            yield
        except ConnectionError:  # what Ray's client makes of a refused or failed connection
            raise ClusterError(f"cannot reach a Ray dashboard at {self.address}") from None
        except (
            OSError,
            RuntimeError,
            ValueError,
            RayError,
        ) as err:  # HTTP, network and authentication errors
            message = (str(err).strip() or type(err).__name__).splitlines()[0]
            if job_id is not None and "status code 404" in message:
                message = f"no job {job_id!r}"
            raise ClusterError(f"{self.address}: {message}") from None

    def submit(self, spec: JobSpec) -> str:
        """Submit ``spec`` (uploading the project first, when it carries it); the job's id."""
        # Ray's packaging advises excluding any file over 10 MiB (here, the bundled model) and says which
        # folders it leaves out by default (.git, .venv): noise, when the upload is the project's code
        packaging = logging.getLogger("ray._private.runtime_env")
        level = packaging.level
        packaging.setLevel(logging.ERROR)
        try:
            with self._errors():
                return self.client.submit_job(
                    entrypoint=spec.entrypoint,
                    runtime_env=spec.runtime_env,
                    submission_id=f"videosearch-{spec.kind}-{uuid.uuid4().hex[:12]}",
                )
        finally:
            packaging.setLevel(level)

    def list_jobs(self) -> list[JobDetails]:
        """Every job the cluster knows, oldest first."""
        with self._errors():
            return sorted(self.client.list_jobs(), key=lambda details: details.start_time or 0)

    def info(self, job_id: str) -> JobDetails:
        with self._errors(job_id):
            return self.client.get_job_info(job_id)

    def logs(self, job_id: str) -> str:
        with self._errors(job_id):
            return self.client.get_job_logs(job_id)

    def stop(self, job_id: str) -> bool:
        """Ask the job to stop; False when it had already ended."""
        with self._errors(job_id):
            return self.client.stop_job(job_id)

    def follow(self, job_id: str, out: TextIO) -> JobDetails:
        """Write the job's log to ``out`` as it grows, until the job ends; its details then."""

        async def tail() -> None:
            async for chunk in self.client.tail_job_logs(job_id):
                out.write(chunk)
                out.flush()

        with self._errors(job_id):
            asyncio.run(tail())
            return self.client.get_job_info(job_id)
