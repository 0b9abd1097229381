"""``videosearch submit`` and ``videosearch jobs``: the CLI's jobs on a Ray cluster, through its Jobs API.

``submit JOB ARGS`` prints the job's id on stdout, then (unless ``--no-wait``) streams the job's log to
stderr and exits as the job did (:func:`~pipeline.cluster.submit.exit_code`). Its own flags may come before
JOB or among ARGS (``videosearch submit embed SRC LIB --address http://HEAD:8265``); everything else is
JOB's, so a job's ``--address`` (which a job does not need: it runs on the cluster) cannot be passed.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from typing import TextIO

from .submit import JOBS, Jobs, describe, exit_code, job_spec, resolve_address, when


def _address_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--address",
        metavar="URL",
        help="the cluster's dashboard, http://HEAD:8265 (default: $RAY_API_SERVER_ADDRESS, $RAY_ADDRESS, "
        "else http://127.0.0.1:8265)",
    )


def _submit_flags(parser: argparse.ArgumentParser) -> None:
    _address_flag(parser)
    parser.add_argument(
        "--no-wait", action="store_true", help="print the job's id and return (default: follow it to its end)"
    )
    parser.add_argument(
        "--installed",
        action="store_true",
        help="run the nodes' installed videosearch (default: upload this project's pipeline/, xclip_core/ "
        "and jobs/ as the job's working_dir)",
    )


def add_commands(commands: argparse._SubParsersAction) -> None:
    """Register ``submit`` and ``jobs`` with the CLI's subcommands."""
    submit = commands.add_parser(
        "submit",
        help=f"run {', '.join(JOBS)} as a job on a Ray cluster (Jobs API), following its log",
        description="Submit jobs/JOB.py with ARGS to a Ray cluster; the AWS_* settings of this environment "
        "travel in the job's runtime environment, never on its command line. Exit status: the job's (0 "
        "succeeded, 1 failed, 2 usage or storage error), or 2 when the cluster cannot be reached.",
    )
    _submit_flags(submit)
    submit.add_argument("job", metavar="JOB", help=", ".join(JOBS))
    submit.add_argument(
        "job_args", nargs=argparse.REMAINDER, metavar="ARGS", help="JOB's arguments, as `videosearch JOB`"
    )

    jobs = commands.add_parser("jobs", help="the jobs of a Ray cluster: list, status, logs, stop")
    actions = jobs.add_subparsers(dest="action", required=True, metavar="ACTION")
    listing = actions.add_parser("list", help="every job: id, status, start time, command")
    status = actions.add_parser("status", help="a job's status, times and exit code")
    logs = actions.add_parser("logs", help="a job's log")
    stop = actions.add_parser("stop", help="stop a running job")
    for parser in (status, logs, stop):
        parser.add_argument("id", help="the job's id, as submit printed it")
    for parser in (listing, status, logs, stop):
        _address_flag(parser)
    for parser in (listing, status):
        parser.add_argument("--json", action="store_true", help="print as JSON")
    logs.add_argument(
        "--follow", action="store_true", help="follow the log to the job's end, and exit as the job did"
    )


def run_submit(args: argparse.Namespace, out: TextIO, check: Callable[[str, list[str]], None]) -> int:
    """Submit the job, once ``check(JOB, ARGS)`` (the CLI's own parsing of the job's arguments) passed; follow
    its log on stderr to its end unless ``--no-wait``."""
    own = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    _submit_flags(own)
    _, job_args = own.parse_known_args(args.job_args, namespace=args)  # submit's flags among the job's
    if args.job in JOBS:  # an unknown one is refused by job_spec, naming the jobs there are
        check(args.job, job_args)
    spec = job_spec(args.job, job_args, args.installed)
    jobs = Jobs(resolve_address(args.address))
    job_id = jobs.submit(spec)
    print(job_id, file=out, flush=True)
    if args.no_wait:
        return 0
    print(f"videosearch submit: job {job_id} submitted to {jobs.address}; its log:", file=sys.stderr)
    try:
        details = jobs.follow(job_id, sys.stderr)
    except KeyboardInterrupt:
        print(f"videosearch submit: job {job_id} goes on (videosearch jobs stop {job_id})", file=sys.stderr)
        return 130
    print(f"videosearch submit: job {job_id} {details.status}: {details.message}", file=sys.stderr)
    return exit_code(details)


def _status_text(job: dict) -> str:
    return (
        f"{job['submission_id']}: {job['status']} ({job['message']})\n"
        f"  command: {job['entrypoint']}\n"
        f"  started {when(job['start_time'])}, ended {when(job['end_time'])}, "
        f"exit code {'-' if job['driver_exit_code'] is None else job['driver_exit_code']}"
    )


def run_jobs(args: argparse.Namespace, out: TextIO) -> int:
    """``jobs list|status|logs|stop``."""
    jobs = Jobs(resolve_address(args.address))
    if args.action == "list":
        listed = [describe(details) for details in jobs.list_jobs()]
        if args.json:
            print(json.dumps(listed, indent=2), file=out)
        else:
            for job in listed:
                started = when(job["start_time"])
                print(f"{job['submission_id']}  {job['status']:9}  {started}  {job['entrypoint']}", file=out)
        return 0
    if args.action == "status":
        job = describe(jobs.info(args.id))
        print(json.dumps(job, indent=2) if args.json else _status_text(job), file=out)
        return 0
    if args.action == "logs":
        if not args.follow:
            out.write(jobs.logs(args.id))
            return 0
        jobs.info(args.id)  # an unknown id fails here, in one line
        return exit_code(jobs.follow(args.id, out))
    stopped = jobs.stop(args.id)
    print(f"{args.id}: {'stop requested' if stopped else 'not running'}", file=out)
    return 0
