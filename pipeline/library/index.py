"""FAISS indexes over a library's embeddings: build, update, search, (de)serialize.

Vectors are L2-normalized X-CLIP embeddings, so the metric is the inner product (= cosine similarity).
An index maps the library's int64 row ids (never positions) to vectors; ``search`` returns those ids.

Kinds, and the rule ``kind="auto"`` follows for N vectors of dimension D:

* ``flat`` (N < 20,000): exact search, ``IndexIDMap2(IndexFlatIP)``. Brute force over 20k x 512 floats is
  about 10M multiply-adds per query: a few milliseconds.
* ``ivf`` (20,000 <= N < 1,000,000): ``IVF{nlist},Flat``, full vectors in nlist = 4 * sqrt(N) inverted lists
  (at most N / 39, so that k-means sees enough points per centroid). Search probes
  nprobe = clamp(nlist / 16, 16, 256) lists (about 6% of the vectors at N = 1M).
* ``ivfpq`` (N >= 1,000,000): as ``ivf`` but the vectors are product-quantized to D / 4 bytes (16x smaller).
  Its scores are approximate: re-rank the top results exactly from the stored embeddings.
* ``hnsw`` (explicit only): ``IndexIDMap2(IndexHNSWFlat)``, M = 32, efSearch = 128. Cannot delete in place:
  :func:`remove` rebuilds it.

IVF centroids (and PQ codebooks) are trained by k-means on the data itself, on at most 64 points per
centroid, with a fixed seed: the same input gives the same index. nprobe and efSearch are stored in the
serialized index, so a deserialized index searches as it was built to.

A refresh updates an index in place (:func:`remove`, :func:`add`) unless :func:`needs_rebuild` says to build
it anew: when the library's size calls for another kind (``auto``'s thresholds), or when an IVF index holds
more than :data:`IVF_DRIFT` times, or less than 1 / :data:`IVF_DRIFT` of, the vectors its centroids were
trained on (its lists then no longer balance the data: a query probes ever longer or ever emptier lists).
HNSW cannot delete: :func:`remove` rebuilds it.

Where FAISS sees GPUs (the ``gpu`` extra's ``faiss-gpu`` on a machine with CUDA GPUs), IVF centroids are
trained by k-means on the GPUs, and :func:`on_gpus` copies an index to them for searching (the searcher
does). An index FAISS cannot move (HNSW; PQ codes of a size the GPU kernels lack) stays on the CPU. What is
serialized is always the CPU index: a library built on a GPU machine opens anywhere.
"""

from __future__ import annotations

import logging
import math

import faiss
import numpy as np

FLAT_MAX = 20_000  # below this many vectors, "auto" builds an exact index
IVF_FLAT_MAX = 1_000_000  # below this many, "auto" keeps full vectors in the IVF lists; above, PQ codes
KINDS = ("flat", "ivf", "ivfpq", "hnsw")
HNSW_M = 32
HNSW_EF_SEARCH = 128
TRAIN_POINTS_PER_CENTROID = 64
_IP = faiss.METRIC_INNER_PRODUCT

log = logging.getLogger(__name__)


def auto_kind(n: int) -> str:
    """The kind ``build_index(kind="auto")`` picks for ``n`` vectors (see the module docstring)."""
    if n < FLAT_MAX:
        return "flat"
    return "ivf" if n < IVF_FLAT_MAX else "ivfpq"


def _nlist(n: int) -> int:
    return max(1, min(round(4 * math.sqrt(n)), n // 39))


def _nprobe(nlist: int) -> int:
    return min(nlist, max(16, min(256, nlist // 16)))


def _pq_bytes(d: int) -> int:
    """The largest divisor of ``d`` that is at most ``d / 4`` (the PQ code size in bytes)."""
    return next(m for m in range(max(1, d // 4), 0, -1) if d % m == 0)


def _checked(ids: np.ndarray, vectors: np.ndarray, d: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    ids = np.ascontiguousarray(ids, dtype=np.int64).reshape(-1)
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    if vectors.ndim != 2 or len(vectors) != len(ids):
        raise ValueError(f"need vectors of shape (N, D) for N={len(ids)} ids, got {vectors.shape}")
    if d is not None and vectors.shape[1] != d:
        raise ValueError(f"the index holds vectors of dimension {d}, got {vectors.shape[1]}")
    if len(ids) and ids.min() < 0:
        raise ValueError("ids must be >= 0 (-1 means 'no result')")
    if len(np.unique(ids)) != len(ids):
        raise ValueError("ids must be unique")
    return ids, vectors


def build_index(ids: np.ndarray, vectors: np.ndarray, kind: str = "auto", seed: int = 0) -> faiss.Index:
    """An inner-product index of ``vectors`` (N, D) under the unique int64 ``ids`` (N,), ids >= 0.

    ``kind`` is ``"auto"`` or one of :data:`KINDS`. Empty input gives an empty ``flat`` index (an IVF index
    cannot be trained on nothing). ``seed`` seeds the k-means training of ``ivf``/``ivfpq``.
    """
    ids, vectors = _checked(ids, vectors)
    n, d = vectors.shape
    kind = auto_kind(n) if kind == "auto" else kind
    if kind not in KINDS:
        raise ValueError(f"unknown index kind {kind!r}; use 'auto' or one of {', '.join(KINDS)}")
    if n == 0:
        kind = "flat"
    if kind == "flat":
        index = faiss.index_factory(d, "IDMap2,Flat", _IP)
    elif kind == "hnsw":
        index = faiss.index_factory(d, f"IDMap2,HNSW{HNSW_M}", _IP)
        faiss.ParameterSpace().set_index_parameter(index, "efSearch", HNSW_EF_SEARCH)
    else:
        nlist = _nlist(n)
        codes = "Flat" if kind == "ivf" else f"PQ{_pq_bytes(d)}x8"
        index = faiss.index_factory(d, f"IVF{nlist},{codes}", _IP)
        clusterings = [index.cp]
        if kind == "ivfpq":
            clusterings.append(index.pq.cp)
            index.do_polysemous_training = False  # the factory's default; slow and unused by our search
        for cp in clusterings:
            cp.seed = seed
            cp.max_points_per_centroid = TRAIN_POINTS_PER_CENTROID
        flat = faiss.IndexFlatIP(d)  # k-means assigns by the coarse quantizer's metric...
        kmeans = on_gpus(flat)  # ... on the GPUs where there are any
        if kmeans is not flat:
            index.clustering_index = kmeans
        index.train(vectors)
        index.clustering_index = None  # the GPU index lives only as long as this call
        index.nprobe = _nprobe(nlist)
    index.add_with_ids(vectors, ids)
    return index


IVF_DRIFT = 2.0  # an IVF index is rebuilt once it holds this factor more (or fewer) vectors than it saw


def needs_rebuild(kind: str, ntotal: int, trained_on: int) -> bool:
    """Whether an index of ``kind`` whose centroids saw ``trained_on`` vectors should be built anew to hold
    ``ntotal`` (see the module docstring)."""
    if kind == "hnsw":
        return False  # chosen explicitly, never by "auto"; remove() rebuilds it when it must
    if auto_kind(ntotal) != kind:
        return True
    return kind != "flat" and not trained_on / IVF_DRIFT <= ntotal <= trained_on * IVF_DRIFT


def _inner(index: faiss.Index) -> faiss.Index:
    return faiss.downcast_index(index.index) if isinstance(index, faiss.IndexIDMap2) else index


def kind_of(index: faiss.Index) -> str:
    """``"flat"``, ``"ivf"``, ``"ivfpq"`` or ``"hnsw"``."""
    inner = _inner(index)
    for cls, kind in (
        (faiss.IndexFlat, "flat"),
        (faiss.IndexIVFFlat, "ivf"),
        (faiss.IndexIVFPQ, "ivfpq"),
        (faiss.IndexHNSW, "hnsw"),
    ):
        if isinstance(inner, cls):
            return kind
    raise ValueError(f"not an index built by pipeline.index: {type(inner).__name__}")


def add(index: faiss.Index, ids: np.ndarray, vectors: np.ndarray) -> None:
    """Add ``vectors`` under ``ids`` (unique, not yet in the index: remove changed ones first)."""
    ids, vectors = _checked(ids, vectors, index.d)
    index.add_with_ids(vectors, ids)


def remove(index: faiss.Index, ids: np.ndarray) -> faiss.Index:
    """The index without ``ids`` (absent ones are ignored); use the returned index afterwards.

    ``flat``/``ivf``/``ivfpq`` indexes are changed in place and returned; ``hnsw`` is rebuilt without them.
    """
    ids = np.ascontiguousarray(ids, dtype=np.int64).reshape(-1)
    if kind_of(index) != "hnsw":
        index.remove_ids(ids)
        return index
    all_ids = faiss.vector_to_array(index.id_map)
    keep = ~np.isin(all_ids, ids)
    vectors = _inner(index).reconstruct_n(0, index.ntotal)
    return build_index(all_ids[keep], vectors[keep], "hnsw")


def memory_bytes(index: faiss.Index) -> int:
    """About the memory ``index`` holds: its vectors' codes, links (HNSW) and ids; not the IVF centroids (a
    few percent) nor the allocator's slack."""
    inner = _inner(index)
    if kind_of(index) == "hnsw":
        per_vector = inner.d * 4 + 2 * HNSW_M * 4  # the vector, and its links on the bottom layer
    else:
        per_vector = inner.sa_code_size()
    return index.ntotal * (per_vector + 16)  # an id, and its reverse map entry (IndexIDMap2)


def ids_of(index: faiss.Index) -> np.ndarray:
    """The ids an index holds (int64, in storage order)."""
    if isinstance(index, faiss.IndexIDMap2):
        return faiss.vector_to_array(index.id_map).astype(np.int64)
    lists = faiss.extract_index_ivf(index).invlists
    return np.concatenate(
        [np.empty(0, np.int64)]
        + [
            faiss.rev_swig_ptr(lists.get_ids(i), lists.list_size(i)).astype(np.int64)
            for i in range(lists.nlist)
        ]
    )


def search(
    index: faiss.Index, queries: np.ndarray, k: int, among: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` best ids per query and their inner products: ``(scores, ids)``, both (Q, k), best first.

    ``queries`` is (Q, D) or one (D,) vector (then Q = 1). Where fewer than ``k`` results exist (k larger
    than the index, or too few in the probed lists) the ids are -1 and the scores ``-inf``. ``among``: only
    these ids are results (a search within a part of the library, on the CPU index); an IVF index then
    probes as many times more lists (an HNSW index explores as many more nodes) as the part is smaller than
    the index, so that a restricted search weighs about as many of the part's vectors as an open one.
    """
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    queries = queries.reshape(1, -1) if queries.ndim == 1 else queries
    if queries.ndim != 2 or queries.shape[1] != index.d:
        raise ValueError(f"need queries of shape (Q, {index.d}), got {queries.shape}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if among is None:
        scores, ids = index.search(queries, k)
    else:
        among = np.ascontiguousarray(among, dtype=np.int64)
        selector = faiss.IDSelectorBatch(among)  # referenced here for as long as the search runs
        widen = index.ntotal / max(len(among), 1)
        inner = _inner(index)
        if isinstance(inner, faiss.IndexIVF):
            nprobe = min(inner.nlist, math.ceil(inner.nprobe * widen))
            params = faiss.SearchParametersIVF(sel=selector, nprobe=nprobe)
        elif isinstance(inner, faiss.IndexHNSW):
            ef = min(max(index.ntotal, k), math.ceil(max(inner.hnsw.efSearch, k) * widen))
            params = faiss.SearchParametersHNSW(sel=selector, efSearch=ef)
        else:
            params = faiss.SearchParameters(sel=selector)
        scores, ids = index.search(queries, k, params=params)
    scores[ids < 0] = -np.inf
    return scores, ids


def on_gpus(index: faiss.Index) -> faiss.Index:
    """``index`` copied to every GPU FAISS sees (its search parameters kept), or ``index`` itself where FAISS
    sees none (``faiss-cpu``; no CUDA device) or cannot move it (logged once per kind)."""
    if faiss.get_num_gpus() == 0:
        return index
    try:
        return faiss.index_cpu_to_all_gpus(index)
    except (RuntimeError, AttributeError) as e:  # AttributeError: a faiss build without its GPU classes
        kind = type(_inner(index)).__name__
        if kind not in _CPU_ONLY:
            _CPU_ONLY.add(kind)
            log.info("FAISS keeps a %s index on the CPU: %s", kind, e)
        return index


_CPU_ONLY: set[str] = set()  # index classes on_gpus could not move
GPU_MAX_K = 2048  # the most results per query that FAISS's GPU kernels select (more: the CPU index answers)


def serialize(index: faiss.Index) -> bytes:
    """The index as bytes (FAISS's own format, with its search parameters)."""
    return faiss.serialize_index(index).tobytes()


def deserialize(data: bytes | memoryview) -> faiss.Index:
    """The index that :func:`serialize` wrote."""
    return faiss.deserialize_index(np.frombuffer(data, dtype=np.uint8))


def describe(index: faiss.Index) -> str:
    """One line: kind, search parameters, size; e.g. ``ivf (nlist=102, nprobe=16): 4000 vectors, dim 32``."""
    kind = kind_of(index)
    inner = _inner(index)
    if kind == "flat":
        params = "exact"
    elif kind == "hnsw":
        params = f"efSearch={inner.hnsw.efSearch}"
    else:
        params = f"nlist={inner.nlist}, nprobe={inner.nprobe}"
        params += f", {inner.pq.M} bytes/vector" if kind == "ivfpq" else ""
    return f"{kind} ({params}): {index.ntotal} vectors, dim {index.d}"
