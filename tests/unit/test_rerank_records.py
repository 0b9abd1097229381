"""Stage 2 reads each candidate's re-rank record by its position, and ranks exactly as brute force does."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest
from fault_proxy import FaultProxy
from helpers import MotoS3

from pipeline.library import Library, LibraryWriter, PartInfo
from pipeline.library.features import FeatureFile, record_dtype, to_records, write_features
from pipeline.library.index import build_index
from pipeline.library.lookup import PartTables, RowLookup, one_table
from pipeline.library.reader import embedded_rows, read_part
from pipeline.library.refresh import rewrite_parts
from pipeline.library.schema import part_schema
from pipeline.models import VideoTextModel, load_model
from pipeline.search import Searcher
from pipeline.search.scorer import ExactScorer, StoredVideos
from pipeline.storage import StorageOptions, Store

DATA = Path(__file__).parents[1] / "data"
QUERIES = ("a red square moving left", "blue noise", "a dog")


@pytest.fixture(scope="module")
def model(tiny_model: Path) -> VideoTextModel:
    return load_model(str(tiny_model))


def part_rows(model: VideoTextModel, ids: range, failed: tuple[int, ...] = ()) -> pa.Table:
    """Rows with random unit embeddings and random re-rank features at ``model``'s geometry."""
    rng = np.random.default_rng(ids.start)
    dim, shape = model.embedding_dim, model.rerank_shape
    rows = []
    for i in ids:
        ok = i not in failed
        embedding = rng.standard_normal(dim)
        rows.append(
            {
                "id": 1000 + i,
                "uri": f"s3://videos/v{i}.mp4",
                "segment": 0,
                "start_s": 0.0,
                "end_s": 2.0,
                "error": None if ok else "broken",
                "embedding": (embedding / np.linalg.norm(embedding)).tolist() if ok else None,
                "prompt_features": rng.standard_normal(int(np.prod(shape))).tolist() if ok else None,
                "model_id": model.identity.tag,
            }
        )
    schema = part_schema(dim, shape)
    table = pa.Table.from_pylist(rows)
    return pa.table({f.name: table[f.name] if f.name in table.column_names else pa.nulls(len(rows), f.type)
                     for f in schema}).cast(schema)  # fmt: skip


def publish(
    location: str, model: VideoTextModel, tables: list[pa.Table], masked: frozenset[int] = frozenset()
) -> Library:
    """A new version: the current one's parts (less the ``masked`` ids) and a part per table."""
    writer = LibraryWriter(location, embedding_dim=model.embedding_dim, prompt_shape=model.rerank_shape)
    base = Library.current_version(location)
    parts = (base.parts if base else []) + [writer.write_part(table) for table in tables]
    parts = [part.masked(masked & set(ids_of(writer, part))) for part in parts]
    ids, vectors = embedded_rows(writer.store, parts, writer.schema)
    return Library(location, writer.publish(parts, build_index(ids, vectors), model.identity, base))


def ids_of(writer: LibraryWriter, part: PartInfo) -> list[int]:
    return read_part(writer.store, part, writer.schema, ["id"], masked=False)["id"].to_pylist()


def brute_force(library: Library, model: VideoTextModel, text: str) -> list[tuple[int, float]]:
    """Every embedded row of the version by the exact score, best first (from the rows as a table)."""
    table = library.table(["id", "embedding", "prompt_features", "error"], pc.field("error").is_null())
    scorer = ExactScorer(model)
    scores = scorer(scorer.text_embeddings([text]), StoredVideos.from_table(table, library.rerank_shape))[
        :, 0
    ]
    order = np.argsort(-scores.numpy(), kind="stable")
    return [(table["id"][int(i)].as_py(), float(scores[int(i)])) for i in order]


def assert_ranks_as_brute_force(library: Library, model: VideoTextModel) -> None:
    searcher = Searcher(library, model)
    total = library.manifest["counts"]["segments"]
    for text in QUERIES:
        hits = searcher.search(text, k=total, candidates=total)
        expected = brute_force(library, model, text)
        # the same rows in the same order (rows of equal score, e.g. two identical segments, in either order)
        assert sorted(h.id for h in hits) == sorted(i for i, _ in expected), text
        np.testing.assert_allclose([h.score for h in hits], [s for _, s in expected], atol=1e-6)
        np.testing.assert_allclose([h.score for h in hits], [dict(expected)[h.id] for h in hits], atol=1e-6)


def test_stage_two_ranks_exactly_as_brute_force_over_parts_masks_and_errors(tmp_path, model) -> None:
    location = str(tmp_path / "lib")
    publish(location, model, [part_rows(model, range(0, 6), failed=(2,)), part_rows(model, range(6, 11))])
    library = publish(location, model, [part_rows(model, range(20, 23))], masked=frozenset({1004, 1007}))
    ids = set(library.table(["id"], pc.field("error").is_null())["id"].to_pylist())
    assert 1004 not in ids and 1007 not in ids and 1002 not in ids and len(ids) == 11
    assert all(part.features for part in library.snapshot.parts)
    assert_ranks_as_brute_force(library, model)
    lookup = RowLookup(library.store, library.snapshot.parts, library.schema, library.rerank_shape)
    with pytest.raises(KeyError, match="1004"):
        lookup.records([1000, 1004])  # masked: not a row of this version


def test_the_row_lookup_finds_hits_and_folders_across_parts_masks_and_errors(tmp_path, model) -> None:
    location = str(tmp_path / "lib")
    publish(location, model, [part_rows(model, range(0, 6), failed=(2,)), part_rows(model, range(6, 11))])
    library = publish(location, model, [part_rows(model, range(20, 23))], masked=frozenset({1004, 1007}))
    lookup = RowLookup(library.store, library.snapshot.parts, library.schema, library.rerank_shape)
    held = library.table(["id", "uri", "segment", "start_s", "end_s"], pc.field("error").is_null())
    by_id = {row["id"]: row for row in held.to_pylist()}
    ids = np.random.default_rng(0).permutation(sorted(by_id)).tolist()  # the parts' rows interleaved
    assert lookup.hits(ids).to_pylist() == [by_id[i] for i in ids]
    assert lookup.hits([1021, 1000, 1021]).to_pylist() == [by_id[1021], by_id[1000], by_id[1021]]
    assert lookup.hits([]).num_rows == 0
    with pytest.raises(KeyError, match="1007"):
        lookup.hits([1000, 1007])  # masked
    assert lookup.ids_under("s3://videos/").tolist() == sorted(by_id)
    for video, expected in (("v8", [1008]), ("v21", [1021]), ("v2", []), ("v7", []), ("v5", [1005])):
        assert lookup.ids_under(f"s3://videos/{video}.mp4").tolist() == expected  # failed v2, masked v7
    assert lookup.nbytes >= held.nbytes


def test_a_lookup_holds_its_parts_rows_once_with_the_part_tables_it_keeps(tmp_path, model) -> None:
    location = str(tmp_path / "lib")
    library = publish(location, model, [part_rows(model, range(n, n + 256)) for n in range(0, 2048, 256)])
    tables = PartTables()
    allocated = pa.total_allocated_bytes()
    lookup = RowLookup(library.store, library.snapshot.parts, library.schema, library.rerank_shape, tables)
    allocated = pa.total_allocated_bytes() - allocated
    kept = tables.read(library.store, library.snapshot.parts, library.schema)  # all held: none read again
    once = sum(table.nbytes for table in kept)
    assert once <= allocated < 1.2 * once  # the rows a lookup takes from are the part tables kept, not a copy
    assert len(lookup) == 2048 and lookup.hits([1000 + 2047])["uri"].to_pylist() == ["s3://videos/v2047.mp4"]


def test_the_parts_rows_make_one_table_past_two_gib_of_uris() -> None:
    rows, length = 1_100_000, 1000  # each part's uris 1.1 GB: 32-bit string offsets overflow together
    offsets = pa.py_buffer((np.arange(rows + 1, dtype=np.int32) * length).tobytes())
    uris = pa.StringArray.from_buffers(
        rows, offsets, pa.py_buffer(np.full(rows * length, ord("u"), np.uint8))
    )
    schema = pa.schema([("id", pa.int64()), ("uri", pa.string())])
    tables = [pa.table([pa.array(np.arange(rows) + n * rows), uris], schema=schema) for n in range(2)]
    together, starts = one_table(tables, schema.empty_table())
    assert starts.tolist() == [0, rows, 2 * rows]
    taken = together.take([0, 2 * rows - 1])  # one take across both parts
    assert taken["id"].to_pylist() == [0, 2 * rows - 1] and taken["uri"].to_pylist() == ["u" * length] * 2


def test_an_older_library_refreshed_mixes_part_formats_and_still_ranks_exactly(tmp_path, model) -> None:
    location = tmp_path / "old"
    shutil.copytree(DATA / "library-format1", location)
    bundled = Searcher(Library.open(str(location))).model  # the bundled model, found by its hash
    library = publish(str(location), bundled, [part_rows(bundled, range(0, 4))])
    assert [bool(p.features) for p in library.snapshot.parts].count(True) == 1  # the new part only
    assert library.manifest["format"] == 3
    assert_ranks_as_brute_force(library, bundled)


def test_an_older_librarys_part_merged_with_a_new_one_answers_as_before(tmp_path, model) -> None:
    location = tmp_path / "old"
    shutil.copytree(DATA / "library-format1", location)
    bundled = Searcher(Library.open(str(location))).model
    before = publish(str(location), bundled, [part_rows(bundled, range(0, 4))])  # a format 1 part, a new one
    writer = LibraryWriter(
        str(location), embedding_dim=bundled.embedding_dim, prompt_shape=bundled.rerank_shape
    )
    (merged_part,), readded = rewrite_parts(writer, before.snapshot.parts)  # refresh's merge of small parts
    assert (
        readded == []
        and merged_part.features
        and merged_part.rows == sum(p.rows for p in before.snapshot.parts)
    )
    merged = Library(
        str(location), writer.publish([merged_part], before.index(), bundled.identity, before.snapshot)
    )
    assert_ranks_as_brute_force(merged, bundled)
    for text in QUERIES:  # what a query sees is unchanged: the records moved out of the old part intact
        ours, theirs = (
            Searcher(merged, bundled).search(text, k=20),
            Searcher(before, bundled).search(text, k=20),
        )
        assert [(h.id, h.uri) for h in ours] == [(h.id, h.uri) for h in theirs]
        np.testing.assert_allclose([h.score for h in ours], [h.score for h in theirs], atol=1e-6, rtol=0)


def test_a_remote_record_costs_its_own_bytes(s3: MotoS3, bucket: str) -> None:
    proxy = FaultProxy(s3.endpoint_url)
    try:
        store = Store(f"s3://{bucket}/lib", StorageOptions(endpoint_url=proxy.url))
        dim, shape = 16, (4, 16)
        rng = np.random.default_rng(0)
        records = to_records(rng.standard_normal((500, dim)), rng.standard_normal((500, *shape)), shape)
        write_features(store, "features/x.npy", records)
        proxy.faults.seen.clear()
        file = FeatureFile(store, "features/x.npy")
        got = file.rows(np.array([7, 400, 8, 7, 123]))
        for name in ("embedding", "prompt"):
            np.testing.assert_array_equal(got[name], records[name][[7, 400, 8, 7, 123]])
        ranges = [r for method, _, r in proxy.faults.seen if method == "GET"]
        sizes = sorted(
            int(end) - int(start) + 1 for start, end in (r.split("=")[1].split("-") for r in ranges)
        )
        itemsize = record_dtype(dim, shape).itemsize
        # the header once, then one range per run of adjacent rows: (7, 8), 123, 400
        assert sizes[:-1] == sorted([itemsize, itemsize, 2 * itemsize]) and sizes[-1] == 4096
    finally:
        proxy.close()
