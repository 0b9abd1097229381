"""The deployment files: cluster.yaml validates against the schema the installed Ray ships for cluster
configs; the KubeRay manifests (deploy/kuberay/) have the fields KubeRay requires and cluster.yaml's worker
types (the entry points for `ray job submit` are tested with the CLI, in e2e/test_cli.py and
e2e/test_cluster.py)."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest
import ray.autoscaler
import yaml

ROOT = Path(__file__).parents[2]


def test_cluster_yaml_validates_against_rays_schema() -> None:
    config = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(config, schema)
    types = config["available_node_types"]
    assert types[config["head_node_type"]]["resources"] == {"CPU": 0}  # the head only drives jobs
    assert any(t["resources"].get("GPU") for t in types.values())  # encoders on GPU workers
    assert any("GPU" not in t["resources"] and t["resources"]["CPU"] for t in types.values())  # decoders
    gpu = next(t for t in types.values() if t["resources"].get("GPU"))
    assert any(".[gpu]" in command for command in gpu["worker_setup_commands"])


def test_the_schema_check_can_fail() -> None:
    config = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    config["available_node_types"]["head"].pop("node_config")
    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    with pytest.raises(jsonschema.ValidationError, match="node_config"):
        jsonschema.validate(config, schema)


def kuberay(name: str) -> dict:
    return yaml.safe_load((ROOT / "deploy" / "kuberay" / name).read_text())


def assert_pods(group: dict) -> None:
    """A group's pod template: named containers with an image; Ray's start parameters as strings (KubeRay's
    rayStartParams is a map of strings)."""
    containers = group["template"]["spec"]["containers"]
    assert containers and all(c["name"] and c["image"] for c in containers)
    assert all(isinstance(v, str) for v in group["rayStartParams"].values())


def test_kuberay_raycluster_has_what_kuberay_requires_and_cluster_yamls_worker_types() -> None:
    cluster = kuberay("raycluster.yaml")
    kind = cluster["apiVersion"], cluster["kind"], cluster["metadata"]["name"]
    assert kind == ("ray.io/v1", "RayCluster", "videosearch")
    spec = cluster["spec"]
    assert spec["rayVersion"] == ray.__version__  # the version the image runs and this project pins
    assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"  # the head only drives jobs
    assert_pods(spec["headGroupSpec"])
    types = yaml.safe_load((ROOT / "cluster.yaml").read_text())["available_node_types"]
    groups = {group["groupName"]: group for group in spec["workerGroupSpecs"]}
    assert groups.keys() == types.keys() - {"head"}
    for name, group in groups.items():
        assert_pods(group)
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        node_type, params = types[name], group["rayStartParams"]
        assert group["minReplicas"] == node_type["min_workers"]
        assert group["maxReplicas"] == node_type["max_workers"]
        assert group["labels"] == node_type["labels"]  # the stage label the plan reads
        assert float(params["num-cpus"]) == node_type["resources"]["CPU"]
        assert float(params.get("num-gpus", 0)) == node_type["resources"].get("GPU", 0)
        limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
        assert float(limits.get("nvidia.com/gpu", 0)) == node_type["resources"].get("GPU", 0)


def test_kuberay_rayjob_runs_the_embed_entry_point_on_that_cluster() -> None:
    job = kuberay("rayjob.yaml")
    kind = job["apiVersion"], job["kind"], job["metadata"]["name"]
    assert kind == ("ray.io/v1", "RayJob", "videosearch-embed")
    assert job["spec"]["entrypoint"].startswith("python ")
    assert job["spec"]["entrypoint"].split()[1].endswith("jobs/embed.py")
    assert job["spec"]["rayClusterSpec"] == kuberay("raycluster.yaml")["spec"]
