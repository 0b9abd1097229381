"""The worker node types an autoscaler may start, and how many: the bounds that the embed plan's actor
pools grow to (:func:`pipeline.embed.resources.with_bounds`).

Two sources, in this order:

1. The cluster config that an autoscaler reports to the cluster's GCS (node groups: resources, min and max
   counts; no labels). Ray Data reads the same record to size its own requests
   (``ray._private.state.state.get_cluster_config``: not a public API, so any failure to read it reads as
   "no record").
2. The cluster launcher's config, which ``ray up`` copies to the head node as
   ``~/ray_bootstrap_config.yaml`` for the autoscaler it starts there (``cluster.yaml``'s
   ``available_node_types``: resources, labels, ``min_workers``/``max_workers``, and the cluster-wide
   ``max_workers``). A job's driver runs on the head node, so a job submitted to such a cluster finds it.

Neither exists on a fixed cluster (``ray start`` by hand), and on KubeRay unless its autoscaler reports one:
the plan then sizes its pools to the alive nodes only.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import yaml

log = logging.getLogger(__name__)

BOOTSTRAP_CONFIG = "~/ray_bootstrap_config.yaml"  # where the cluster launcher leaves the autoscaler's config


@dataclass(frozen=True)
class NodeType:
    """A kind of worker node the autoscaler starts, up to ``max_workers`` of them (None: no bound)."""

    name: str
    cpus: float
    gpus: float = 0.0
    labels: Mapping[str, str] = field(default_factory=dict)
    max_workers: int | None = None


def autoscaled_node_types(bootstrap: str = BOOTSTRAP_CONFIG) -> list[NodeType]:
    """The worker node types of the connected cluster's autoscaler (this module's sources); [] when there
    is none."""
    return _reported_node_types() or launcher_node_types(bootstrap)


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


def _reported_node_types() -> list[NodeType]:
    """The node groups of the cluster config an autoscaler reported to the GCS; [] without one."""
    try:
        import ray._private.state

        config: Any = ray._private.state.state.get_cluster_config()
    except Exception as error:  # noqa: BLE001 - a private API: any failure means "no record"
        log.debug("no cluster config in the GCS: %s", error)
        return []
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
