"""A service following a library opens a new version from what it changes: the row lookup reads the parts it
adds, and its index is made from the one in memory where both versions name the same index file."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from helpers import part_row

from pipeline.library import DamagedLibraryError, Library, LibraryWriter, PartInfo
from pipeline.library import index as faiss_index
from pipeline.library.history import rollback
from pipeline.library.reader import embedded_rows, read_part
from pipeline.library.refresh import index_delta
from pipeline.models import VideoTextModel, load_model
from pipeline.search import Searcher
from pipeline.search.service import ServiceOptions
from pipeline.search.service.follow import VersionFollower
from pipeline.storage import Store

QUERY = "a red square moving left"


@pytest.fixture(scope="module")
def model(tiny_model: Path) -> VideoTextModel:
    return load_model(str(tiny_model))


def rows(model: VideoTextModel, ids: range | list[int], seed: int, failed: tuple[int, ...] = ()) -> pa.Table:
    """A part's rows: video ``v<i>`` with id ``1000 + i`` (one segment), a random embedding (``seed``)."""
    rng = np.random.default_rng(seed)
    shapes = (model.embedding_dim, int(np.prod(model.rerank_shape)))
    tag = model.identity.tag
    table = [
        part_row(1000 + i, f"s3://videos/v{i}.mp4", 0, i not in failed, rng, shapes, tag, 1.0) for i in ids
    ]
    return pa.Table.from_pylist(table, writer(Path(), model).schema)


def writer(location: Path, model: VideoTextModel) -> LibraryWriter:
    return LibraryWriter(str(location), embedding_dim=model.embedding_dim, prompt_shape=model.rerank_shape)


def ids_of(library_writer: LibraryWriter, part: PartInfo) -> set[int]:
    return set(read_part(library_writer.store, part, library_writer.schema, ["id"])["id"].to_pylist())


def publish(location: Path, model: VideoTextModel, tables: list[pa.Table], kind: str) -> Library:
    """A version of ``tables``' parts with an index file of ``kind``."""
    out = writer(location, model)
    parts = [out.write_part(table) for table in tables]
    index = faiss_index.build_index(*embedded_rows(out.store, parts, out.schema), kind)
    return Library(str(location), out.publish(parts, index, model.identity, None))


def publish_delta(
    location: Path,
    model: VideoTextModel,
    tables: list[pa.Table],
    masked: frozenset[int] = frozenset(),
    dropped: frozenset[int] = frozenset(),
) -> Library:
    """A version as a refresh publishes it: the current one's parts less the ``masked`` ids and the parts
    holding ``dropped`` ids, plus a part per table; its index, the current index file plus a delta."""
    out = writer(location, model)
    base = Library.current_version(str(location))
    new = [out.write_part(table) for table in tables]
    kept = [part for part in base.parts if not ids_of(out, part) & dropped]
    gone = masked | {i for part in base.parts if part not in kept for i in ids_of(out, part)}
    parts = [part.masked(masked & ids_of(out, part)) for part in kept] + new
    ntotal = len(embedded_rows(out.store, parts, out.schema)[0])
    delta = index_delta(base.manifest["index"], np.array(sorted(gone), np.int64), new, parts, ntotal)
    assert delta is not None
    return Library(str(location), out.publish(parts, delta, model.identity, base))


def contents(index: faiss_index.faiss.Index) -> dict[int, float]:
    """Each id an index holds with its inner product with a fixed random query (all lists probed)."""
    ids = faiss_index.ids_of(index)
    assert len(set(ids.tolist())) == len(ids), "an id held twice"
    query = np.random.default_rng(7).standard_normal((1, index.d)).astype(np.float32)
    scores, found = faiss_index.search(index, query, max(index.ntotal, 1))
    return dict(zip(found[0].tolist(), scores[0].round(5).tolist(), strict=True))


@pytest.mark.parametrize("kind", ["flat", "ivf"])
def test_a_followed_version_index_holds_what_its_file_and_delta_hold(tmp_path, model, kind) -> None:
    lib = tmp_path / "lib"
    first = publish(
        lib, model, [rows(model, range(100), 0, failed=(2,)), rows(model, range(100, 200), 1)], kind
    )
    follower = VersionFollower(Store(str(lib)), ServiceOptions())
    steps = [
        # a new part, with video 5 changed (its id is in the file and the new part)
        dict(tables=[rows(model, [*range(300, 304), 5], 2, failed=(303,))], masked=frozenset({1004, 1005})),
        # videos 301 and 5 changed again: their rows in the delta's part replaced by a new part's
        dict(tables=[rows(model, [301, 310, 5], 3)], masked=frozenset({1301, 1005})),
        dict(tables=[], masked=frozenset({1001}), dropped=frozenset({1300})),  # a delta part dropped
    ]
    index_file = lib / first.manifest["index"]["path"]
    for step in steps:
        library = publish_delta(lib, model, **step)
        assert library.manifest["index"]["path"] == first.manifest["index"]["path"]  # the same file
        index_file.rename(tmp_path / "aside")  # the follower makes the new index without it
        assert follower.check()
        (tmp_path / "aside").rename(index_file)
        held = follower.searcher().cpu_index
        assert contents(held) == contents(Library.open(str(lib)).read_index())
    assert set(contents(held)) == set(range(1000, 1200)) - {1001, 1002, 1004} | {1301, 1310}
    assert contents(held)[1005] != contents(first.read_index())[1005]
    rollback(str(lib), 2)  # rows come back (1001, and 1301 as it was): the file is read again
    assert follower.check()
    assert contents(follower.searcher().cpu_index) == contents(Library.open(str(lib)).read_index())
    assert 1001 in contents(follower.searcher().cpu_index)


def test_a_followed_version_reads_neither_the_index_file_nor_the_parts_it_shares(tmp_path, model) -> None:
    lib = tmp_path / "lib"
    first = publish(lib, model, [rows(model, range(0, 40), 0)], "flat")
    follower = VersionFollower(Store(str(lib)), ServiceOptions())
    publish_delta(lib, model, [rows(model, range(40, 43), 1)], masked=frozenset({1002}))
    (lib / first.manifest["index"]["path"]).unlink()
    (lib / first.snapshot.parts[0].path).unlink()  # its Parquet file; its re-rank records stay
    with pytest.raises(DamagedLibraryError, match="missing"):
        Searcher(Library.open(str(lib)), model)  # a cold open reads them
    assert follower.check()
    hits = follower.searcher().search(QUERY, k=50, candidates=50)
    assert sorted(h.id for h in hits) == sorted(set(range(1000, 1043)) - {1002})  # the new version's masks
    assert sorted(h.id for h in follower.searcher(1).search(QUERY, k=50)) == list(range(1000, 1040))


def test_the_versions_a_service_keeps_open_stay_within_their_memory(tmp_path, model) -> None:
    lib = tmp_path / "lib"
    first = publish(lib, model, [rows(model, range(0, 40), 0)], "flat")
    held = Searcher(first, model).memory_bytes()
    assert held >= 40 * model.embedding_dim * 4  # the embeddings in the index at least
    kept = VersionFollower(Store(str(lib)), ServiceOptions())  # 1 GiB for the others
    dropped = VersionFollower(Store(str(lib)), ServiceOptions(cached_versions_mb=0))
    publish_delta(lib, model, [rows(model, range(40, 43), 1)])
    assert kept.check() and dropped.check()
    (lib / first.snapshot.parts[0].path).unlink()
    assert len(kept.searcher(1).search(QUERY, k=50)) == 40  # held since it was current
    with pytest.raises(DamagedLibraryError, match="missing"):
        dropped.searcher(1)  # let go when replaced: opened again
