"""The deployment files: cluster.yaml validates against the schema the installed Ray ships for cluster
configs, and every entry point for `ray job submit` answers --help."""

from __future__ import annotations

import json
import subprocess
import sys
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


@pytest.mark.parametrize("script", sorted(p.name for p in (ROOT / "jobs").glob("*.py")))
def test_every_job_entry_point_has_help(script: str) -> None:
    done = subprocess.run(
        [sys.executable, str(ROOT / "jobs" / script), "--help"], capture_output=True, text=True, cwd=ROOT
    )
    assert done.returncode == 0 and "usage: videosearch" in done.stdout, done.stderr
