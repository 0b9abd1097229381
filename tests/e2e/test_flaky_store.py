"""A flaky object store costs retries, not data: the moto S3 server behind a fault-injecting proxy.

The proxy (``tests/fault_proxy.py``) answers a seeded fraction of requests with 503 SlowDown, 500, a reset
connection or a delay, or fails every request during an outage. Jobs run through the CLI against it.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import s3fs
from fault_proxy import FaultProxy, Faults
from helpers import MotoS3, Run, run, write_video

from pipeline import Library
from pipeline.embed import in_flight
from pipeline.embed.decoder_processes import DecoderProcesses
from pipeline.embed.in_flight import InFlightMarker
from pipeline.embed.job import embed as embed_job
from pipeline.embed.options import EmbedOptions
from pipeline.embed.stages.decode import DecodeSettings, DecodeVideos
from pipeline.storage import StorageOptions, StorageUnavailable, Store, translate_error
from xclip_core.video_transforms import VideoPreprocessor

VIDEOS = 8
FAST_RETRIES = {"AWS_MAX_ATTEMPTS": "2"}  # outages fail sooner (the default is 5 attempts per request)
OUTAGE = range(1, 10**9)


@pytest.fixture(scope="module")
def proxy(s3: MotoS3) -> Iterator[FaultProxy]:
    proxy = FaultProxy(s3.endpoint_url)
    yield proxy
    proxy.close()


@pytest.fixture
def source(s3: MotoS3, bucket: str, tmp_path: Path) -> str:
    """``VIDEOS`` short clips on the moto server (written around the proxy)."""
    fs = s3fs.S3FileSystem(endpoint_url=s3.endpoint_url, skip_instance_cache=True)
    for i in range(VIDEOS):
        clip = write_video(tmp_path / f"{i}.mp4", 20, 48, 40, fps=10, seed=i)
        fs.put_file(clip, f"{bucket}/videos/{i}.mp4")
    return f"s3://{bucket}/videos"


def embed(source: str, library: str, proxy: FaultProxy, faults: Faults, *flags: str, **env: str) -> Run:
    """``videosearch embed`` through the proxy while it injects ``faults``."""
    proxy.faults = faults
    try:
        return run("embed", source, library, "--endpoint-url", proxy.url, "--json", *flags, env=env)
    finally:
        proxy.faults = Faults()


def assert_clean_failure(result: Run) -> None:
    """Exit 2, one line that names the storage problem, no traceback."""
    assert result.code == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    message = [line for line in result.stderr.splitlines() if line.startswith("videosearch embed: error:")]
    assert len(message) == 1, result.stderr[-3000:]
    assert "keeps failing" in message[0] or "cannot reach" in message[0], message[0]


def objects_once(library: Library) -> dict[str, str | None]:
    """uri -> error of each object in the library, checking that each appears once."""
    table = library.table(["uri", "segment", "error"]).to_pylist()
    keys = [(row["uri"], row["segment"]) for row in table]
    assert len(keys) == len(set(keys)), "an object appears twice"
    return {row["uri"]: row["error"] for row in table}


def test_light_faults_cost_retries_only(s3: MotoS3, bucket: str, source: str, proxy: FaultProxy) -> None:
    faults = Faults(rate=0.05, seed=5, delay_s=1.0)
    summary = embed(source, f"s3://{bucket}/lib", proxy, faults).json()
    assert faults.faulted, "the proxy injected no fault"
    assert (summary["ok"], summary["failed"]) == (VIDEOS, 0)
    assert set(objects_once(Library.open(f"s3://{bucket}/lib", s3.options)).values()) == {None}


def test_heavy_faults_keep_the_library_consistent_and_a_rerun_completes_it(
    s3: MotoS3, bucket: str, source: str, proxy: FaultProxy
) -> None:
    library = f"s3://{bucket}/lib"
    first = embed(source, library, proxy, Faults(rate=0.2, seed=20, delay_s=1.0))
    if first.code == 0:  # published: every object once, and a failure names the storage problem
        errors = objects_once(Library.open(library, s3.options))
        assert len(errors) == VIDEOS
        assert all("keeps failing" in e or "cannot reach" in e for e in errors.values() if e), errors
    else:
        assert_clean_failure(first)
    summary = embed(source, library, proxy, Faults()).json()
    assert (summary["ok"], summary["failed"]) == (VIDEOS, 0)
    assert set(objects_once(Library.open(library, s3.options)).values()) == {None}


def test_a_total_outage_exits_2_in_bounded_time_and_publishes_nothing(
    s3: MotoS3, bucket: str, source: str, proxy: FaultProxy
) -> None:
    result = embed(source, f"s3://{bucket}/lib", proxy, Faults(outage=OUTAGE))
    assert_clean_failure(result)
    assert result.seconds < 60, f"a total outage took {result.seconds:.0f} s to report"
    assert not s3fs.S3FileSystem(endpoint_url=s3.endpoint_url, skip_instance_cache=True).exists(
        f"{bucket}/lib/_current"
    )


def test_an_outage_mid_job_or_while_parts_are_read_back_publishes_nothing_and_the_next_run_completes(
    s3: MotoS3, bucket: str, source: str, proxy: FaultProxy
) -> None:
    library = f"s3://{bucket}/lib"
    # on Ray: a decoder's StorageUnavailable reaches the command through Ray's wrapping
    mid_job = Faults(outage=range(15, 10**9))
    first = embed(source, library, proxy, mid_job, "--executor", "ray", **FAST_RETRIES)
    assert_clean_failure(first)
    assert Library.current_version(library, s3.options) is None

    # the parts are written, then every read of them fails: at the never-worse check, the index, the summary
    reading = Faults(outage=OUTAGE, only="/parts/", methods=("GET", "HEAD"))
    second = embed(source, library, proxy, reading, **FAST_RETRIES)
    assert_clean_failure(second)
    assert reading.faulted, "no part file was read back"
    assert Library.current_version(library, s3.options) is None

    summary = embed(source, library, proxy, Faults()).json()
    assert (summary["version"], summary["ok"], summary["failed"]) == (1, VIDEOS, 0)
    assert set(objects_once(Library.open(library, s3.options)).values()) == {None}


def test_a_store_down_while_an_in_process_job_decodes_leaves_no_crash_marker(
    s3: MotoS3, bucket: str, source: str, proxy: FaultProxy, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The store failing is not a decoder crash: the next job of the library is not sent to Ray for it."""
    monkeypatch.setattr(in_flight.tempfile, "gettempdir", lambda: str(tmp_path))
    library = f"s3://{bucket}/lib"
    options = EmbedOptions(
        storage=StorageOptions(endpoint_url=proxy.url, max_attempts=2), executor="in-process", batch_size=2
    )
    proxy.faults = Faults(outage=range(6, 10**9), only="/videos/", methods=("GET",))  # mid-decode
    try:
        with pytest.raises(StorageUnavailable, match="keeps failing"):
            embed_job(source, library, options)
    finally:
        faults, proxy.faults = proxy.faults, Faults()
    assert faults.faulted, "no read of a video failed"
    assert InFlightMarker(library).left_behind() is None
    assert not InFlightMarker(library).path.exists()


# ------------------------------------------------------------------------------- the decode stage, alone
def decoder(proxy: FaultProxy, attempts: int) -> DecodeVideos:
    settings = DecodeSettings(4, VideoPreprocessor(size=32, crop_size=32))
    return DecodeVideos(settings, StorageOptions(endpoint_url=proxy.url, max_attempts=attempts))


def listed(source: str, options: StorageOptions, names: list[str]) -> dict[str, np.ndarray]:
    uris = [f"{source}/{name}" for name in names]
    sizes = [Store(uri, options).size() for uri in uris]
    return {
        "uri": np.array(uris, object),
        "size": np.array(sizes),
        "etag": np.array([None] * len(uris), object),
        "mtime": np.array([0.0] * len(uris)),
    }


def test_a_video_whose_read_fails_transiently_is_decoded_again_not_recorded_as_failed(
    s3: MotoS3, source: str, proxy: FaultProxy
) -> None:
    batch = listed(source, s3.options, ["0.mp4", "1.mp4"])
    # the first video's first request fails through both of its attempts: the video is read again
    proxy.faults = Faults(outage=range(1, 3), kinds=("internal",))
    try:
        rows = decoder(proxy, attempts=2).decode(batch)
    finally:
        faults, proxy.faults = proxy.faults, Faults()
    assert faults.faulted == {"internal": 2}
    assert list(rows["error"]) == [None, None]
    assert list(rows["uri"]) == list(batch["uri"])


def test_a_store_that_stays_down_stops_the_decoder_instead_of_failing_each_video(
    s3: MotoS3, source: str, proxy: FaultProxy
) -> None:
    batch = listed(source, s3.options, ["0.mp4", "1.mp4"])
    proxy.faults = Faults(outage=OUTAGE, kinds=("slowdown",))
    try:
        with pytest.raises(StorageUnavailable, match="keeps failing"):
            decoder(proxy, attempts=2).decode(batch)
    finally:
        proxy.faults = Faults()


def test_decoder_processes_read_the_store_as_the_stage_does_and_stop_the_job_when_it_stays_down(
    s3: MotoS3, source: str, proxy: FaultProxy
) -> None:
    """An in-process job's decoder processes (its jobs of more than 64 objects) get the storage options
    across the process boundary, and a store that stays down is raised in the job, not turned into rows."""
    batch = listed(source, s3.options, ["0.mp4", "1.mp4"])
    here = decoder(proxy, attempts=2)
    with DecoderProcesses(here.settings, here.storage_options, processes=1) as workers:
        [[decoded]] = list(workers.decoded(iter([batch]), depth=0))
        expected = here.decode(batch)
        assert list(decoded["error"]) == [None, None]
        np.testing.assert_array_equal(decoded["frames"], expected["frames"])
        proxy.faults = Faults(outage=OUTAGE, kinds=("slowdown",))
        try:
            with pytest.raises(StorageUnavailable, match="keeps failing"):
                list(workers.decoded(iter([batch]), depth=0))
        finally:
            proxy.faults = Faults()


@pytest.mark.parametrize(
    ("code", "transient"),
    [("SlowDown", True), ("503", True), ("500", True), ("InternalError", True), ("NoSuchKey", False)],
)
def test_transient_failures_are_told_apart(code: str, transient: bool) -> None:
    from botocore.exceptions import ClientError

    error = ClientError({"Error": {"Code": code, "Message": "m"}}, "GetObject")
    translated = translate_error(error, "s3://b/k", "reading")
    assert isinstance(translated, StorageUnavailable) == transient
