"""How far the embed plan's actor pools may grow on an autoscaling cluster: the node types an autoscaler
starts (from the config it reports to the GCS, or the cluster launcher's config on the head node) and the
bounds that the plan derives from them (resources.with_bounds)."""

from __future__ import annotations

from pathlib import Path

import ray
import yaml
from ray.core.generated import autoscaler_pb2

from pipeline.embed.autoscaling import NodeType, launcher_node_types
from pipeline.embed.on_ray import autoscaled_node_types
from pipeline.embed.options import EmbedOptions
from pipeline.embed.resources import Node, stage_resources

ROOT = Path(__file__).resolve().parents[2]
OPTIONS = EmbedOptions(model="unused")
KEY = OPTIONS.stage_label


def not_timed() -> tuple[float, float]:
    raise AssertionError("this plan needs no CPU timings")


def test_the_launcher_config_gives_the_worker_types_of_cluster_yaml() -> None:
    types = {kind.name: kind for kind in launcher_node_types(str(ROOT / "cluster.yaml"))}
    assert set(types) == {"cpu-decode", "gpu-encode"}  # the head's type hosts no workers
    assert types["cpu-decode"] == NodeType("cpu-decode", 16.0, 0.0, {KEY: "decode"}, 16)
    assert types["gpu-encode"] == NodeType("gpu-encode", 8.0, 1.0, {KEY: "encode"}, 4)


def test_the_clusters_max_workers_bounds_every_type(tmp_path: Path) -> None:
    config = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    config["max_workers"] = 6
    del config["available_node_types"]["gpu-encode"]["max_workers"]
    path = tmp_path / "ray_bootstrap_config.yaml"
    path.write_text(yaml.safe_dump(config))
    assert {kind.name: kind.max_workers for kind in launcher_node_types(str(path))} == {
        "cpu-decode": 6,
        "gpu-encode": 6,
    }
    assert launcher_node_types(str(tmp_path / "absent.yaml")) == []


def test_the_config_an_autoscaler_reports_to_the_gcs_comes_first(tmp_path: Path) -> None:
    launcher = tmp_path / "ray_bootstrap_config.yaml"
    launcher.write_text((ROOT / "cluster.yaml").read_text())
    ray.init(num_cpus=1, include_dashboard=False)
    try:
        assert [kind.name for kind in autoscaled_node_types(str(launcher))] == ["cpu-decode", "gpu-encode"]
        reported = autoscaler_pb2.ClusterConfig()
        for name, resources, max_count in (("cpu", {"CPU": 4}, 3), ("gpu", {"CPU": 8, "GPU": 2}, -1)):
            group = reported.node_group_configs.add(name=name, max_count=max_count)
            group.resources.update(resources)
        # what an autoscaler sends (the AutoscalerStateService's ReportClusterConfig)
        ray._private.worker.global_worker.gcs_client.report_cluster_config(reported.SerializeToString())
        assert autoscaled_node_types(str(launcher)) == [
            NodeType("cpu", 4.0, 0.0, {}, 3),
            NodeType("gpu", 8.0, 2.0, {}, None),
        ]
    finally:
        ray.shutdown()


def labelled_cluster() -> list[Node]:
    """cluster.yaml's cluster at its minimum: a head without CPUs, one node of each worker type."""
    return [
        Node(cpus=0, node_id="head"),
        Node(cpus=16, labels={KEY: "decode"}, node_id="c0"),
        Node(cpus=8, gpus=1, labels={KEY: "encode"}, node_id="g0"),
    ]


def test_pools_grow_to_what_the_labelled_types_host_at_their_bound() -> None:
    types = launcher_node_types(str(ROOT / "cluster.yaml"))
    stages = stage_resources(labelled_cluster(), 10_000, OPTIONS, not_timed, node_types=types)
    assert (stages.decoders, stages.encoders) == (16, 1)  # what the alive nodes fit, to start with
    assert (stages.max_decoders, stages.max_encoders) == (16 * 16, 4)
    few = stage_resources(labelled_cluster(), 100, OPTIONS, not_timed, node_types=types)
    assert (few.max_decoders, few.max_encoders) == (100, 4)  # a decoder per object at most
    fewer = stage_resources(labelled_cluster(), 6, OPTIONS, not_timed, node_types=types)
    assert (fewer.decoders, fewer.max_decoders, fewer.max_encoders) == (6, None, 2)  # 6 objects: 2 batches


def test_counts_the_user_gives_stay_fixed() -> None:
    types = launcher_node_types(str(ROOT / "cluster.yaml"))
    options = EmbedOptions(model="unused", decoders=8, encoders=2)
    stages = stage_resources(labelled_cluster(), 10_000, options, not_timed, node_types=types)
    assert (stages.decoders, stages.max_decoders, stages.encoders, stages.max_encoders) == (8, None, 2, None)


def test_without_labels_gpu_types_encode_and_the_others_decode() -> None:
    nodes = [Node(cpus=4, node_id="c0"), Node(cpus=8, gpus=2, node_id="g0")]
    types = [NodeType("cpu", 4.0, max_workers=10), NodeType("gpu", 8.0, 2.0, max_workers=None)]
    stages = stage_resources(nodes, 1000, OPTIONS, not_timed, node_types=types)
    assert (stages.decoders, stages.encoders) == (4, 2)
    # an unbounded GPU type: an encoder per batch at most
    assert (stages.max_decoders, stages.max_encoders) == (40, 1000 // OPTIONS.batch_size)
    gpus_only = stage_resources(
        [Node(cpus=8, gpus=1, node_id="g0")], 1000, OPTIONS, not_timed, [NodeType("gpu", 8.0, 1.0, {}, 3)]
    )
    # a GPU node that hosts every stage: its encoder's CPU and decoders on the rest, three such nodes
    assert (gpus_only.max_encoders, gpus_only.max_decoders) == (3, 3 * 7)


def test_a_cpu_only_plan_without_labels_keeps_fixed_pools() -> None:
    nodes = [Node(cpus=2, node_id="c0"), Node(cpus=2, node_id="c1")]
    stages = stage_resources(
        nodes, 1000, OPTIONS, lambda: (0.1, 1.0), node_types=[NodeType("cpu", 2.0, max_workers=10)]
    )
    assert (stages.max_decoders, stages.max_encoders) == (None, None)
