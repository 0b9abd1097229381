"""Tests for ``pipeline.storage`` and ``pipeline.stages.list``: a real moto S3 server, and local disk."""

from __future__ import annotations

import dataclasses
import functools
import http.server
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pytest
import s3fs
from fault_proxy import FaultProxy
from helpers import write_video

from pipeline.embed.stages.decode import DecodeSettings, decode_video
from pipeline.embed.stages.list import list_objects
from pipeline.storage import (
    MAX_ATTEMPTS,
    S3_CLIENT_CONFIG,
    ObjectNotFound,
    PreconditionFailed,
    RangeNotSatisfiable,
    StorageError,
    StorageOptions,
    StorageUnavailable,
    Store,
    join,
    translate_error,
)
from xclip_core.video_transforms import VideoPreprocessor

if TYPE_CHECKING:
    from helpers import MotoS3

SECRET = "wJalrXUtnFEMI-do-not-print-K7MDENG"


def _raw_s3(s3: MotoS3) -> s3fs.S3FileSystem:
    """A plain s3fs client, independent of the code under test (for setup and for "another writer")."""
    return s3fs.S3FileSystem(endpoint_url=s3.endpoint_url, skip_instance_cache=True)


# --- listing ---


@pytest.fixture
def videos(s3: MotoS3, bucket: str) -> str:
    """``s3://<bucket>/videos/`` holding nested keys, a zero-byte object, a directory marker and a sibling."""
    raw = _raw_s3(s3)
    for key, data in {
        "videos/a.mp4": b"aaa",
        "videos/notes.txt": b"t",
        "videos/empty.mp4": b"",
        "videos/sub/b.mp4": b"bbbb",
        "videos/sub/deeper/c.mkv": b"cc",
        "videos/marker/": b"",  # a console-created "folder"
        "videos-other/x.mp4": b"x",  # shares the string prefix, not the "directory"
    }.items():
        raw.pipe_file(f"{bucket}/{key}", data)
    return f"s3://{bucket}/videos"


def test_list_s3_prefix_is_recursive_keeps_empty_objects_and_skips_markers(s3: MotoS3, videos: str) -> None:
    rows = list_objects(videos, s3.options)
    assert [r["uri"] for r in rows] == [
        f"{videos}/a.mp4",
        f"{videos}/empty.mp4",
        f"{videos}/notes.txt",
        f"{videos}/sub/b.mp4",
        f"{videos}/sub/deeper/c.mkv",
    ]
    assert [r["size"] for r in rows] == [3, 0, 1, 4, 2]
    for row in rows:
        assert isinstance(row["etag"], str) and row["etag"].strip('"')
        assert isinstance(row["mtime"], float) and abs(row["mtime"] - time.time()) < 3600
    assert list_objects(videos + "/", s3.options) == rows


def test_list_s3_glob(s3: MotoS3, videos: str) -> None:
    assert [r["uri"] for r in list_objects(f"{videos}/*.mp4", s3.options)] == [
        f"{videos}/a.mp4",
        f"{videos}/empty.mp4",
    ]
    deep = list_objects(f"{videos}/**/*.mkv", s3.options)
    assert [r["uri"] for r in deep] == [f"{videos}/sub/deeper/c.mkv"]
    assert list_objects(f"{videos}/*.avi", s3.options) == []


def test_list_s3_single_object_and_empty_prefix(s3: MotoS3, videos: str) -> None:
    [row] = list_objects(f"{videos}/sub/b.mp4", s3.options)
    assert row["uri"] == f"{videos}/sub/b.mp4" and row["size"] == 4
    assert list_objects(f"{videos}/nothing-here", s3.options) == []
    bucket_root = videos.rsplit("/", 1)[0]
    assert len(list_objects(bucket_root, s3.options)) == 6


def test_list_local(tmp_path: Path) -> None:
    (tmp_path / "sub" / "deeper").mkdir(parents=True)
    (tmp_path / "empty-dir").mkdir()
    (tmp_path / "a.mp4").write_bytes(b"aaa")
    (tmp_path / "zero.mp4").write_bytes(b"")
    (tmp_path / "sub" / "b.mkv").write_bytes(b"bb")
    (tmp_path / "sub" / "deeper" / "c.mkv").write_bytes(b"c")

    rows = list_objects(str(tmp_path))
    assert [r["uri"] for r in rows] == [
        f"{tmp_path}/a.mp4",
        f"{tmp_path}/sub/b.mkv",
        f"{tmp_path}/sub/deeper/c.mkv",
        f"{tmp_path}/zero.mp4",
    ]
    assert [r["size"] for r in rows] == [3, 2, 1, 0]
    assert all(r["etag"] is None for r in rows)
    assert rows[0]["mtime"] == pytest.approx((tmp_path / "a.mp4").stat().st_mtime)

    assert [r["uri"] for r in list_objects(f"{tmp_path}/**/*.mkv")] == [
        f"{tmp_path}/sub/b.mkv",
        f"{tmp_path}/sub/deeper/c.mkv",
    ]
    assert [r["uri"] for r in list_objects(f"file://{tmp_path}/*.mp4")] == [
        f"file://{tmp_path}/a.mp4",
        f"file://{tmp_path}/zero.mp4",
    ]
    assert [r["uri"] for r in list_objects(str(tmp_path / "a.mp4"))] == [f"{tmp_path}/a.mp4"]
    assert list_objects(str(tmp_path / "empty-dir")) == []
    assert list_objects(f"{tmp_path}/*.avi") == []
    with pytest.raises(StorageError, match="does not exist"):
        list_objects(str(tmp_path / "missing"))


def test_a_source_named_with_glob_characters_lists_what_it_names(
    s3: MotoS3, bucket: str, tmp_path: Path
) -> None:
    """A folder called ``[2024] trip`` (no glob matches it) is listed as the folder; a glob still selects."""
    raw = _raw_s3(s3)
    for key in ("trips/[2024] trip/a.mp4", "trips/[2024] trip/b[1].mp4", "trips/other/c.mp4"):
        raw.pipe_file(f"{bucket}/{key}", b"v")
    (tmp_path / "[2024] trip").mkdir()
    for name in ("a.mp4", "b[1].mp4"):
        (tmp_path / "[2024] trip" / name).write_bytes(b"v")
    for root, options in ((f"s3://{bucket}/trips", s3.options), (str(tmp_path), None)):
        folder = f"{root}/[2024] trip"
        expected = [f"{folder}/a.mp4", f"{folder}/b[1].mp4"]
        assert [r["uri"] for r in list_objects(folder, options)] == expected
        assert [r["uri"] for r in list_objects(folder + "/", options)] == expected
        assert [r["uri"] for r in list_objects(f"{folder}/b[1].mp4", options)] == [f"{folder}/b[1].mp4"]
        assert [r["uri"] for r in list_objects(f"{root}/*/a.mp4", options)] == [f"{folder}/a.mp4"]
        assert list_objects(f"{root}/[2024] tri", options) == []  # neither a glob match nor a name


@pytest.fixture
def web(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """A web server on 127.0.0.1 serving a folder (Python's: index pages, no ranges); its URL and folder."""
    folder = tmp_path / "site"
    folder.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(folder))
    handler.log_message = lambda *args: None  # quiet
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", folder
    server.shutdown()
    server.server_close()


def test_a_web_servers_videos_are_listed_by_url_with_sizes_and_dates_and_decode(web) -> None:
    """An index page gives links only: each object's size and date come from a HEAD request (a size of 0
    read as an empty object, and names got a second "http://"), and the videos decode from their URLs."""
    url, folder = web
    write_video(folder / "a clip.mp4", 12, 64, 48, seed=3)
    (folder / "notes.txt").write_bytes(b"t" * 10)
    os.utime(folder / "notes.txt", (1_700_000_000, 1_700_000_000))
    rows = list_objects(f"{url}/")
    assert [r["uri"] for r in rows] == [f"{url}/a%20clip.mp4", f"{url}/notes.txt"]
    assert [r["size"] for r in rows] == [os.path.getsize(folder / "a clip.mp4"), 10]
    assert rows[1]["mtime"] == 1_700_000_000  # from Last-Modified
    assert list_objects(f"{url}/a%20clip.mp4") == rows[:1]
    settings = DecodeSettings(4, VideoPreprocessor())
    (remote,) = decode_video(rows[0]["uri"], settings)
    (local,) = decode_video(str(folder / "a clip.mp4"), settings)
    np.testing.assert_array_equal(remote["frames"], local["frames"])


# --- errors at the edge ---


def test_missing_bucket_names_it_and_hides_credentials(s3: MotoS3, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    s3fs.S3FileSystem.clear_instance_cache()
    options = StorageOptions(endpoint_url=s3.endpoint_url, extra={"key": "testing", "secret": SECRET})
    for call in (
        lambda: list_objects("s3://no-such-bucket-4711/videos", options),
        lambda: list_objects("s3://no-such-bucket-4711/videos/*.mp4", options),
        lambda: Store("s3://no-such-bucket-4711/x.json", options).read_bytes(),
        lambda: Store("s3://no-such-bucket-4711/x.json", options).put_if("", b"1", None),
    ):
        with pytest.raises(StorageError) as info:
            call()
        message = str(info.value)
        assert "no-such-bucket-4711" in message and "does not exist" in message
        assert SECRET not in message and SECRET not in repr(info.value)
        assert not isinstance(info.value, ObjectNotFound)


def test_ranged_reads_raise_what_failed(s3: MotoS3, bucket: str, closed_endpoint: str) -> None:
    """A range past the end is its own error, a short one at the end comes back short, and a failed read
    raises: fsspec's default hands the exception back in the list, which a reader then took for bytes."""
    store = Store(f"s3://{bucket}/ranges", s3.options)
    store.write_bytes("ten.bin", b"0123456789")
    assert store.read_ranges("ten.bin", [0, 8], [4, 20]) == [b"0123", b"89"]
    with pytest.raises(RangeNotSatisfiable, match="ten.bin: the object ends before the bytes asked for"):
        store.read_ranges("ten.bin", [0, 20], [4, 30])
    fast = {"config_kwargs": {"connect_timeout": 1, "retries": {"max_attempts": 1}}}
    down = Store(f"s3://{bucket}/ranges", StorageOptions(endpoint_url=closed_endpoint, extra=fast))
    with pytest.raises(StorageUnavailable, match="cannot reach"):
        down.read_ranges("ten.bin", [0], [4])


def test_unreachable_endpoint_fails_fast(closed_endpoint: str) -> None:
    endpoint = closed_endpoint
    fast = {"config_kwargs": {"connect_timeout": 1, "retries": {"max_attempts": 1}}}
    options = StorageOptions(endpoint_url=endpoint, extra=fast)
    start = time.monotonic()
    with pytest.raises(StorageError, match="cannot reach") as info:
        list_objects("s3://some-bucket/videos", options)
    assert time.monotonic() - start < 5
    assert endpoint in str(info.value) and "--endpoint-url" in str(info.value)


def test_missing_credentials_and_profile(monkeypatch: pytest.MonkeyPatch, closed_endpoint: str) -> None:
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent/aws-config")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent/aws-credentials")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    s3fs.S3FileSystem.clear_instance_cache()
    with pytest.raises(StorageError, match="no credentials found.*--anon"):
        list_objects("s3://some-bucket/videos", StorageOptions(endpoint_url=closed_endpoint))
    with pytest.raises(StorageError, match=r"profile \(nope\) could not be found.*--profile"):
        list_objects("s3://some-bucket/videos", StorageOptions(endpoint_url=closed_endpoint, profile="nope"))
    s3fs.S3FileSystem.clear_instance_cache()


def test_access_denied_message() -> None:
    from botocore.exceptions import ClientError

    denied = ClientError({"Error": {"Code": "AccessDenied", "Message": "Access Denied"}}, "ListObjectsV2")
    wrapped = OSError(13, "Access Denied")
    wrapped.__cause__ = denied
    for exc in (denied, wrapped, PermissionError("Access Denied")):
        err = translate_error(
            exc, "s3://private/videos", "listing", StorageOptions(endpoint_url="http://e:1")
        )
        assert isinstance(err, StorageError)
        for expected in ("access denied", "s3://private/videos", "--anon", "http://e:1"):
            assert expected in str(err)


def test_an_error_raised_from_a_translated_one_keeps_its_meaning() -> None:
    from botocore.exceptions import ClientError

    missing = ClientError({"Error": {"Code": "NoSuchKey", "Message": "no such key"}}, "GetObject")
    found = translate_error(missing, "s3://b/lib/parts/p.parquet", "reading")
    assert isinstance(found, ObjectNotFound)
    found.__cause__ = missing
    damaged = RuntimeError("the library is damaged: parts/p.parquet is missing")  # what a reader makes of it
    damaged.__cause__ = found
    assert translate_error(damaged, "s3://b/lib/parts/p.parquet", "reading") is damaged


def test_local_permission_error(tmp_path: Path) -> None:
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    if os.access(locked, os.W_OK):
        pytest.skip("running as a user that ignores file permissions (root)")
    with pytest.raises(StorageError, match="permission denied"):
        Store(str(locked / "_current")).put_if("", b"1", None)


def test_missing_object(s3: MotoS3, bucket: str, tmp_path: Path) -> None:
    for uri, options in ((f"s3://{bucket}/nope.json", s3.options), (str(tmp_path / "nope.json"), None)):
        with pytest.raises(ObjectNotFound, match="nope.json"):
            Store(uri, options).read_bytes()
        with pytest.raises(FileNotFoundError):
            Store(uri, options).read_with_token()
        assert Store(uri, options).current_token() is None


# --- read/write and compare-and-swap ---


@pytest.fixture(params=["s3", "local", "memory"])
def target(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[str, StorageOptions | None]:
    """A not-yet-existing object URI (with its options) on each kind of store."""
    if request.param == "s3":
        s3: MotoS3 = request.getfixturevalue("s3")
        return f"s3://{request.getfixturevalue('bucket')}/lib/_current", s3.options
    if request.param == "local":
        return str(tmp_path / "lib" / "_current"), None
    return f"memory://{tmp_path.name}/lib/_current", None


def test_write_and_read_bytes(target: tuple[str, StorageOptions | None]) -> None:
    uri, options = target
    Store(uri, options).write_bytes("", b"hello")
    assert Store(uri, options).read_bytes() == b"hello"
    data, token = Store(uri, options).read_with_token()
    assert data == b"hello" and token == Store(uri, options).current_token()


def test_a_read_is_one_request_and_a_large_read_ranges_fetched_at_once(s3: MotoS3, bucket: str) -> None:
    data = np.random.default_rng(0).bytes(60 << 20)  # s3fs reads objects over 50 MB in ranges
    Store(f"s3://{bucket}/big", s3.options).write_bytes("", data)
    Store(f"s3://{bucket}/small", s3.options).write_bytes("", b"small")
    proxy = FaultProxy(s3.endpoint_url)
    try:
        through = dataclasses.replace(s3.options, endpoint_url=proxy.url)
        small, big = (Store(f"s3://{bucket}/{name}", through) for name in ("small", "big"))
        for store, expected in ((small, b"small"), (big, data)):
            proxy.faults.seen.clear()
            assert store.read_bytes() == expected
            assert [method for method, _, _ in proxy.faults.seen] == ["GET"]  # one request, whatever the size
        proxy.faults.seen.clear()
        assert big.read_large() == data
        methods = [method for method, _, r in proxy.faults.seen]
        assert methods == ["HEAD", "GET", "GET"] and proxy.faults.most_in_flight >= 2  # its size, then ranges
    finally:
        proxy.close()


def test_put_if_compare_and_swap(target: tuple[str, StorageOptions | None]) -> None:
    uri, options = target
    v1 = Store(uri, options).put_if("", b"1", None)
    with pytest.raises(PreconditionFailed, match="already exists"):
        Store(uri, options).put_if("", b"other", None)
    assert Store(uri, options).read_with_token() == (b"1", v1)

    v2 = Store(uri, options).put_if("", b"2", v1)
    assert v2 != v1 and Store(uri, options).read_with_token() == (b"2", v2)
    with pytest.raises(PreconditionFailed, match="changed by another writer"):
        Store(uri, options).put_if("", b"3", v1)  # stale token
    assert Store(uri, options).read_bytes() == b"2"


def test_put_if_is_enforced_by_the_s3_server(s3: MotoS3, bucket: str) -> None:
    """Another client rewrites the object behind our back: only the server can notice (no client check)."""
    uri = f"s3://{bucket}/lib/_current"
    other = _raw_s3(s3)
    token = Store(uri, s3.options).put_if("", b"1", None)
    assert token == other.info(f"{bucket}/lib/_current")["ETag"]
    other.pipe_file(f"{bucket}/lib/_current", b"written by someone else")
    with pytest.raises(PreconditionFailed):
        Store(uri, s3.options).put_if("", b"2", token)
    other.rm(f"{bucket}/lib/_current")
    with pytest.raises(PreconditionFailed, match="deleted"):
        Store(uri, s3.options).put_if("", b"2", token)


def test_put_if_race_has_exactly_one_winner(target: tuple[str, StorageOptions | None]) -> None:
    uri, options = target
    base = Store(uri, options).put_if("", b"0", None)
    writers = 2
    barrier = threading.Barrier(writers)
    outcomes: list[str] = []

    def write(i: int) -> None:
        barrier.wait()
        try:
            Store(uri, options).put_if("", f"writer {i}".encode(), base)
            outcomes.append(f"won {i}")
        except PreconditionFailed:
            outcomes.append("lost")

    threads = [threading.Thread(target=write, args=(i,)) for i in range(writers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    winners = [o for o in outcomes if o.startswith("won")]
    assert len(outcomes) == writers and len(winners) == 1, outcomes
    assert Store(uri, options).read_bytes() == f"writer {winners[0].split()[1]}".encode()


def test_local_put_if_leaves_only_the_file_and_its_lock(tmp_path: Path) -> None:
    uri = str(tmp_path / "_current")
    token = Store(uri).put_if("", b"1", None)
    Store(uri).put_if("", b"2", token)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["._current.lock", "_current"]


# --- options and URIs ---


def test_storage_options_repr_hides_secrets() -> None:
    options = StorageOptions(
        endpoint_url="http://user:pa55word@minio:9000",
        profile="dev",
        extra={"key": "AKIAEXAMPLE", "secret": SECRET, "client_kwargs": {"aws_session_token": "tok-123"}},
    )
    for text in (repr(options), str(options), f"{options}"):
        assert SECRET not in text and "AKIAEXAMPLE" not in text and "tok-123" not in text
        assert "pa55word" not in text
        assert "minio:9000" in text and "dev" in text


def test_storage_options_flags_win_over_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://generic:1")
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://s3-specific:2")
    monkeypatch.setenv("AWS_PROFILE", "env-profile")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "eu-west-1")
    monkeypatch.setenv("AWS_REGION", "eu-central-1")
    env = StorageOptions.from_env_and_flags()
    assert (env.endpoint_url, env.profile, env.region, env.anon) == (
        "http://s3-specific:2",
        "env-profile",
        "eu-central-1",
        False,
    )
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3")
    monkeypatch.delenv("AWS_REGION")
    env = StorageOptions.from_env_and_flags()
    assert (env.endpoint_url, env.region) == ("http://generic:1", "eu-west-1")

    flags = StorageOptions.from_env_and_flags(
        endpoint_url="http://flag:3",
        profile="flag-profile",
        anon=True,
        region="us-west-2",
    )
    assert (flags.endpoint_url, flags.profile, flags.region, flags.anon) == (
        "http://flag:3",
        "flag-profile",
        "us-west-2",
        True,
    )
    for name in ("AWS_ENDPOINT_URL", "AWS_PROFILE", "AWS_DEFAULT_REGION"):
        monkeypatch.delenv(name)
    assert StorageOptions.from_env_and_flags() == StorageOptions()


def test_for_protocol() -> None:
    options = StorageOptions(
        endpoint_url="http://e:1",
        profile="p",
        region="r",
        extra={"config_kwargs": {"connect_timeout": 1}, "client_kwargs": {"verify": False}},
    )
    assert options.for_protocol("s3") == {
        "anon": False,
        "endpoint_url": "http://e:1",
        "profile": "p",
        "client_kwargs": {"region_name": "r", "verify": False},
        # the defaults' retries stay, the flag's timeout wins
        "config_kwargs": {
            **S3_CLIENT_CONFIG,
            "connect_timeout": 1,
            "retries": {"mode": "standard", "total_max_attempts": MAX_ATTEMPTS},
        },
    }
    assert StorageOptions().for_protocol("s3")["config_kwargs"]["connect_timeout"] == 10
    assert "profile" not in StorageOptions(profile="p", anon=True).for_protocol("s3")
    for protocol in ("file", "memory", "gcs", "https"):
        assert options.for_protocol(protocol) == {}


def test_filesystem_and_join(s3: MotoS3, tmp_path: Path) -> None:
    store = Store("s3://bucket/a/b.json", s3.options)
    fs, path = store.fs, store.path()
    assert isinstance(fs, s3fs.S3FileSystem) and path == "bucket/a/b.json"
    store = Store(str(tmp_path / "x"))
    fs, path = store.fs, store.path()
    assert path == f"{tmp_path}/x"
    with pytest.raises(StorageError, match="nosuchproto"):
        Store("nosuchproto://x/y").path()

    assert join("s3://b/lib", "parts", "part-1.parquet") == "s3://b/lib/parts/part-1.parquet"
    assert join("s3://b/lib/", "/versions/", "3.json") == "s3://b/lib/versions/3.json"
    assert join("s3://b", "a/b") == "s3://b/a/b"
    assert join("/data/lib", "_current") == "/data/lib/_current"
    assert join("memory://lib", "", "x") == "memory://lib/x"
