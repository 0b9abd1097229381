"""End to end: ``videosearch serve`` over libraries that the CLI built, spoken to over real HTTP.

Two libraries are embedded once for the module, with the bundled model and 2.5 s segments of 5 s H.264
clips: one on the moto S3 server (served with an API key, its videos played from presigned URLs), one on
the local disk (served open, its videos streamed by the service with range requests; its source also holds
a file that is not a video). Answers are checked against brute force over the library's stored rows; a
refresh is published while queries run; the web page is driven in Debian's headless Chromium.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pyarrow.compute as pc
import pytest
import s3fs
from helpers import MotoS3, cli_env, free_port, run, stop, videosearch, write_video

from pipeline import Library, Searcher
from pipeline.search.example import decode_example, example_embedding, example_settings
from pipeline.search.scorer import ExactScorer, StoredVideos
from pipeline.search.service import MAX_K, MAX_QUERIES

KEY = "s3cret-key"
SEGMENT = "2.5"
QUERY = "a red circle moving left"
CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
PHONE = {"width": 390, "height": 844, "pixelRatio": 2}  # a phone's screen, in CSS pixels
IMAGES_LOADED = (
    "return [...document.querySelectorAll('#results img')].every(i => i.complete && i.naturalWidth)"
)


@dataclass
class Service:
    """A running ``videosearch serve``."""

    url: str
    log: Path

    def client(self, key: str | None = None) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers={"X-API-Key": key} if key else {}, timeout=60)


@contextlib.contextmanager
def serving(
    library: str | Path, log: Path, *flags: str, env: dict[str, str] | None = None
) -> Iterator[Service]:
    """``videosearch serve LIBRARY`` on a free port, following new versions every 0.5 s."""
    url = f"http://127.0.0.1:{free_port()}"
    command = videosearch("serve", library, "--port", url.rsplit(":", 1)[1], "--poll", "0.5", *flags)
    with open(log, "wb") as out:
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=cli_env() | (env or {}))
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, f"serve exited with {proc.returncode}:\n{log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"serve did not answer in 120 s:\n{log.read_text()[-3000:]}"
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"{url}/healthz", timeout=5).status_code == 200:
                    break
            time.sleep(0.2)
        yield Service(url, log)
    finally:
        stop(proc, timeout=20)


@pytest.fixture(scope="module")
def clips(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """5 s clips at 25 fps, H.264 in MP4 (what Chromium plays), by name."""
    directory = tmp_path_factory.mktemp("service-clips")
    seeds = {"a": 1, "b": 2, "c": 3, "d": 4}
    return {
        name: Path(write_video(directory / f"{name}.mp4", 125, 160, 120, fps=25, seed=seed))
        for name, seed in seeds.items()
    }


@pytest.fixture(scope="module")
def local_library(clips: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A library on the local disk of clips a, b, c and of a file that is not a video."""
    root = tmp_path_factory.mktemp("service-local")
    source = root / "videos"
    source.mkdir()
    for name in "abc":
        shutil.copy(clips[name], source / f"{name}.mp4")
    (source / "notes.mp4").write_text("not a video")
    run("embed", source, root / "library", "--segment", SEGMENT, "--json").json()
    return root / "library"


@dataclass
class S3Library:
    bucket: str
    source: str
    uri: str
    flags: list[str]
    fs: s3fs.S3FileSystem


@pytest.fixture(scope="module")
def s3_library(s3: MotoS3, clips: dict[str, Path]) -> S3Library:
    """A library on the moto S3 server of clips a, b, c (d is added by the refresh test)."""
    bucket = s3.make_bucket("service")
    fs = s3fs.S3FileSystem(endpoint_url=s3.endpoint_url, skip_instance_cache=True)
    for name in "abc":
        fs.put_file(str(clips[name]), f"{bucket}/videos/{name}.mp4")
    built = S3Library(
        bucket, f"s3://{bucket}/videos", f"s3://{bucket}/library", ["--endpoint-url", s3.endpoint_url], fs
    )
    run("embed", built.source, built.uri, "--segment", SEGMENT, "--json", *built.flags).json()
    return built


@pytest.fixture(scope="module")
def local_service(local_library: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    with serving(local_library, tmp_path_factory.mktemp("logs") / "serve-local.log") as service:
        yield service


@pytest.fixture(scope="module")
def s3_service(s3_library: S3Library, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    """The S3 library served with an API key, given through the environment."""
    log = tmp_path_factory.mktemp("logs") / "serve-s3.log"
    with serving(s3_library.uri, log, *s3_library.flags, env={"VIDEOSEARCH_API_KEY": KEY}) as service:
        yield service


# ------------------------------------------------------------------------------------------- brute force
def embedded(library: Library, columns: list[str]) -> dict[str, Any]:
    table = library.table(columns, pc.field("error").is_null())
    return {"table": table, "ids": table["id"].to_pylist()}


def exact_ranking(library: Library, text: str) -> list[tuple[int, float]]:
    """Every embedded row by the model's exact score for ``text``, best first."""
    rows = embedded(library, ["id", "embedding", "prompt_features"])
    scorer = ExactScorer(Searcher(library).model)
    scores = scorer(
        scorer.text_embeddings([text]), StoredVideos.from_table(rows["table"], library.rerank_shape)
    )[:, 0]
    return sorted(zip(rows["ids"], scores.tolist(), strict=True), key=lambda pair: -pair[1])


def nearest_rows(library: Library, row_id: int) -> list[tuple[int, float]]:
    """Every other embedded row by the inner product of its stored embedding with row ``row_id``'s."""
    rows = embedded(library, ["id", "embedding"])
    vectors = np.stack(rows["table"]["embedding"].to_numpy(zero_copy_only=False)).astype(np.float32)
    scores = vectors @ vectors[rows["ids"].index(row_id)]
    pairs = [(i, float(s)) for i, s in zip(rows["ids"], scores, strict=True) if i != row_id]
    return sorted(pairs, key=lambda pair: -pair[1])


def ranked(hits: list[dict[str, Any]]) -> list[tuple[int, float]]:
    return [(hit["id"], hit["score"]) for hit in hits]


def best_per_video(library: Library, ranking: list[tuple[int, float]], leave_out: int | None = None) -> list:
    """The first row of each video in ``ranking``, without the video of row ``leave_out``."""
    uri = dict(zip(*library.table(["id", "uri"]).to_pydict().values(), strict=True))
    seen = {uri[leave_out]} if leave_out is not None else set()
    best = []
    for row_id, score in ranking:
        if uri[row_id] not in seen:
            seen.add(uri[row_id])
            best.append((row_id, score))
    return best


def assert_same_ranking(got: list[tuple[int, float]], expected: list[tuple[int, float]]) -> None:
    assert [i for i, _ in got] == [i for i, _ in expected]
    np.testing.assert_allclose([s for _, s in got], [s for _, s in expected], atol=1e-5, rtol=0)


# ------------------------------------------------------------------------------------------------- tests
def test_search_and_more_like_this_equal_brute_force(s3_service: Service, s3_library: S3Library, s3: MotoS3):
    library = Library.open(s3_library.uri, s3.options)
    rows = library.manifest["counts"]["segments"]
    with s3_service.client(KEY) as client:
        health = client.get("/healthz").json()
        assert health == {
            "ok": True, "library": s3_library.uri, "version": library.version, "videos": 3, "segments": 6,
            "failed": 0,
        }  # fmt: skip
        answer = client.get("/search", params={"q": QUERY, "k": rows}).json()
        assert (answer["query"], answer["version"], answer["truncated"]) == (QUERY, library.version, False)
        assert_same_ranking(ranked(answer["hits"]), exact_ranking(library, QUERY))
        top3 = client.get("/search", params={"q": QUERY, "k": 3}).json()["hits"]
        assert ranked(top3) == ranked(answer["hits"][:3])

        texts = [QUERY, "noise", "a blue square"]
        batch = client.post("/search", json={"queries": texts, "k": rows}).json()
        assert [r["query"] for r in batch["results"]] == texts and batch["version"] == library.version
        for result in batch["results"]:
            single = client.get("/search", params={"q": result["query"], "k": rows}).json()
            assert_same_ranking(ranked(result["hits"]), ranked(single["hits"]))

        for hit in answer["hits"][:3]:
            row_id = hit["id"]
            assert hit["similar_url"] == f"/videos/{row_id}/similar?version={library.version}"
            similar = client.get(f"{hit['similar_url']}&k={rows}").json()
            assert (similar["id"], similar["version"]) == (row_id, library.version)
            assert_same_ranking(ranked(similar["hits"]), nearest_rows(library, row_id))
            two = client.get(f"/videos/{row_id}/similar", params={"k": 2}).json()["hits"]
            assert ranked(two) == ranked(similar["hits"][:2])

        # one hit per video: each video's best segment, the videos in the order of their best
        per_video = client.get("/search", params={"q": QUERY, "k": rows, "per_video": True}).json()
        assert per_video["per_video"] is True and len(per_video["hits"]) == 3  # 3 videos of 2 segments
        assert_same_ranking(ranked(per_video["hits"]), best_per_video(library, exact_ranking(library, QUERY)))
        batch = client.post("/search", json={"queries": texts, "k": 2, "per_video": True}).json()
        for result in batch["results"]:
            single = client.get("/search", params={"q": result["query"], "k": 2, "per_video": True}).json()
            assert ranked(result["hits"]) == ranked(single["hits"]) and len(result["hits"]) == 2
            assert len({hit["uri"] for hit in result["hits"]}) == 2
        row_id = answer["hits"][0]["id"]
        others = client.get(f"/videos/{row_id}/similar", params={"k": rows, "per_video": True}).json()
        assert others["per_video"] is True and len(others["hits"]) == 2  # the row's own video left out
        assert_same_ranking(
            ranked(others["hits"]), best_per_video(library, nearest_rows(library, row_id), row_id)
        )


def test_rows_thumbnails_and_presigned_videos(s3_service: Service, s3_library: S3Library, s3: MotoS3):
    library = Library.open(s3_library.uri, s3.options)
    stored = {
        row["id"]: row for row in library.table(["id", "uri", "segment", "start_s", "thumbnail"]).to_pylist()
    }
    with s3_service.client(KEY) as client:
        hit = client.get("/search", params={"q": QUERY, "k": 1}).json()["hits"][0]
        row = client.get(f"/videos/{hit['id']}").json()
        expected = stored[hit["id"]]
        assert {k: row[k] for k in ("uri", "segment", "start_s")} == {
            k: expected[k] for k in ("uri", "segment", "start_s")
        }
        assert (row["width"], row["height"], row["fps"], row["error"]) == (160, 120, 25.0, None)
        assert row["duration_s"] == pytest.approx(5.0) and row["end_s"] - row["start_s"] == pytest.approx(2.5)
        assert row["size"] == s3_library.fs.size(row["uri"]) and row["version"] == library.version

        thumbnail = client.get(hit["thumbnail_url"])
        assert thumbnail.headers["content-type"] == "image/jpeg"
        assert thumbnail.content == expected["thumbnail"] and thumbnail.content[:2] == b"\xff\xd8"
        # the video plays from the store itself: a presigned URL, which needs no credentials
        assert hit["play_url"].startswith(s3_library.flags[1]) and "Signature" in hit["play_url"]
        video = httpx.get(hit["play_url"], headers={"Range": "bytes=0-99"})
        assert video.status_code == 206
        assert video.content == s3_library.fs.cat_file(hit["uri"])[:100]
        redirect = client.get(f"/videos/{hit['id']}/media")
        assert redirect.status_code == 307 and redirect.headers["location"].startswith(s3_library.flags[1])


def test_the_api_key_is_required_except_for_health_the_page_and_signed_urls(s3_service: Service):
    with s3_service.client() as anonymous, s3_service.client(KEY) as keyed:
        hit = keyed.get("/search", params={"q": QUERY, "k": 1}).json()["hits"][0]
        refused = [
            anonymous.get("/search", params={"q": QUERY}),
            anonymous.get("/search", params={"q": QUERY}, headers={"X-API-Key": "wrong"}),
            anonymous.get("/search", params={"q": QUERY}, headers={"Authorization": f"Basic {KEY}"}),
            anonymous.post("/search", json={"queries": [QUERY]}),
            anonymous.get(f"/videos/{hit['id']}"),
            anonymous.get(f"/videos/{hit['id']}/similar"),
            anonymous.get(f"/videos/{hit['id']}/thumbnail"),
            anonymous.get(hit["thumbnail_url"].replace("signature=", "signature=0")),
            anonymous.get(hit["thumbnail_url"].replace(f"/videos/{hit['id']}/", "/videos/1/")),
        ]
        for answer in refused:
            assert answer.status_code == 401, answer.request.url
            assert "API key" in answer.json()["error"]
        bearer = anonymous.get(
            "/search", params={"q": QUERY, "k": 1}, headers={"Authorization": f"Bearer {KEY}"}
        )
        assert bearer.status_code == 200 and bearer.json()["hits"][0]["id"] == hit["id"]
        assert anonymous.get(hit["thumbnail_url"]).status_code == 200  # signed: an <img> sends no header
        for open_path in ("/healthz", "/", "/static/app.js", "/openapi.json"):
            assert anonymous.get(open_path).status_code == 200, open_path
        paths = anonymous.get("/openapi.json").json()["paths"]
        assert {
            "/search",
            "/videos/{id}",
            "/videos/{id}/similar",
            "/videos/{id}/thumbnail",
            "/healthz",
        } <= set(paths)


def bad_requests(row_id: int, failed_id: int) -> list[tuple[str, str, dict[str, Any], int, str]]:
    """(method, path, request arguments, status, words of the error) of requests the service must refuse."""
    long_batch = {"queries": ["a"] * (MAX_QUERIES + 1)}
    return [
        ("GET", "/search", {"params": {"q": ""}}, 422, "empty"),
        ("GET", "/search", {"params": {"q": " \t\n "}}, 422, "empty"),
        ("GET", "/search", {}, 422, "q: Field required"),
        ("GET", "/search", {"params": {"q": "x" * 5000}}, 422, "at most 4096"),
        ("GET", "/search", {"params": {"q": QUERY, "k": 0}}, 422, "k: Input should be greater than"),
        ("GET", "/search", {"params": {"q": QUERY, "k": MAX_K + 1}}, 422, f"less than or equal to {MAX_K}"),
        ("GET", "/search", {"params": {"q": QUERY, "k": "ten"}}, 422, "k: Input should be a valid integer"),
        ("GET", "/search", {"params": {"q": QUERY, "version": 99}}, 404, "no version 99; available"),
        ("GET", "/search", {"params": {"q": QUERY, "version": 0}}, 422, "version"),
        ("POST", "/search", {"content": b'{"queries": ["a"', "headers": {"content-type": "application/json"}},
         400, "not valid JSON"),
        ("POST", "/search", {"json": ["a"]}, 422, "body"),
        ("POST", "/search", {"json": {"queries": []}}, 422, "queries"),
        ("POST", "/search", {"json": {"queries": ["fine", "  "]}}, 422, "queries[1]: the query is empty"),
        ("POST", "/search", {"json": long_batch}, 422, "queries"),
        ("POST", "/search", {"json": {"queries": ["a"], "k": 1000}}, 422, "k: Input should be less than"),
        ("GET", "/videos/12345", {}, 404, "has no row 12345"),
        ("GET", "/videos/abc", {}, 422, "id: Input should be a valid integer"),
        ("GET", "/videos/-3", {}, 422, "id: Input should be greater than or equal to 0"),
        ("GET", f"/videos/{2**70}", {}, 422, "id: Input should be less than"),
        ("GET", "/videos/12345/thumbnail", {}, 404, "has no row 12345"),
        ("GET", "/videos/12345/media", {}, 404, "has no row 12345"),
        ("GET", "/videos/12345/similar", {}, 404, "has no row 12345"),
        ("GET", f"/videos/{row_id}/similar", {"params": {"k": 0}}, 422, "k: Input should be greater"),
        ("GET", f"/videos/{row_id}", {"params": {"version": 7}}, 404, "no version 7"),
        ("GET", f"/videos/{failed_id}/thumbnail", {}, 404, "has no thumbnail"),
        ("GET", f"/videos/{failed_id}/similar", {}, 422, "has no embedding"),
        ("GET", "/nowhere", {}, 404, "Not Found"),
        ("DELETE", "/search", {}, 405, "Method Not Allowed"),
    ]  # fmt: skip


def test_bad_requests_get_a_clear_4xx_json_error(local_service: Service, local_library: Path):
    library = Library.open(str(local_library))
    rows = library.table(["id", "uri", "error"]).to_pylist()
    failed = next(row for row in rows if row["error"])
    row_id = next(row["id"] for row in rows if not row["error"])
    with local_service.client() as client:
        for method, path, arguments, status, words in bad_requests(row_id, failed["id"]):
            answer = client.request(method, path, **arguments)
            assert answer.status_code == status, (method, path, answer.text)
            assert answer.headers["content-type"] == "application/json", (method, path)
            error = answer.json()["error"]
            assert words in error and "Traceback" not in error and "\n" not in error, (method, path, error)

        # a text past the model's 77-token context is searched as cut to it, and the answer says so
        words = " ".join(["red"] * 76)  # 76 words + the start and end tokens: 78 tokens
        for text, cut in ((words, True), (" ".join(["red"] * 75), False)):
            answer = client.get("/search", params={"q": text, "k": 3}).json()
            assert answer["truncated"] is cut and len(answer["hits"]) == 3
        batch = client.post("/search", json={"queries": [QUERY, words]}).json()
        assert [r["truncated"] for r in batch["results"]] == [False, True]

        row = client.get(f"/videos/{failed['id']}").json()  # the error row of the file that is not a video
        assert row["uri"].endswith("notes.mp4") and row["error"] and row["thumbnail_url"] is None
        assert client.get("/healthz").json()["failed"] == 1


def test_local_videos_stream_with_range_requests(local_service: Service, local_library: Path):
    with local_service.client() as client:
        hit = client.get("/search", params={"q": QUERY, "k": 1}).json()["hits"][0]
        assert hit["play_url"] == f"/videos/{hit['id']}/media?version=1"
        data = Path(hit["uri"]).read_bytes()
        whole = client.get(hit["play_url"])
        assert (whole.status_code, whole.headers["content-type"], whole.content) == (200, "video/mp4", data)
        assert whole.headers["accept-ranges"] == "bytes"
        part = client.get(hit["play_url"], headers={"Range": "bytes=100-1099"})
        assert part.status_code == 206 and part.content == data[100:1100]
        assert part.headers["content-range"] == f"bytes 100-1099/{len(data)}"
        tail = client.get(hit["play_url"], headers={"Range": "bytes=-10"})
        assert tail.status_code == 206 and tail.content == data[-10:]
        for unreadable in (
            "bytes=abc",
            "items=0-10",
            "bytes=9-3",
            "bytes=",
            "0-10",
        ):  # ignored: the whole file
            answer = client.get(hit["play_url"], headers={"Range": unreadable})
            assert (answer.status_code, answer.content) == (200, data), unreadable
        beyond = client.get(hit["play_url"], headers={"Range": f"bytes={len(data)}-"})
        assert beyond.status_code == 416 and beyond.headers["content-range"] == f"bytes */{len(data)}"


def test_a_storage_failure_answers_503_and_the_service_recovers(local_service: Service, local_library: Path):
    parts, away = local_library / "parts", local_library / "parts-away"
    with local_service.client() as client:
        row_id = client.get("/search", params={"q": QUERY, "k": 1}).json()["hits"][0]["id"]
        parts.rename(away)
        try:
            for path in (f"/videos/{row_id}", f"/videos/{row_id}/thumbnail"):
                answer = client.get(path)  # each reads the row from its part file
                assert answer.status_code == 503, (path, answer.text)
                error = answer.json()["error"]
                assert "parts/part-" in error and "\n" not in error
            # more like this reads no part file: the rows' places and records are the searcher's (the records
            # of a local library mapped into memory by the search above)
            assert client.get(f"/videos/{row_id}/similar").status_code == 200
            assert client.get("/healthz").status_code == 200
        finally:
            away.rename(parts)
        assert client.get(f"/videos/{row_id}").json()["id"] == row_id


def test_videos_like_a_sent_video_equal_brute_force(
    local_service: Service, local_library: Path, clips: dict[str, Path]
):
    library = Library.open(str(local_library))
    model = Searcher(library).model
    frames = decode_example(str(clips["b"]), example_settings(model, library.manifest["decode"]))
    vector = example_embedding(model, frames)[0]
    rows = embedded(library, ["id", "embedding"])
    scores = np.stack(rows["table"]["embedding"].to_numpy(zero_copy_only=False)) @ vector
    brute = sorted(zip(rows["ids"], scores.tolist(), strict=True), key=lambda pair: -pair[1])
    sent = clips["b"].read_bytes()
    with local_service.client() as client:
        answer = client.post(
            "/search/like", params={"k": 24}, content=sent, headers={"content-type": "video/mp4"}
        )
        assert answer.status_code == 200, answer.text
        assert_same_ranking(ranked(answer.json()["hits"]), brute)
        assert answer.json()["hits"][0]["uri"].endswith("/b.mp4")  # the library's own copy of it
        one = client.post("/search/like", params={"k": 24, "per_video": True}, content=sent).json()["hits"]
        assert ranked(one) == best_per_video(library, ranked(answer.json()["hits"]))


def test_serve_refuses_a_location_without_a_library(tmp_path: Path):
    refused = run("serve", tmp_path / "nothing", "--port", str(free_port()), timeout=120)
    assert refused.code == 2 and "is not a videosearch library" in refused.stderr


# ------------------------------------------------------------------------------------------ the web page
def chromium(profile: Path) -> Any:
    """Debian's headless Chromium under Selenium; fails (never skips) when it is not installed."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service as DriverService

    missing = [str(p) for p in (CHROMIUM, CHROMEDRIVER) if not p.exists()]
    if missing:
        pytest.fail(
            f"{' and '.join(missing)} missing: `make test` installs them "
            "(apt-get install chromium chromium-driver)"
        )
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for argument in (
        "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-dev-shm-usage", "--no-first-run", f"--user-data-dir={profile}",
        "--autoplay-policy=no-user-gesture-required",
    ):  # fmt: skip
        options.add_argument(argument)
    options.add_experimental_option("mobileEmulation", {"deviceMetrics": PHONE})
    return webdriver.Chrome(options=options, service=DriverService(str(CHROMEDRIVER)))


def screenshot(driver: Any, tmp_path: Path, name: str) -> None:
    """Save a screenshot under the test's directory and under $VIDEOSEARCH_ARTIFACTS if set."""
    path = tmp_path / f"{name}.png"
    assert driver.save_screenshot(str(path))
    if os.environ.get("VIDEOSEARCH_ARTIFACTS"):
        Path(os.environ["VIDEOSEARCH_ARTIFACTS"]).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, Path(os.environ["VIDEOSEARCH_ARTIFACTS"]) / path.name)


def test_the_web_page_searches_plays_in_place_and_shows_more_like_this(
    local_service: Service, clips: dict[str, Path], tmp_path: Path
):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    with local_service.client() as client:
        expected = client.get("/search", params={"q": QUERY, "k": 24}).json()["hits"]
    driver = chromium(tmp_path / "profile")
    wait = WebDriverWait(driver, 30)
    try:
        driver.get(local_service.url)
        wait.until(lambda d: "version 1" in d.find_element(By.ID, "library").text)
        assert "4 videos · 6 segments" in driver.find_element(By.ID, "library").text
        driver.find_element(By.ID, "q").send_keys(QUERY, Keys.ENTER)
        cards = wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#results .card"))
        assert [int(card.get_attribute("data-id")) for card in cards] == [hit["id"] for hit in expected]
        wait.until(lambda d: d.execute_script(IMAGES_LOADED))
        first, hit = cards[0], expected[0]
        assert f"{hit['start_s']:.1f} s – {hit['end_s']:.1f} s" in first.text and "score" in first.text
        assert not driver.find_element(By.ID, "key").is_displayed()  # an open service asks for no key
        # a phone's screen: one column of cards, nothing wider than the screen
        assert driver.execute_script("return [window.innerWidth, document.documentElement.scrollWidth]") == [
            PHONE["width"],
            PHONE["width"],
        ]
        assert len({card.location["x"] for card in cards}) == 1

        first.find_element(By.CSS_SELECTOR, ".thumb").click()
        video = wait.until(lambda d: first.find_element(By.TAG_NAME, "video"))
        playing = "return arguments[0].currentTime"
        wait.until(lambda d: d.execute_script(playing, video) >= hit["start_s"] + 0.5)
        assert driver.execute_script("return arguments[0].error", video) is None
        assert hit["start_s"] + 0.5 <= driver.execute_script(playing, video) <= hit["end_s"] + 0.1
        screenshot(driver, tmp_path, "service-page-playing")

        first.find_element(By.CSS_SELECTOR, ".similar").click()
        wait.until(lambda d: d.find_element(By.ID, "heading").text.startswith("More like"))
        neighbours = wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#results .card"))
        with local_service.client() as client:
            similar = client.get(f"/videos/{hit['id']}/similar", params={"k": 24}).json()["hits"]
        assert [int(card.get_attribute("data-id")) for card in neighbours] == [h["id"] for h in similar]
        assert hit["id"] not in [h["id"] for h in similar]
        wait.until(lambda d: d.execute_script(IMAGES_LOADED))
        screenshot(driver, tmp_path, "service-page-more-like-this")

        # "one result per video" answers the results at hand again: the other videos' nearest segments
        with local_service.client() as client:
            params = {"k": 24, "per_video": True}
            others = client.get(f"/videos/{hit['id']}/similar", params=params).json()["hits"]
            best = client.get("/search", params={"q": QUERY, **params}).json()["hits"]
        assert len(others) < len(similar) and hit["uri"] not in [h["uri"] for h in others]
        driver.find_element(By.ID, "per-video").click()
        shown = "return [...document.querySelectorAll('#results .card')].map(c => c.dataset.id)"
        wait.until(lambda d: d.execute_script(shown) == [str(h["id"]) for h in others])
        driver.find_element(By.ID, "q").send_keys(Keys.ENTER)  # a search keeps the choice
        wait.until(lambda d: d.execute_script(shown) == [str(h["id"]) for h in best])
        assert len({h["uri"] for h in best}) == len(best) == 3  # a, b and c (notes.mp4 is an error row)
        screenshot(driver, tmp_path, "service-page-per-video")

        # "Moments in this video": the search within that video, until "whole library"
        driver.find_element(By.ID, "per-video").click()
        wait.until(lambda d: d.execute_script(shown) == [str(h["id"]) for h in expected])
        last = expected[-1]  # a card of a video that is not the best
        card = driver.find_elements(By.CSS_SELECTOR, "#results .card")[-1]
        card.find_element(By.CSS_SELECTOR, ".within").click()
        with local_service.client() as client:
            within = client.get("/search", params={"q": QUERY, "k": 24, "under": last["uri"]}).json()["hits"]
        assert {h["uri"] for h in within} == {last["uri"]} and len(within) == 2
        wait.until(lambda d: d.execute_script(shown) == [str(h["id"]) for h in within])
        heading = driver.find_element(By.ID, "heading").text
        assert f"within {Path(last['uri']).name}" in heading
        screenshot(driver, tmp_path, "service-page-within-a-video")
        driver.find_element(By.ID, "unscope").click()
        wait.until(lambda d: d.execute_script(shown) == [str(h["id"]) for h in expected])
        assert not driver.find_element(By.ID, "scope").is_displayed()

        # "videos like this one": a file sent from the page
        with local_service.client() as client:
            sent = clips["c"].read_bytes()
            like = client.post("/search/like", params={"k": 24}, content=sent).json()["hits"]
        driver.find_element(By.ID, "example").send_keys(str(clips["c"]))
        wait.until(lambda d: d.execute_script(shown) == [str(h["id"]) for h in like])
        assert driver.find_element(By.ID, "heading").text.startswith(f"Videos like {clips['c'].name}")
        screenshot(driver, tmp_path, "service-page-like-a-video")
    finally:
        driver.quit()


# ------------------------------------------------------------------------------ following a new version
def test_a_refresh_is_followed_without_a_restart_or_a_failed_request(
    s3_service: Service, s3_library: S3Library, clips: dict[str, Path]
):
    """Four clients query in a loop while ``refresh`` publishes version 2 (a new video): every request
    succeeds, each client moves from version 1 to version 2 and never back, and the new video is found."""
    new_uri = f"s3://{s3_library.bucket}/videos/d.mp4"
    with s3_service.client(KEY) as client:
        before = client.get("/search", params={"q": QUERY, "k": MAX_K}).json()
    assert before["version"] == 1 and new_uri not in {hit["uri"] for hit in before["hits"]}

    stop = threading.Event()
    answers: list[list[tuple[int, set[str]]]] = [[] for _ in range(4)]
    failures: list[str] = []

    def load(seen: list[tuple[int, set[str]]]) -> None:
        with s3_service.client(KEY) as client:
            while not stop.is_set():
                try:
                    answer = client.get("/search", params={"q": QUERY, "k": MAX_K})
                    if answer.status_code != 200:
                        failures.append(f"{answer.status_code}: {answer.text}")
                        continue
                    body = answer.json()
                    seen.append((body["version"], {hit["uri"] for hit in body["hits"]}))
                except httpx.HTTPError as err:
                    failures.append(repr(err))
                time.sleep(0.05)

    clients = [threading.Thread(target=load, args=(seen,)) for seen in answers]
    for thread in clients:
        thread.start()
    try:
        s3_library.fs.put_file(str(clips["d"]), f"{s3_library.bucket}/videos/d.mp4")
        flags = ["--segment", SEGMENT, "--json", *s3_library.flags]
        summary = run("refresh", s3_library.source, s3_library.uri, *flags).json()
        assert (summary["version"], summary["changes"]["new"]) == (2, 1)
        deadline = time.monotonic() + 30
        while not all(seen and seen[-1][0] == 2 for seen in answers):
            assert time.monotonic() < deadline, "the service did not move to version 2 in 30 s"
            time.sleep(0.2)
    finally:
        stop.set()
        for thread in clients:
            thread.join()

    assert failures == []
    for seen in answers:
        versions = [version for version, _ in seen]
        assert versions == sorted(versions) and versions[0] == 1 and versions[-1] == 2
        for version, uris in seen:
            assert (new_uri in uris) == (version == 2)
    with s3_service.client(KEY) as client:
        health = client.get("/healthz").json()
        assert (health["version"], health["videos"], health["segments"]) == (2, 4, 8)
        old = client.get("/search", params={"q": QUERY, "k": MAX_K, "version": 1}).json()
        assert_same_ranking(ranked(old["hits"]), ranked(before["hits"]))
