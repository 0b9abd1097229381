"""How the train job sizes its decoders and Ray Train workers on a cluster's nodes (train.resources)."""

from __future__ import annotations

import pytest

from pipeline.embed.resources import Node
from pipeline.train.resources import train_resources


def fits_at_once(nodes: list[Node], workers: int, cpus: float, use_gpu: bool = False) -> bool:
    """Whether ``workers`` actors of ``cpus`` CPUs (and a GPU each with ``use_gpu``) all find a node."""
    left = [[node.cpus, node.gpus] for node in nodes]
    for _ in range(workers):
        room = [r for r in left if r[0] >= cpus - 1e-9 and (not use_gpu or r[1] >= 1)]
        if not room:
            return False
        room[0][0] -= cpus
        room[0][1] -= 1 if use_gpu else 0
    return True


@pytest.mark.parametrize(
    ("cpus", "workers", "expected"),
    [
        ((2, 2, 2), 1, 2.0),  # one worker: a whole node, never the cluster's 6 CPUs
        ((2, 2, 2), 3, 2.0),
        ((2, 2, 2), 4, 1.0),
        ((1, 1, 1), 4, 0.5),
        ((1, 2, 4), 2, 2.0),
        ((1, 2, 4), 3, 2.0),
        ((1, 2, 4), 4, 1.33),
        ((0, 4), 2, 2.0),  # a head without CPUs hosts nothing
    ],
)
def test_workers_get_the_largest_share_that_runs_them_all_at_once(
    cpus: tuple[float, ...], workers: int, expected: float
) -> None:
    nodes = [Node(cpus=c) for c in cpus]
    sizes = train_resources(nodes, workers)
    assert sizes.cpus_per_worker == pytest.approx(expected)
    assert fits_at_once(nodes, workers, sizes.cpus_per_worker)


def test_decoders_fill_every_node_one_cpu_each() -> None:
    sizes = train_resources([Node(cpus=0), Node(cpus=1.5), Node(cpus=2)], workers=1)
    assert (sizes.decoders, sizes.cpus_per_decoder) == (3, 1.0)
    small = train_resources([Node(cpus=0.5), Node(cpus=0.5)], workers=1)
    assert (small.decoders, small.cpus_per_decoder) == (2, 0.5)


def test_gpu_workers_go_on_the_gpu_nodes() -> None:
    nodes = [Node(cpus=16), Node(cpus=8, gpus=2), Node(cpus=4, gpus=1)]
    sizes = train_resources(nodes, workers=3, use_gpu=True)
    assert fits_at_once(nodes, 3, sizes.cpus_per_worker, use_gpu=True)
    assert sizes.cpus_per_worker == pytest.approx(4.0)
    with pytest.raises(ValueError, match="3 GPU workers need a GPU each, and the alive nodes have 1"):
        train_resources([Node(cpus=8, gpus=1)], workers=3, use_gpu=True)
    with pytest.raises(ValueError, match="no alive node has one"):
        train_resources([Node(cpus=8)], workers=1, use_gpu=True)


def test_asked_cpus_that_cannot_all_run_are_refused_with_the_nodes() -> None:
    nodes = [Node(cpus=2), Node(cpus=2)]
    assert train_resources(nodes, workers=2, cpus_per_worker=2).cpus_per_worker == 2
    with pytest.raises(ValueError, match=r"2 workers of 3 CPUs do not fit .*2 CPU, 2 CPU.*--cpus-per-worker"):
        train_resources(nodes, workers=2, cpus_per_worker=3)
