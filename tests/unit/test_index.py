"""Tests for ``pipeline.index``: exactness against numpy, ids, updates, serialization, approximate recall."""

from __future__ import annotations

import faiss
import numpy as np
import pytest

from pipeline.library import index as fx


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def clustered(n: int, d: int, clusters: int, seed: int) -> np.ndarray:
    """``n`` unit vectors around ``clusters`` random centres (like embeddings of similar videos)."""
    rng = np.random.default_rng(seed)
    centres = unit(rng.standard_normal((clusters, d)))
    return unit(centres[rng.integers(clusters, size=n)] + rng.standard_normal((n, d)) / np.sqrt(d))


def brute_force(ids: np.ndarray, vectors: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    return ids[np.argsort(-(queries @ vectors.T), axis=1, kind="stable")[:, :k]]


@pytest.fixture(scope="module")
def data() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """4000 clustered vectors (d=32) under scattered ids, and 50 queries near them."""
    vectors = clustered(4000, 32, 40, seed=1)
    ids = np.random.default_rng(2).choice(10**9, size=4000, replace=False).astype(np.int64)
    queries = unit(vectors[:50] + 0.05 * np.random.default_rng(3).standard_normal((50, 32)))
    return ids, vectors, queries


def test_flat_is_brute_force_top_k_with_the_given_ids(data) -> None:
    ids, vectors, queries = data
    index = fx.build_index(ids, vectors)
    assert fx.kind_of(index) == "flat"
    scores, found = fx.search(index, queries, 10)
    np.testing.assert_array_equal(found, brute_force(ids, vectors, queries, 10))
    np.testing.assert_allclose(scores, np.sort(queries @ vectors.T, axis=1)[:, ::-1][:, :10], rtol=1e-5)
    one_scores, one_ids = fx.search(index, queries[0], 3)
    assert one_ids.shape == (1, 3) and one_ids[0, 0] == found[0, 0]


def test_auto_rule() -> None:
    assert [fx.auto_kind(n) for n in (0, 19_999, 20_000, 999_999, 1_000_000)] == [
        "flat",
        "flat",
        "ivf",
        "ivf",
        "ivfpq",
    ]


def test_k_larger_than_ntotal_pads_with_minus_one() -> None:
    vectors = clustered(3, 8, 2, seed=4)
    index = fx.build_index(np.array([7, 8, 9]), vectors)
    scores, ids = fx.search(index, vectors, 5)
    assert sorted(ids[0, :3]) == [7, 8, 9] and (ids[:, 3:] == -1).all()
    assert np.isneginf(scores[:, 3:]).all() and np.isfinite(scores[:, :3]).all()


def test_empty_input_gives_an_empty_flat_index() -> None:
    index = fx.build_index(np.zeros(0, np.int64), np.zeros((0, 16), np.float32), kind="ivf")
    assert fx.describe(index) == "flat (exact): 0 vectors, dim 16"
    scores, ids = fx.search(index, np.ones(16, np.float32) / 4, 2)
    assert (ids == -1).all() and np.isneginf(scores).all()


@pytest.mark.parametrize("kind", ["flat", "ivf", "hnsw"])
def test_add_remove_and_serialize_round_trip(data, kind: str) -> None:
    ids, vectors, queries = data
    index = fx.build_index(ids[:3000], vectors[:3000], kind=kind)
    fx.add(index, ids[3000:], vectors[3000:])
    assert index.ntotal == 4000
    gone = ids[:50]  # the first 50 vectors: each query's nearest neighbour
    index = fx.remove(index, gone)
    assert index.ntotal == 3950 and fx.kind_of(index) == kind
    scores, found = fx.search(index, queries, 10)
    assert not np.isin(found, gone).any()

    copy = fx.deserialize(fx.serialize(index))
    assert fx.describe(copy) == fx.describe(index)
    copy_scores, copy_found = fx.search(copy, queries, 10)
    np.testing.assert_array_equal(copy_found, found)
    np.testing.assert_array_equal(copy_scores, scores)


@pytest.mark.parametrize("kind", ["ivf", "hnsw"])
def test_approximate_recall_at_10(data, kind: str) -> None:
    ids, vectors, queries = data
    index = fx.build_index(ids, vectors, kind=kind)
    assert fx.kind_of(index) == kind
    _, found = fx.search(index, queries, 10)
    exact = brute_force(ids, vectors, queries, 10)
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(found, exact, strict=True)])
    assert recall >= 0.9, (fx.describe(index), recall)


@pytest.mark.parametrize("kind", ["flat", "ivf", "hnsw"])
@pytest.mark.parametrize("share", [0.5, 0.02])
def test_a_search_among_some_ids_finds_only_them_as_an_open_search_finds(
    data, kind: str, share: float
) -> None:
    ids, vectors, queries = data
    index = fx.build_index(ids, vectors, kind=kind)
    some = np.random.default_rng(4).random(len(ids)) < share  # a folder's rows, scattered in the index
    _, found = fx.search(index, queries, 10, among=ids[some])
    assert np.isin(found[found >= 0], ids[some]).all() and (found >= 0).all()
    exact = brute_force(ids[some], vectors[some], queries, 10)
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(found, exact, strict=True)])
    assert recall >= (1.0 if kind == "flat" else 0.9), (fx.describe(index), recall)
    assert (fx.search(index, queries, 5, among=np.zeros(0, np.int64))[1] == -1).all()  # an empty part


def test_ivf_is_seeded_and_ivfpq_builds(data) -> None:
    ids, vectors, queries = data
    a, b = (fx.search(fx.build_index(ids, vectors, kind="ivf", seed=5), queries, 5) for _ in range(2))
    np.testing.assert_array_equal(a[1], b[1])
    pq = fx.build_index(ids, vectors, kind="ivfpq")
    assert fx.describe(pq).startswith("ivfpq (nlist=102, nprobe=16, 8 bytes/vector): 4000 vectors")
    _, found = fx.search(pq, queries, 10)
    assert np.isin(found, ids).all()


@pytest.mark.parametrize("kind", ["flat", "ivf", "ivfpq", "hnsw"])
def test_an_index_on_the_gpus_finds_what_it_finds_on_the_cpu(data, kind: str) -> None:
    """Without GPUs (CI) ``on_gpus`` is the index itself; with faiss-gpu and a GPU, a copy there for flat
    and IVF (built, as here, by k-means on the GPU). What a library stores is the CPU index either way."""
    ids, vectors, queries = data
    index = fx.build_index(ids, vectors, kind=kind)
    moved = fx.on_gpus(index)
    if faiss.get_num_gpus() == 0 or kind == "hnsw":
        assert moved is index
    elif kind in ("flat", "ivf"):
        assert moved is not index
    cpu_scores, cpu_found = fx.search(index, queries, 10)
    gpu_scores, gpu_found = fx.search(moved, queries, 10)
    assert np.mean(cpu_found == gpu_found) >= 0.98
    same = cpu_found == gpu_found
    np.testing.assert_allclose(gpu_scores[same], cpu_scores[same], atol=1e-4)
    assert fx.kind_of(fx.deserialize(fx.serialize(index))) == kind
    if moved is not index:  # the searcher asks the CPU index for more results than the GPU kernels select
        with pytest.raises(RuntimeError):
            fx.search(moved, queries, fx.GPU_MAX_K + 1)


def test_bad_input() -> None:
    with pytest.raises(ValueError, match="unique"):
        fx.build_index(np.array([1, 1]), np.ones((2, 4)))
    with pytest.raises(ValueError, match="shape"):
        fx.build_index(np.array([1, 2]), np.ones((3, 4)))
    with pytest.raises(ValueError, match="unknown index kind"):
        fx.build_index(np.array([1]), np.ones((1, 4)), kind="lsh")
    with pytest.raises(ValueError, match="dimension 4"):
        fx.add(fx.build_index(np.array([1]), np.ones((1, 4))), np.array([2]), np.ones((1, 5)))
