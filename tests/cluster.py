"""A real multi-node Ray cluster on this machine, for end-to-end tests of jobs submitted to a cluster.

Each node is one ``ray start --block`` process with its own temp dir (nodes on one host that share a temp
dir collide on their sockets and start-up files): a head without CPUs that serves the dashboard and the Jobs
API (the jobs' drivers run there), and worker nodes of a few CPUs with labels, as cluster.yaml's node types.
Every free port a node would otherwise take by default (6379, 8265, 10001, 52365...) is chosen free, so the
cluster lives beside any other Ray on the machine.

Every process of the cluster inherits an environment marker naming the cluster's folder; stopping the
cluster kills, by pid, every process that carries it (the daemons, the raylets' workers, the jobs' drivers,
also those a killed raylet left behind) and nothing else. :class:`LocalCluster` is a context manager, so
that this happens when a test fails too.
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import psutil
from helpers import free_port

MARKER = "VIDEOSEARCH_TEST_CLUSTER"  # environment variable of every process of a test cluster: its folder
RAY = str(Path(sys.executable).with_name("ray"))
START_TIMEOUT = 120  # seconds for nodes to join
OBJECT_STORE_BYTES = 200 * 1024**2  # per node: the jobs move small frames; the default takes 30% of the RAM


@dataclass
class Node:
    """One node: its ``ray start --block`` process, parent of the node's daemons."""

    name: str
    cpus: float
    labels: dict[str, str]
    process: subprocess.Popen
    node_id: str = ""  # Ray's id, known once the node has joined

    def raylet(self) -> psutil.Process:
        return next(p for p in psutil.Process(self.process.pid).children() if p.name() == "raylet")


class LocalCluster:
    """A head (no CPUs, dashboard on 127.0.0.1) and worker nodes, every process stopped on exit.

    ``env``: the environment of every node (and so of the jobs' drivers and workers, plus what a job's
    runtime environment adds); the ``python`` of jobs' entrypoints is the first on its ``PATH``.
    """

    def __init__(self, env: Mapping[str, str]) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="vs-cluster-", dir="/tmp"))  # short: socket paths
        self.env = {**env, MARKER: str(self.root)}
        self.gcs_port, self.dashboard_port = free_port(), free_port()
        self.nodes: list[Node] = []

    @property
    def address(self) -> str:
        """The GCS address, as ``ray start --address`` and Ray's state API take it."""
        return f"127.0.0.1:{self.gcs_port}"

    @property
    def dashboard(self) -> str:
        """The dashboard's URL: the Jobs API."""
        return f"http://127.0.0.1:{self.dashboard_port}"

    def __enter__(self) -> LocalCluster:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.shutdown()

    def _start(self, name: str, cpus: float, labels: Mapping[str, str], *args: str) -> Node:
        temp_dir = self.root / name
        temp_dir.mkdir()
        command = [
            RAY, "start", "--block", "--disable-usage-stats",
            "--temp-dir", str(temp_dir),
            "--num-cpus", str(cpus),
            "--object-store-memory", str(OBJECT_STORE_BYTES),
            "--dashboard-agent-listen-port", str(free_port()),
            "--metrics-export-port", str(free_port()),
            *(["--labels", ",".join(f"{k}={v}" for k, v in labels.items())] if labels else []),
            *args,
        ]  # fmt: skip
        with open(self.root / f"{name}.log", "wb") as log:
            process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=self.env)
        node = Node(name, cpus, dict(labels), process)
        self.nodes.append(node)
        return node

    def start(self, workers: Mapping[str, tuple[float, Mapping[str, str]]]) -> None:
        """Start the head, then the ``workers`` (name -> CPUs, labels) together; return once all joined."""
        self._start(
            "head",
            0,
            {},
            "--head",
            "--port", str(self.gcs_port),
            "--include-dashboard", "true",
            "--dashboard-host", "127.0.0.1",
            "--dashboard-port", str(self.dashboard_port),
            "--ray-client-server-port", str(free_port()),
        )  # fmt: skip
        self._wait_joined()
        for name, (cpus, labels) in workers.items():
            self._start(name, cpus, labels, "--address", self.address)
        self._wait_joined()

    def add_node(self, name: str, cpus: float, labels: Mapping[str, str]) -> Node:
        """A worker node more (an autoscaler's replacement, say), once it has joined."""
        node = self._start(name, cpus, labels, "--address", self.address)
        self._wait_joined()
        return node

    def _wait_joined(self) -> None:
        """Wait until every running node is alive in the cluster; record the new nodes' ids."""
        from ray.job_submission import JobSubmissionClient
        from ray.util.state import list_nodes

        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            for node in self.nodes:
                if not node.node_id and node.process.poll() is not None:
                    raise RuntimeError(f"node {node.name} exited: see {self.root / node.name}.log")
                with contextlib.suppress(psutil.NoSuchProcess, StopIteration):  # its raylet is not up yet
                    node.node_id = node.node_id or _flag(node.raylet().cmdline(), "--node_id")
            running = {node.node_id for node in self.nodes if node.process.poll() is None}
            if all(node.node_id for node in self.nodes):
                with contextlib.suppress(ConnectionError):  # the dashboard is not up yet
                    JobSubmissionClient(self.dashboard)
                    if running <= {n.node_id for n in list_nodes(address=self.address) if n.state == "ALIVE"}:
                        return
            time.sleep(0.5)
        raise RuntimeError(f"the nodes did not all join in {START_TIMEOUT} s (logs: {self.root})")

    def node(self, node_id: str) -> Node:
        return next(node for node in self.nodes if node.node_id == node_id)

    def kill_raylet(self, node: Node) -> None:
        """SIGKILL the node's raylet: the node dies as when its machine is lost."""
        node.raylet().send_signal(signal.SIGKILL)

    def processes(self) -> list[psutil.Process]:
        """Every live process of this cluster (found by its environment marker)."""
        found = []
        for process in psutil.process_iter():
            try:
                if process.environ().get(MARKER) == str(self.root):
                    found.append(process)
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                continue
        return found

    def shutdown(self) -> None:
        """Kill every process of the cluster, by pid, and remove its folder (idempotent)."""
        for _ in range(3):  # a process may start while the others die (a worker, a restarting daemon)
            processes = [p for node in self.nodes for p in _tree(node.process.pid)] + self.processes()
            if not processes:
                break
            for process in processes:
                with contextlib.suppress(psutil.NoSuchProcess):
                    process.kill()
            psutil.wait_procs(processes, timeout=10)
        for node in self.nodes:
            node.process.wait(timeout=10)  # reaped: no zombie of ours
        shutil.rmtree(self.root, ignore_errors=True)


def _tree(pid: int) -> list[psutil.Process]:
    try:
        process = psutil.Process(pid)
        return [process, *process.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def _flag(cmdline: list[str], name: str) -> str:
    return next(arg.split("=", 1)[1] for arg in cmdline if arg.startswith(f"{name}="))
