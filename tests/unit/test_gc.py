"""``gc``: what no kept version names goes; the current version, kept versions, versions replaced within the
grace period, young files and a running writer's parts stay. Local disk and S3."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from pipeline.library import Library, LibraryWriter, Version
from pipeline.library.gc import collect
from pipeline.library.index import build_index
from pipeline.library.journal import LEASE_S
from pipeline.library.schema import part_schema
from pipeline.storage import StorageOptions, Store
from xclip_core import ModelIdentity

DIM = 4
MODEL = ModelIdentity("test/model", "0" * 64)


@pytest.fixture(params=["local", "s3"])
def root(request: pytest.FixtureRequest, tmp_path: Path) -> Store:
    if request.param == "local":
        return Store(str(tmp_path / "lib"))
    options: StorageOptions = request.getfixturevalue("s3").options
    return Store(f"s3://{request.getfixturevalue('bucket')}/lib", options)


def table(ids: range) -> pa.Table:
    rows = [
        {"id": i, "uri": f"v{i}", "segment": 0, "embedding": [float(i)] * DIM, "model_id": MODEL.tag}
        for i in ids
    ]
    schema = part_schema(DIM, None)
    return pa.Table.from_pylist(
        [{name: row.get(name) for name in schema.names} for row in rows], schema=schema
    )


def publish(root: Store, ids: range, base: Version | None, keep_parts: bool = False) -> Version:
    writer = LibraryWriter(root, embedding_dim=DIM, prompt_shape=None)
    parts = (base.parts if base and keep_parts else []) + [writer.write_part(table(ids))]
    everything = Library(root, base).table(["id"])["id"].to_pylist() if base and keep_parts else []
    everything += list(ids)
    index = build_index(np.array(everything), np.array([[float(i)] * DIM for i in everything]))
    return writer.publish(parts, index, MODEL, base)


def files(root: Store) -> set[str]:
    """The library's files (not the local lock files: gc leaves those alone)."""
    directories = ("parts", "features", "index", "versions", "runs")
    names = {name for directory in directories for name in root.entries(directory)}
    return {name for name in names if not name.rsplit("/", 1)[-1].startswith(".")}


def test_only_what_no_kept_version_names_goes(root: Store) -> None:
    v1 = publish(root, range(0, 2), None)
    v2 = publish(root, range(2, 4), v1, keep_parts=True)  # names v1's part too
    v3 = publish(root, range(4, 6), v2)  # a new start: names only its own part
    orphan = LibraryWriter(root, embedding_dim=DIM, prompt_shape=None).write_part(table(range(9, 10)))
    before = files(root)

    assert collect(root, keep=1).deleted_files == []  # everything is younger than the grace period
    orphaned = [orphan.path, orphan.features]  # the orphan part and its re-rank records, nothing else
    assert sorted(collect(root, keep=3, grace_s=0).deleted_files) == sorted(orphaned)
    dry = collect(root, keep=2, grace_s=0, dry_run=True)
    v1_only = {p.path for p in v1.parts} - {p.path for p in v2.parts}  # nothing: v2 names v1's part
    assert dry.kept_versions == [2, 3] and dry.deleted_versions == [1] and not v1_only
    assert set(dry.deleted_files) == {"versions/1.json", v1.manifest["index"]["path"]}
    assert dry.text().startswith("kept versions 2, 3; would delete versions 1: 2 files in all (")
    assert files(root) == before - set(orphaned)  # a dry run deletes nothing

    done = collect(root, keep=1, grace_s=0)
    assert done.kept_versions == [3]
    named = {name for p in v3.parts for name in (p.path, p.features)}
    named |= {v3.manifest["index"]["path"], "versions/3.json"}
    assert files(root) == named
    latest = Library.open(root)
    assert latest.version == 3 and latest.table(["id"])["id"].to_pylist() == [4, 5]
    assert latest.index().ntotal == 2


def test_versions_replaced_within_the_grace_period_and_running_writers_are_kept(tmp_path: Path) -> None:
    root = Store(str(tmp_path / "lib"))
    v1 = publish(root, range(0, 2), None)
    old = time.time() - 7200
    for path in (tmp_path / "lib").rglob("*"):
        os.utime(path, (old, old))  # v1's files are two hours old ...
    publish(root, range(2, 4), v1)  # ... but v1 was replaced just now: a reader may still be on it
    kept = collect(root, keep=1, grace_s=3600)
    assert kept.kept_versions == [1, 2] and kept.deleted_files == []

    writer = LibraryWriter(root, embedding_dim=DIM, prompt_shape=None)
    running = writer.write_part(table(range(7, 8)))
    dead = writer.write_part(table(range(8, 9)))
    for name, part, expires in (("running", running, time.time() + LEASE_S), ("dead", dead, 0.0)):
        journal = {"run": name, "host": "elsewhere", "pid": 1, "started": "", "expires": expires}
        root.write_bytes(f"runs/{name}.json", json.dumps({**journal, "parts": [part.to_dict()]}).encode())
    for path in (tmp_path / "lib").rglob("*"):
        os.utime(path, (old, old))
    deleted = set(collect(root, keep=1, grace_s=0).deleted_files)
    assert not {running.path, running.features, "runs/running.json"} & deleted
    assert {dead.path, dead.features, "runs/dead.json", "versions/1.json"} <= deleted
