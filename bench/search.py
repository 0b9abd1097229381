"""Search at library sizes users have: latency of one query end to end, and stage 1's recall.

    python bench/search.py [--rows 10000 100000 1000000] [--queries 100] [--dir /tmp/vs-bench-search]

For each size, a library is written in the library's real format (``LibraryWriter``: Parquet parts plus their
re-rank records, the FAISS index ``auto`` picks for that size, a published version) with random embeddings
clustered around random concepts (as real embeddings are: uniform random vectors have no neighbours) and
random re-rank features, at the bundled model's geometry (``--geometry base-patch32``: 512-d, 49 x 512). Then,
on a searcher opened once (its open time printed too):

* p50 / p99 latency of ``Searcher.search`` with the bundled model: text encoding, stage 1 (FAISS) and stage 2
  (the exact X-CLIP score of 200 candidates, read by id from their re-rank records); the same one result per
  video (``per_video``), and within one of the library's 100 folders (``under``: 1% of its rows);
* recall@10 of stage 1: of the 10 rows nearest to a query by exact inner product (numpy over every
  embedding), the share among stage 1's candidates (200) and among its own top 10; queries are held-out
  samples of the concepts, so that each has true neighbours; the same within a folder (its rows only);
* the bytes stage 2 reads per candidate, against the Parquet layout's (a whole row group per candidate);
* queries/s of ``videosearch serve`` (its own process) on 127.0.0.1 with 1 and 8 concurrent clients
  (``--clients``), distinct texts, for ``--seconds`` each.

Libraries are kept under ``--dir`` between runs (delete it to rebuild). A 1M-row library at the bundled
geometry takes ~10 GB of disk, mostly re-rank features.
"""

from __future__ import annotations

import argparse
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the package, not bench/pipeline.py

from pipeline.library import Library, LibraryWriter  # noqa: E402
from pipeline.library.features import record_dtype  # noqa: E402
from pipeline.library.index import build_index, describe, search  # noqa: E402
from pipeline.library.schema import part_schema  # noqa: E402
from pipeline.library.writer import ROW_GROUP_ROWS  # noqa: E402
from pipeline.models import load_model  # noqa: E402
from pipeline.search import Searcher  # noqa: E402
from pipeline.search.searcher import DEFAULT_CANDIDATES  # noqa: E402

PART_ROWS = 8192
CONCEPTS = 4096
FOLDERS = 100  # videos of 4 segments each, in folders by video number modulo this
NOISE = 0.35  # per-dimension noise around a concept, relative to the concept's unit norm / sqrt(D)
GEOMETRIES = {"bundled": None, "base-patch32": (512, (49, 512))}
CAPTIONS = [
    "a red square moving left", "a dog catching a frisbee", "waves on a beach at sunset", "a person cooking",
    "cars on a highway at night", "a cat sleeping on a sofa", "children playing football", "snow falling",
]  # fmt: skip


def concepts(dim: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((CONCEPTS, dim)).astype(np.float32)
    return centers / np.linalg.norm(centers, axis=1, keepdims=True)


def samples(centers: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` unit vectors, each a random concept plus noise."""
    dim = centers.shape[1]
    picked = centers[rng.integers(0, len(centers), n)]
    noisy = picked + rng.standard_normal((n, dim)).astype(np.float32) * (NOISE / np.sqrt(dim))
    return noisy / np.linalg.norm(noisy, axis=1, keepdims=True)


def video_uri(video: int) -> str:
    return f"{folder_uri(video % FOLDERS)}/clip-{video}.mp4"


def folder_uri(folder: int) -> str:
    return f"s3://videos/folder-{folder:02d}"


def part_table(
    start: int, n: int, dim: int, shape: tuple[int, int], centers: np.ndarray, tag: str
) -> pa.Table:
    rng = np.random.default_rng(start)
    embeddings = samples(centers, n, rng)
    prompts = rng.standard_normal((n, shape[0] * shape[1]), dtype=np.float32).astype(np.float16)
    schema = part_schema(dim, shape)
    columns = {
        "id": pa.array(np.arange(start, start + n, dtype=np.int64)),
        "uri": pa.array([video_uri(i // 4) for i in range(start, start + n)]),
        "segment": pa.array(np.arange(start, start + n) % 4, pa.int32()),
        "start_s": pa.array((np.arange(start, start + n) % 4) * 10.0),
        "end_s": pa.array((np.arange(start, start + n) % 4) * 10.0 + 10.0),
        "embedding": pa.FixedSizeListArray.from_arrays(pa.array(embeddings.reshape(-1)), dim),
        "prompt_features": pa.FixedSizeListArray.from_arrays(
            pa.array(prompts.reshape(-1)), shape[0] * shape[1]
        ),
        "model_id": pa.array([tag] * n),
    }
    return pa.table({f.name: columns.get(f.name, pa.nulls(n, f.type)) for f in schema}).cast(schema)


def build_library(root: Path, rows: int, dim: int, shape: tuple[int, int], identity) -> Library:  # noqa: ANN001
    """A published library of ``rows`` rows under ``root`` (reused when it is already there)."""
    if (root / "_current").exists():
        return Library.open(str(root))
    shutil.rmtree(root, ignore_errors=True)
    started = time.perf_counter()
    centers = concepts(dim)
    writer = LibraryWriter(str(root), embedding_dim=dim, prompt_shape=shape)
    parts, vectors = [], []
    for start in range(0, rows, PART_ROWS):
        table = part_table(start, min(PART_ROWS, rows - start), dim, shape, centers, identity.tag)
        parts.append(writer.write_part(table))
        vectors.append(table["embedding"].combine_chunks().flatten().to_numpy().reshape(-1, dim))
    vectors = np.concatenate(vectors)
    index = build_index(np.arange(rows, dtype=np.int64), vectors)
    library = Library(str(root), writer.publish(parts, index, identity, None))
    print(f"  wrote {rows} rows in {time.perf_counter() - started:.0f} s: {describe(index)}")
    return library


def recall(library: Library, dim: int, queries: int, folder: str | None = None) -> tuple[float, float]:
    """Stage 1's recall@10 within its candidates and within its own top 10, against exact search (among the
    rows of ``folder`` if given)."""
    everything = library.table(["id", "uri", "embedding"])
    if folder is not None:
        everything = everything.filter(pc.starts_with(everything["uri"], folder + "/"))
    ids = everything["id"].to_numpy()
    vectors = everything["embedding"].combine_chunks().flatten().to_numpy().reshape(-1, dim)
    held_out = samples(concepts(dim), queries, np.random.default_rng(12345))
    exact = ids[np.argsort(-(held_out @ vectors.T), axis=1)[:, :10]]
    _, found = search(library.index(), held_out, DEFAULT_CANDIDATES, None if folder is None else ids)
    within = np.mean([len(set(e) & set(f)) / 10 for e, f in zip(exact, found, strict=True)])
    top = np.mean([len(set(e) & set(f[:10])) / 10 for e, f in zip(exact, found, strict=True)])
    return float(within), float(top)


def served_queries_per_s(root: Path, clients: int, seconds: float) -> float:
    """Queries/s of ``videosearch serve`` over the library at ``root`` with ``clients`` concurrent clients."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    command = [sys.executable, "-m", "pipeline.cli", "serve", str(root), "--port", str(port)]
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                urllib.request.urlopen(f"{url}/healthz", timeout=5).close()
                break
            except OSError:
                if time.monotonic() > deadline or server.poll() is not None:
                    raise RuntimeError("videosearch serve did not come up") from None
                time.sleep(0.5)
        done = [0] * clients
        stop = time.monotonic() + seconds

        def client(number: int) -> None:
            while time.monotonic() < stop:
                text = f"{CAPTIONS[done[number] % len(CAPTIONS)]} {number}.{done[number]}"  # never cached
                urllib.request.urlopen(
                    f"{url}/search?" + urllib.parse.urlencode({"q": text}), timeout=60
                ).read()
                done[number] += 1

        threads = [threading.Thread(target=client, args=(n,)) for n in range(clients)]
        started = time.monotonic()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        return sum(done) / (time.monotonic() - started)
    finally:
        server.terminate()
        server.wait(timeout=30)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--queries", type=int, default=100)
    parser.add_argument("--geometry", choices=sorted(GEOMETRIES), default="bundled")
    parser.add_argument("--dir", type=Path, default=Path("/tmp/vs-bench-search"))
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--no-service", action="store_true", help="skip the service's queries/s")
    args = parser.parse_args()

    model = load_model(None)
    dim, shape = GEOMETRIES[args.geometry] or (model.embedding_dim, model.rerank_shape)
    record, n = record_dtype(dim, shape).itemsize, DEFAULT_CANDIDATES
    print(f"geometry {args.geometry}: embedding {dim}, re-rank features {shape}: {record} bytes a record")
    for rows in args.rows:
        print(f"{rows} rows")
        library = build_library(args.dir / f"{args.geometry}-{rows}", rows, dim, shape, model.identity)
        started = time.perf_counter()
        searcher = Searcher(library, model) if args.geometry == "bundled" else None
        if searcher is None:
            print("  latency: needs the bundled geometry (the bundled model scores it); recall only")
        else:
            lookup = searcher.rows.nbytes
            print(
                f"  searcher opened in {time.perf_counter() - started:.2f} s; its row lookup holds "
                f"{lookup / 2**20:.1f} MiB ({lookup / rows:.0f} bytes a row)"
            )
            searcher.search(CAPTIONS[0])  # warm
            for name, narrowed in (
                ("", {}),
                (", one result per video", {"per_video": True}),
                (", within a folder of 1% of the rows", {"under": folder_uri(7)}),
            ):
                times = []
                for i in range(args.queries):
                    text = f"{CAPTIONS[i % len(CAPTIONS)]} #{i}"  # distinct texts: no cached text embedding
                    started = time.perf_counter()
                    searcher.search(text, k=10, **narrowed)
                    times.append(time.perf_counter() - started)
                p50, p99 = np.percentile(np.array(times) * 1000, [50, 99])
                print(f"  one query end to end{name}: p50 {p50:.1f} ms, p99 {p99:.1f} ms")
        within, top = recall(library, dim, args.queries)
        print(f"  stage 1 recall@10: {within:.3f} within its {n} candidates, {top:.3f} in its top 10")
        within, top = recall(library, dim, args.queries, folder_uri(7))
        print(
            f"  stage 1 recall@10 within a folder: {within:.3f} within its {n} candidates, "
            f"{top:.3f} in its top 10"
        )
        parquet = ROW_GROUP_ROWS * record
        if searcher is not None and not args.no_service:
            one = served_queries_per_s(library.store.path(), 1, args.seconds)
            many = served_queries_per_s(library.store.path(), args.clients, args.seconds)
            ratio = many / one
            print(
                f"  service: {one:.1f} queries/s, 1 client; {many:.1f}, {args.clients} clients: {ratio:.2f}x"
            )
        print(f"  stage 2 reads {record} bytes a candidate; a Parquet row group: {parquet / 2**20:.1f} MiB")


if __name__ == "__main__":
    main()
