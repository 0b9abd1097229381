"""The worker node types an autoscaler may start, and how many: the bounds that the embed plan's actor
pools grow to (:func:`pipeline.embed.resources.with_bounds`).

Two sources, in this order:

1. The cluster config that an autoscaler reports to the cluster's GCS (node groups: resources, min and max
   counts; no labels). Ray Data reads the same record to size its own requests
   (``ray._private.state.state.get_cluster_config``: not a public API, so the job's Ray module,
   :func:`pipeline.embed.on_ray.autoscaled_node_types`, reads any failure as "no record").
2. The cluster launcher's config, which ``ray up`` copies to the head node as
   ``~/ray_bootstrap_config.yaml`` for the autoscaler it starts there (``cluster.yaml``'s
   ``available_node_types``: resources, labels, ``min_workers``/``max_workers``, and the cluster-wide
   ``max_workers``). A job's driver runs on the head node, so a job submitted to such a cluster finds it.

Neither exists on a fixed cluster (``ray start`` by hand), and on KubeRay unless its autoscaler reports one:
the plan then sizes its pools to the alive nodes only.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import yaml

BOOTSTRAP_CONFIG = "~/ray_bootstrap_config.yaml"  # where the cluster launcher leaves the autoscaler's config


@dataclass(frozen=True)
class NodeType:
    """A kind of worker node the autoscaler starts, up to ``max_workers`` of them (None: no bound)."""

    name: str
    cpus: float
    gpus: float = 0.0
    labels: Mapping[str, str] = field(default_factory=dict)
    max_workers: int | None = None


def launcher_node_types(path: str = BOOTSTRAP_CONFIG) -> list[NodeType]:
    """The worker node types of a cluster launcher config file (``cluster.yaml``'s layout), the head's type
    left out; [] when there is no such file. Each type's bound is also the cluster's ``max_workers``."""
    path = os.path.expanduser(path)
    if not os.path.exists(path):
        return []
    with open(path) as file:
        config = yaml.safe_load(file) or {}
    cluster_max = config.get("max_workers")
    head = config.get("head_node_type")
    types = []
    for name, spec in (config.get("available_node_types") or {}).items():
        if name == head:
            continue
        resources = spec.get("resources") or {}
        bounds = [b for b in (spec.get("max_workers", cluster_max), cluster_max) if b is not None]
        types.append(
            NodeType(
                name=name,
                cpus=float(resources.get("CPU", 0)),
                gpus=float(resources.get("GPU", 0)),
                labels={str(k): str(v) for k, v in (spec.get("labels") or {}).items()},
                max_workers=min(bounds) if bounds else None,
            )
        )
    return types


def reported_node_types(config: Any) -> list[NodeType]:
    """The node groups of a cluster config that an autoscaler reported to the GCS (an
    ``autoscaler_pb2.ClusterConfig``, as :func:`pipeline.embed.on_ray.autoscaled_node_types` reads it);
    [] for None."""
    if config is None:
        return []
    return [
        NodeType(
            name=group.name,
            cpus=float(group.resources.get("CPU", 0)),
            gpus=float(group.resources.get("GPU", 0)),
            max_workers=None if group.max_count < 0 else int(group.max_count),
        )
        for group in config.node_group_configs
    ]
