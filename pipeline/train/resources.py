"""How the train job sizes its actors on a cluster's alive nodes (no Ray here: the job passes the nodes).

The job runs in two phases that never overlap: the decode stage's actor pool decodes every clip once (the
clips are materialized in the object store), then Ray Train's workers train on them. So each phase may use
every node. As in the embed plan (:mod:`pipeline.embed.resources`), sizes come from nodes, never from the
cluster's total: an actor never asks for more than a node offers, and ``workers`` actors of one size fit the
alive nodes at once (Ray Train starts them together and waits for all).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..embed.resources import EPS, Node, actor_hosts


@dataclass(frozen=True)
class TrainResources:
    decoders: int
    cpus_per_decoder: float
    cpus_per_worker: float


def train_resources(
    nodes: list[Node], workers: int, use_gpu: bool = False, cpus_per_worker: float | None = None
) -> TrainResources:
    """Decoders of one CPU each (less when no node has one) on every node, and the CPUs of each of
    ``workers`` training workers: ``cpus_per_worker`` when given, else the most that lets all of them run
    at once, on the nodes with a GPU each when ``use_gpu``.

    Raises ``ValueError`` when the workers cannot all run at once, with the numbers a user can change.
    """
    hosts = actor_hosts(nodes)
    cpus_per_decoder = min(1.0, max(node.cpus for node in hosts))
    decoders = sum(int(node.cpus / cpus_per_decoder + EPS) for node in hosts)
    if use_gpu:
        hosts = [node for node in hosts if node.gpus >= 1]
        if not hosts:
            raise ValueError("--gpu needs a node with a GPU, and no alive node has one")
    gpu_slots = {id(node): int(node.gpus + EPS) if use_gpu else workers for node in hosts}

    def fitting(cpus: float) -> int:
        """How many workers of ``cpus`` CPUs the hosts run at once."""
        return sum(min(gpu_slots[id(node)], int(node.cpus / cpus + EPS)) for node in hosts)

    if cpus_per_worker is None:
        # the largest share of some node that still fits every worker (one share per worker on a node)
        shares = {
            math.floor(node.cpus / k * 100 + EPS) / 100 for node in hosts for k in range(1, workers + 1)
        }
        fits = [cpus for cpus in shares if cpus > 0 and fitting(cpus) >= workers]  # Ray's are decimals
        if not fits:
            raise ValueError(_too_many(workers, hosts, use_gpu))
        cpus_per_worker = max(fits)
    elif fitting(cpus_per_worker) < workers:
        raise ValueError(
            f"{workers} workers of {cpus_per_worker:g} CPUs do not fit the alive nodes at once "
            f"({_nodes_text(hosts)}): lower --cpus-per-worker or --workers"
        )
    return TrainResources(decoders, cpus_per_decoder, cpus_per_worker)


def _too_many(workers: int, hosts: list[Node], use_gpu: bool) -> str:
    if use_gpu:
        gpus = sum(int(node.gpus + EPS) for node in hosts)
        return f"{workers} GPU workers need a GPU each, and the alive nodes have {gpus}: lower --workers"
    return f"{workers} workers do not fit the alive nodes at once ({_nodes_text(hosts)}): lower --workers"


def _nodes_text(hosts: list[Node]) -> str:
    return ", ".join(f"{node.cpus:g} CPU" + (f" {node.gpus:g} GPU" if node.gpus else "") for node in hosts)
