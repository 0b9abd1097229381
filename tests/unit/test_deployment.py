"""The deployment files: cluster.yaml validates against the schema the installed Ray ships for cluster
configs (the entry points for `ray job submit` are tested with the CLI, in e2e/test_cli.py)."""

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
