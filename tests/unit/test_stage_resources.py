"""How the embed plan places the decode and encode stages on a cluster's nodes (resources.stage_resources).

Every plan is checked as Ray would run it: each actor is put on a node that its label selector admits and
that has room, in several orders (Ray places actors in whatever order they come), and the writer's tasks
must still find room somewhere.
"""

from __future__ import annotations

import random
import re

import pytest

from pipeline.embed.options import EmbedOptions, EmbedSummary
from pipeline.embed.resources import (
    GPU_ENCODER_CPUS,
    NODE_ID_LABEL,
    WRITE_CPUS,
    Node,
    StageResources,
    share_cpus,
    stage_resources,
)

OPTIONS = EmbedOptions(model="unused")
TINY = (0.075, 0.025)  # one video's decode and encode seconds: the bundled model (decode-bound)
BASE = (0.075, 2.0)  # base-patch32 (encode-bound)
KEY = OPTIONS.stage_label


def not_timed() -> tuple[float, float]:
    raise AssertionError("this plan needs no CPU timings")


def cpu_nodes(*cpus: float) -> list[Node]:
    return [Node(cpus=c, node_id=f"cpu{i}") for i, c in enumerate(cpus)]


def gpu_nodes(count: int, cpus: float = 8, gpus: float = 1) -> list[Node]:
    return [Node(cpus=cpus, gpus=gpus, node_id=f"gpu{i}") for i in range(count)]


def admits(node: Node, selector: dict[str, str]) -> bool:
    """Ray's label selector: ``value``, ``!value``, ``in(a,b)``, ``!in(a,b)``; ``!`` admits a node without
    the label."""
    labels = {**node.labels, NODE_ID_LABEL: node.node_id}
    for key, condition in selector.items():
        negated, values = condition.startswith("!"), condition.lstrip("!")
        match = re.fullmatch(r"in\((.*)\)", values)
        wanted = set(match.group(1).split(",")) if match else {values}
        if (labels.get(key) in wanted) == negated:
            return False
    return True


def place(nodes: list[Node], stages: StageResources, order: str, rng: random.Random | None = None) -> bool:
    """Whether every actor finds a node (first fit, or a random fit with ``rng``), decoders or encoders
    first as ``order`` says, and the writer's tasks then find room."""
    cpus = [node.cpus for node in nodes]
    gpus = [node.gpus for node in nodes]
    decoders = [("decode", stages.cpus_per_decoder, 0.0, stages.decode_selector)] * stages.decoders
    encoders = [
        ("encode", stages.cpus_per_encoder, stages.gpus_per_encoder, stages.encode_selector)
    ] * stages.encoders
    actors = decoders + encoders if order == "decoders first" else encoders + decoders
    if order == "shuffled":
        rng = rng or random.Random(0)
        rng.shuffle(actors)
    for _, cpu, gpu, selector in actors:
        fits = [
            i
            for i, node in enumerate(nodes)
            if admits(node, selector) and cpus[i] >= cpu - 1e-9 and gpus[i] >= gpu - 1e-9
        ]
        if not fits:
            return False
        i = rng.choice(fits) if rng else fits[0]
        cpus[i] -= cpu
        gpus[i] -= gpu
    return max(cpus) >= WRITE_CPUS - 1e-9


def assert_places(nodes: list[Node], stages: StageResources, any_order: bool = True) -> None:
    """The plan's actors fit their nodes, each stage at least one, and they pack (in any order)."""
    assert stages.decoders >= 1 and stages.encoders >= 1
    largest = max(node.cpus for node in nodes)
    assert 0 < stages.cpus_per_decoder <= 1 and stages.cpus_per_encoder <= largest
    assert place(nodes, stages, "encoders first")
    if any_order:
        assert place(nodes, stages, "decoders first")
        rng = random.Random(0)
        assert all(place(nodes, stages, "shuffled", rng) for _ in range(50))


def stage_nodes(nodes: list[Node], selector: dict[str, str]) -> list[str]:
    return [node.node_id for node in nodes if admits(node, selector)]


# ---------------------------------------------------------------------------------------------- one node


def test_a_gpu_encoder_leaves_every_other_cpu_to_decoders() -> None:
    nodes = [Node(cpus=16, gpus=1)]
    stages = stage_resources(nodes, objects=1000, options=OPTIONS, timings=not_timed)
    assert (stages.encoders, stages.gpus_per_encoder, stages.encoder_device) == (1, 1, "cuda")
    assert stages.cpus_per_encoder == GPU_ENCODER_CPUS and stages.cpus_per_decoder == 1
    assert stages.decoders == 14  # 16 CPUs - 1 for the encoder - 0.1 for the writer, whole decoders
    assert stages.decode_selector == stages.encode_selector == {}  # one node: everything on it
    assert_places(nodes, stages)


def test_one_encoder_per_gpu_share() -> None:
    four = stage_resources([Node(cpus=32, gpus=4)], objects=1000, options=OPTIONS, timings=not_timed)
    assert (four.encoders, four.decoders) == (4, 27)
    halves = EmbedOptions(model="unused", gpus_per_encoder=0.5)
    assert stage_resources([Node(cpus=32, gpus=4)], 1000, halves, timings=not_timed).encoders == 8


def test_gpus_per_encoder_zero_plans_cpu_encoders_where_gpus_exist() -> None:
    timed = []

    def timings() -> tuple[float, float]:
        timed.append(True)
        return 0.1, 0.1

    options = EmbedOptions(model="unused", gpus_per_encoder=0)
    stages = stage_resources([Node(cpus=8, gpus=1)], objects=1000, options=options, timings=timings)
    assert timed and stages.encoder_device == "cpu" and stages.gpus_per_encoder == 0
    assert stages.decoders * stages.cpus_per_decoder + stages.encoders * stages.cpus_per_encoder <= 8


@pytest.mark.parametrize("cpus", [2, 4, 16])
@pytest.mark.parametrize("timed", [TINY, BASE], ids=["tiny", "base"])
def test_one_cpu_node_is_shared_by_the_measured_costs(cpus: int, timed: tuple[float, float]) -> None:
    nodes = [Node(cpus=cpus, node_id="only")]
    stages = stage_resources(nodes, objects=1000, options=OPTIONS, timings=lambda: timed)
    shares = share_cpus(cpus, *timed, reserved=WRITE_CPUS)  # what a single node always got
    assert (stages.decoders, stages.encoders) == (shares.decoders, 1)
    assert stages.cpus_per_decoder == pytest.approx(shares.cpus_per_decoder)
    assert stages.cpus_per_encoder == pytest.approx(shares.cpus_per_encoder)
    assert stages.decode_selector == stages.encode_selector == {}
    assert_places(nodes, stages)


def test_more_encoders_than_a_small_node_has_halves_for_are_shrunk_to_fit() -> None:
    nodes = [Node(cpus=1)]
    asked = EmbedOptions(model="unused", encoders=3)
    stages = stage_resources(nodes, objects=10, options=asked, timings=lambda: TINY)
    assert stages.encoders == 3
    assert_places(nodes, stages)


@pytest.mark.parametrize("gpus", [0, 1])
def test_never_more_decoders_than_objects(gpus: int) -> None:
    nodes = [Node(cpus=16, gpus=gpus)]
    stages = stage_resources(nodes, objects=3, options=OPTIONS, timings=lambda: (0.1, 0.01))
    assert stages.decoders == 3
    asked = EmbedOptions(model="unused", decoders=8)
    assert stage_resources(nodes, objects=5, options=asked, timings=lambda: (0.1, 0.01)).decoders == 5
    assert stage_resources(nodes, objects=50, options=asked, timings=lambda: (0.1, 0.01)).decoders == 8


# ------------------------------------------------------------------------------------------- CPU clusters


def test_three_one_cpu_nodes_give_each_stage_whole_nodes() -> None:
    nodes = cpu_nodes(1, 1, 1)
    tiny = stage_resources(nodes, objects=1000, options=OPTIONS, timings=lambda: TINY)
    assert (tiny.encoders, tiny.decoders, tiny.cpus_per_decoder) == (1, 2, 1.0)  # decode-bound: 2 decode
    assert tiny.cpus_per_encoder == pytest.approx(1 - WRITE_CPUS)
    base = stage_resources(nodes, objects=1000, options=OPTIONS, timings=lambda: BASE)
    assert (base.encoders, base.decoders) == (2, 1)  # encode-bound: 2 nodes encode
    for stages in (tiny, base):
        assert_places(nodes, stages)
        assert not set(stage_nodes(nodes, stages.decode_selector)) & set(
            stage_nodes(nodes, stages.encode_selector)
        )


def test_nodes_of_1_2_and_4_cpus() -> None:
    nodes = cpu_nodes(1, 2, 4)
    tiny = stage_resources(nodes, objects=1000, options=OPTIONS, timings=lambda: TINY)
    assert stage_nodes(nodes, tiny.encode_selector) == ["cpu1"]  # 1.9 CPUs encode what 5 decoders decode
    assert stage_nodes(nodes, tiny.decode_selector) == ["cpu0", "cpu2"]
    assert (tiny.encoders, tiny.decoders) == (1, 5)
    base = stage_resources(nodes, objects=1000, options=OPTIONS, timings=lambda: BASE)
    assert stage_nodes(nodes, base.encode_selector) == ["cpu2"]  # the largest node encodes
    assert (base.encoders, base.decoders) == (1, 3)
    for stages in (tiny, base):
        assert_places(nodes, stages)


def test_a_head_without_cpus_hosts_nothing() -> None:
    head = Node(cpus=0, node_id="head")
    alone = stage_resources([Node(cpus=16)], objects=1000, options=OPTIONS, timings=lambda: TINY)
    assert stage_resources([head, Node(cpus=16)], 1000, OPTIONS, timings=lambda: TINY) == alone
    nodes = [head, *cpu_nodes(4, 4)]
    stages = stage_resources(nodes, objects=1000, options=OPTIONS, timings=not_timed)  # one way to split
    assert stages == stage_resources(cpu_nodes(4, 4), objects=1000, options=OPTIONS, timings=not_timed)
    assert (stages.encoders, stages.cpus_per_encoder, stages.decoders) == (1, 4 - WRITE_CPUS, 4)
    assert_places(nodes, stages)
    waiting = stage_resources([head], objects=1000, options=OPTIONS, timings=lambda: TINY)
    assert waiting.cpus_per_decoder <= 1 and waiting.cpus_per_encoder <= 1  # for the nodes to come


def test_options_override_counts_and_the_sizes_follow() -> None:
    nodes = cpu_nodes(4, 4, 4)
    asked = EmbedOptions(model="unused", encoders=3, decoders=3)
    stages = stage_resources(nodes, objects=1000, options=asked, timings=lambda: BASE)
    assert (stages.encoders, stages.decoders) == (3, 3)
    assert_places(nodes, stages)
    # more than the alive nodes fit: kept, the rest wait for nodes (an autoscaler's) as large as these
    more = stage_resources(nodes, 1000, EmbedOptions(model="unused", decoders=40), timings=lambda: BASE)
    assert more.decoders == 40 and more.cpus_per_decoder == 1


# ------------------------------------------------------------------------------------------- GPU clusters


def test_decoders_on_cpu_nodes_and_encoders_on_gpu_nodes() -> None:
    nodes = cpu_nodes(16, 16) + gpu_nodes(2)
    stages = stage_resources(nodes, objects=1000, options=OPTIONS, timings=not_timed)
    assert (stages.encoders, stages.gpus_per_encoder, stages.cpus_per_encoder) == (2, 1, 1)
    assert (stages.decoders, stages.cpus_per_decoder) == (32, 1)  # the writer runs on a GPU node's CPUs
    assert stage_nodes(nodes, stages.decode_selector) == ["cpu0", "cpu1"]
    assert stage_nodes(nodes, stages.encode_selector) == ["gpu0", "gpu1"]
    assert_places(nodes, stages)


def test_decoders_that_decode_on_gpus_run_on_the_gpu_nodes_only() -> None:
    nodes = cpu_nodes(16) + gpu_nodes(2)
    nvdec = EmbedOptions(model="unused", decode_device="cuda")
    stages = stage_resources(nodes, objects=1000, options=nvdec, timings=not_timed)
    assert stage_nodes(nodes, stages.decode_selector) == ["gpu0", "gpu1"]  # NVDEC: not the CPU node
    assert (stages.encoders, stages.decoders) == (2, 14)  # 2 x (8 - 1): the writer runs on the CPU node
    assert_places(nodes, stages, any_order=False)


def test_gpu_nodes_only_share_every_node() -> None:
    one = gpu_nodes(1)
    stages = stage_resources(one, objects=1000, options=OPTIONS, timings=not_timed)
    assert (stages.encoders, stages.decoders) == (1, 6)  # 8 - 1 - 0.1
    assert_places(one, stages)
    two = gpu_nodes(2)
    stages = stage_resources(two, objects=1000, options=OPTIONS, timings=not_timed)
    assert (stages.encoders, stages.decoders) == (2, 13)
    assert stages.decode_selector == stages.encode_selector == {}
    # all actors take one CPU; a node that Ray filled with decoders first leaves its GPU idle, not the job
    assert_places(two, stages, any_order=False)


def test_gpu_encoders_without_a_gpu_node_are_refused() -> None:
    asked = EmbedOptions(model="unused", gpus_per_encoder=2)
    with pytest.raises(ValueError, match="no node has the 2 GPUs"):
        stage_resources(gpu_nodes(2), objects=10, options=asked, timings=not_timed)


def test_labelled_nodes_run_their_stage_and_are_selected_by_label() -> None:
    decode, encode = {KEY: "decode"}, {KEY: "encode"}
    nodes = [
        Node(cpus=0, node_id="head"),
        Node(cpus=16, labels=decode, node_id="c0"),
        Node(cpus=16, labels=decode, node_id="c1"),
        Node(cpus=8, gpus=1, labels=encode, node_id="g0"),
    ]
    stages = stage_resources(nodes, objects=1000, options=OPTIONS, timings=not_timed)
    assert (stages.decode_selector, stages.encode_selector) == (decode, encode)
    assert (stages.encoders, stages.decoders) == (1, 32)
    assert_places(nodes, stages)
    on_cpus = stage_resources(nodes, 1000, EmbedOptions(model="unused", gpus_per_encoder=0), not_timed)
    assert (on_cpus.encoders, on_cpus.cpus_per_encoder, on_cpus.decoders) == (1, 8 - WRITE_CPUS, 32)
    assert_places(nodes, on_cpus)
    ignored = stage_resources(nodes, 1000, EmbedOptions(model="unused", stage_label=""), not_timed)
    assert ignored.decode_selector == {NODE_ID_LABEL: "!in(g0)"}  # by resources: off the GPU node


# ------------------------------------------------------------------------------------------------ summary


def test_the_summary_says_which_nodes_ran_which_stage() -> None:
    placement = {
        "decode": {"10.0.0.5 3f2a9c1b": 4, "10.0.0.6 9d8e7f6a": 4},
        "encode": {"10.0.0.7 1a2b3c4d": 1},
    }
    summary = EmbedSummary("lib", 1, 8, 8, 0, 8, 2.0, [], placement=placement)
    assert summary.to_dict()["placement"] == placement
    line = next(line for line in summary.text().splitlines() if "placement" in line)
    assert line == (
        "  placement: decode on 2 nodes (10.0.0.5 3f2a9c1b: 4, 10.0.0.6 9d8e7f6a: 4), "
        "encode on 1 node (10.0.0.7 1a2b3c4d: 1)"
    )
    assert "placement" not in EmbedSummary("lib", 1, 8, 8, 0, 8, 2.0, []).text()
