"""Local copies of a remote library's immutable files: a library queried again reads its index and its
parts' lookup columns from them, a damaged copy is read again from the library, the cache keeps its size."""

from __future__ import annotations

import logging
import shutil
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from fault_proxy import FaultProxy
from helpers import MotoS3, part_row, write_video

from pipeline.cli import main
from pipeline.embed.job import embed, refresh
from pipeline.embed.options import EmbedOptions
from pipeline.library import Library, LibraryWriter
from pipeline.library.index import build_index
from pipeline.library.local_cache import LocalCache
from pipeline.library.reader import embedded_rows
from pipeline.models import VideoTextModel, load_model
from pipeline.search import Searcher
from pipeline.search.service import ServiceOptions
from pipeline.search.service.follow import VersionFollower
from pipeline.storage import Store

QUERY = "a red square moving left"


@pytest.fixture(scope="module")
def model(tiny_model: Path) -> VideoTextModel:
    return load_model(str(tiny_model))


@pytest.fixture
def remote_library(s3: MotoS3, bucket: str, model: VideoTextModel) -> str:
    """A library of three parts of 20 rows on the moto server."""
    uri = f"s3://{bucket}/lib"
    writer = LibraryWriter(
        Store(uri, s3.options), embedding_dim=model.embedding_dim, prompt_shape=model.rerank_shape
    )
    rng, shapes = np.random.default_rng(0), (model.embedding_dim, int(np.prod(model.rerank_shape)))
    parts = []
    for start in range(0, 60, 20):
        rows = [part_row(i, f"s3://v/{i}.mp4", 0, True, rng, shapes, model.identity.tag, 1.0)
                for i in range(start, start + 20)]  # fmt: skip
        parts.append(writer.write_part(pa.Table.from_pylist(rows, writer.schema)))
    index = build_index(*embedded_rows(writer.store, parts, writer.schema))
    writer.publish(parts, index, model.identity, None)
    return uri


def library_reads(proxy: FaultProxy) -> list[str]:
    """The paths of the index and part files the proxy was asked for (then forgotten)."""
    paths = [path for method, path, _ in proxy.faults.seen if method == "GET"]
    proxy.faults.seen.clear()
    return [path for path in paths if "/index/" in path or "/parts/" in path]


def test_a_query_of_a_remote_library_again_reads_local_copies(
    s3: MotoS3, remote_library: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    monkeypatch.setenv("VIDEOSEARCH_CACHE", str(tmp_path / "cache"))
    proxy = FaultProxy(s3.endpoint_url)
    try:
        query = ["query", remote_library, QUERY, "-k", "5", "--json", "--endpoint-url", proxy.url]
        assert main(query) == 0
        first = capsys.readouterr().out
        assert len(library_reads(proxy)) >= 4  # the index file, then every part's footer and columns
        assert main(query) == 0
        assert capsys.readouterr().out == first and library_reads(proxy) == []
    finally:
        proxy.close()
    assert len(list((tmp_path / "cache").iterdir())) == 4  # the index and three parts' columns
    monkeypatch.setenv("VIDEOSEARCH_CACHE", "off")
    assert main([*query[:-2], "--endpoint-url", s3.endpoint_url]) == 0 and capsys.readouterr().out == first


def test_damaged_copies_are_read_again_from_the_library(
    s3: MotoS3, remote_library: str, tmp_path: Path, model: VideoTextModel
) -> None:
    cache = LocalCache(tmp_path / "cache", 1 << 30)
    proxy = FaultProxy(s3.endpoint_url)
    try:
        options = replace(s3.options, endpoint_url=proxy.url)
        expected = Searcher.open(remote_library, options, cache=cache).search(QUERY, k=60)
        for copy in (tmp_path / "cache").iterdir():
            data = bytearray(copy.read_bytes())
            data[len(data) // 2] ^= 1  # one bit flipped on disk: the copy still parses
            copy.write_bytes(data)
        proxy.faults.seen.clear()
        again = Searcher.open(remote_library, options, cache=cache).search(QUERY, k=60)
        assert len(library_reads(proxy)) >= 4 and [h.to_dict() for h in again] == [
            h.to_dict() for h in expected
        ]
        Searcher.open(remote_library, options, cache=cache)
        assert library_reads(proxy) == []  # the copies made whole again
    finally:
        proxy.close()


def test_a_restarted_service_reads_its_local_copies(s3: MotoS3, remote_library: str, tmp_path: Path) -> None:
    options = ServiceOptions(cache=LocalCache(tmp_path / "cache", 1 << 30))
    proxy = FaultProxy(s3.endpoint_url)
    try:
        store = Store(remote_library, replace(s3.options, endpoint_url=proxy.url))
        first = VersionFollower(store, options).searcher().search(QUERY, k=60)
        assert len(library_reads(proxy)) >= 4
        again = VersionFollower(store, options).searcher().search(QUERY, k=60)  # a restart
        assert library_reads(proxy) == [] and [h.to_dict() for h in again] == [h.to_dict() for h in first]
    finally:
        proxy.close()


def test_a_refresh_of_a_remote_library_reads_only_the_parts_new_since(
    s3: MotoS3, bucket: str, tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("VIDEOSEARCH_CACHE", str(tmp_path / "cache"))
    videos, library = tmp_path / "videos", f"s3://{bucket}/refreshed"
    videos.mkdir()
    for seed in range(3):
        write_video(videos / f"{seed}.mp4", 8, 48, 40, fps=6, seed=seed)
    proxy = FaultProxy(s3.endpoint_url)
    try:
        storage = replace(s3.options, endpoint_url=proxy.url)
        options = EmbedOptions(model=str(tiny_model), storage=storage, gpus_per_encoder=0)
        embed(str(videos), library, options)  # its part copied as the job reads its rows back
        (first,) = Library.open(library, storage).snapshot.parts
        library_reads(proxy)
        write_video(videos / "3.mp4", 8, 48, 40, fps=6, seed=3)
        assert refresh(str(videos), library, options).changes["new"] == 1
        assert not any(path.endswith(first.path) for path in library_reads(proxy))
        nothing = refresh(str(videos), library, options)
        assert (nothing.published, nothing.ok, library_reads(proxy)) == (False, 4, [])
        monkeypatch.setenv("VIDEOSEARCH_CACHE", "off")
        refresh(str(videos), library, options)
        assert len(library_reads(proxy)) >= 2  # without copies: every part read
    finally:
        proxy.close()


def test_the_cache_keeps_its_size_dropping_the_least_recently_used(tmp_path: Path) -> None:
    cache = LocalCache(tmp_path, max_bytes=20)  # each copy takes 4 bytes more: its CRC-32
    cache.put("a", b"aaaaaa")
    cache.put("big", b"b" * 17)  # larger than the whole cache: not kept
    assert cache.get("big") is None and cache.get("a") == b"aaaaaa"
    time.sleep(0.01)
    cache.put("c", b"cccc")  # 18 bytes in all
    time.sleep(0.01)
    cache.put("d", b"dd")  # a, the least recently used, goes
    assert (cache.get("a"), cache.get("c"), cache.get("d")) == (None, b"cccc", b"dd")


def test_the_environment_names_the_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VIDEOSEARCH_CACHE", "off")
    assert LocalCache.from_env() is None
    monkeypatch.delenv("VIDEOSEARCH_CACHE")
    assert LocalCache.from_env(default_folder=False) is None  # the service's: only a folder named
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setenv("VIDEOSEARCH_CACHE_GB", "0.5")
    cache = LocalCache.from_env()
    assert cache is not None and (cache.root, cache.max_bytes) == (tmp_path / "videosearch", 500_000_000)
    monkeypatch.setenv("VIDEOSEARCH_CACHE_GB", "lots")
    with pytest.raises(ValueError, match="VIDEOSEARCH_CACHE_GB must be a number of GB, got 'lots'"):
        LocalCache.from_env()


def test_a_cache_that_cannot_be_written_is_skipped_with_one_warning(tmp_path: Path, caplog) -> None:
    (tmp_path / "a file").write_bytes(b"")
    cache = LocalCache(tmp_path / "a file" / "cache", 1 << 20)
    with caplog.at_level(logging.WARNING):
        cache.put("x", b"1")
        cache.put("y", b"2")
    assert cache.get("x") is None
    assert len(caplog.messages) == 1 and "not keeping copies in" in caplog.messages[0]


def test_a_local_library_is_not_copied(tmp_path: Path) -> None:
    shutil.copytree(Path(__file__).parents[1] / "data" / "library-format1", tmp_path / "lib")
    assert Library.open(str(tmp_path / "lib"), cache=LocalCache(tmp_path / "cache", 1 << 30)).cache is None
