"""The search service's parts that need no server: its caches, signed URLs, query checks, settings, and how
it follows a library's versions (``rollback`` publishes one without Ray)."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from urllib.parse import parse_qsl

import pytest
import torch
from helpers import DecoderKiller, pattern_frames, write_frames

from pipeline.library import VersionNotFoundError
from pipeline.library.history import rollback
from pipeline.models import load_model
from pipeline.search.service import MAX_QUERY_CHARS, ServiceOptions
from pipeline.search.service.auth import ApiKey
from pipeline.search.service.errors import ApiError
from pipeline.search.service.follow import VersionFollower
from pipeline.search.service.lru import LRU
from pipeline.search.service.media import MediaLinks
from pipeline.search.service.query import checked, truncated
from pipeline.storage import StorageOptions, Store

FORMAT1 = Path(__file__).parents[1] / "data" / "library-format1"


def test_the_cache_drops_the_least_recently_used_entry() -> None:
    cache: LRU[str] = LRU(2)
    cache.put("a", "A")
    cache.put("b", "B")
    assert cache.get("a") == "A"  # now b is the least recently used
    cache.put("c", "C")
    assert (cache.get("a"), cache.get("b"), cache.get("c")) == ("A", None, "C")
    made = []
    assert cache.get_or_make("d", lambda: made.append("d") or "D") == "D"
    assert cache.get_or_make("d", lambda: made.append("again") or "X") == "D" and made == ["d"]


def test_a_weighed_cache_keeps_entries_within_its_budget() -> None:
    cache: LRU[str] = LRU(4, weigh=len, budget=5)
    cache.put("a", "xx")
    cache.put("b", "yyy")
    cache.put("c", "zz")  # 7 > 5: the least recently used goes
    assert (cache.get("a"), cache.get("b"), cache.get("c")) == (None, "yyy", "zz")
    assert cache.get_or_make("d", lambda: "too heavy") == "too heavy"  # made, answered, not kept
    assert (cache.get("b"), cache.get("c"), cache.get("d")) == (None, None, None)


def test_a_signed_url_opens_its_own_path_until_it_expires() -> None:
    key = ApiKey("the key", ttl_s=60)
    path, _, query = key.sign("/videos/5/thumbnail?version=2").partition("?")
    params = dict(parse_qsl(query))
    assert path == "/videos/5/thumbnail" and params["version"] == "2"
    assert key.signed(path, params["expires"], params["signature"])
    assert not key.signed("/videos/6/thumbnail", params["expires"], params["signature"])
    assert not key.signed(path, str(int(params["expires"]) + 1), params["signature"])
    assert not ApiKey("another key", ttl_s=60).signed(path, params["expires"], params["signature"])
    assert not key.signed(path, None, None) and not key.signed(path, "soon", params["signature"])
    expired = ApiKey("the key", ttl_s=-1)
    _, _, query = expired.sign(path).partition("?")
    assert not expired.signed(path, *(dict(parse_qsl(query))[name] for name in ("expires", "signature")))
    assert key.accepts("the key") and not key.accepts("The key") and not key.accepts(None)


def test_without_a_key_everything_passes_and_urls_stay_plain() -> None:
    open_service = ApiKey(None, ttl_s=60)
    assert not open_service.required and open_service.accepts(None)
    assert open_service.sign("/videos/5/media?version=1") == "/videos/5/media?version=1"


def test_blank_and_oversized_queries_are_refused() -> None:
    assert checked("a red circle") == "a red circle"
    for text, words in ((" \n\t", "q: the query is empty"), ("x" * (MAX_QUERY_CHARS + 1), "at most")):
        with pytest.raises(ApiError) as refused:
            checked(text)
        assert refused.value.status == 422 and words in refused.value.message


def test_a_query_past_the_context_is_flagged_and_searched_as_cut_to_it() -> None:
    model = load_model(None)  # the bundled model: CLIP's tokenizer, a 77-token context
    fits = " ".join(["red"] * 75)  # 75 words + the start and end tokens: 77
    longer = fits + " and a blue square"
    assert not truncated(model, fits) and truncated(model, longer)
    assert torch.equal(
        model.encode_texts([longer]), model.encode_texts([fits])
    )  # the words past it: unsearched


def test_settings_refuse_impossible_values() -> None:
    for wrong in (
        {"poll_s": 0},
        {"api_key": " "},
        {"cached_versions": 0},
        {"cached_versions_mb": -1},
        {"cached_texts": 0},
        {"url_ttl_s": 0},
        {"max_upload_mb": 0},
        {"max_decode_s": 0},
    ):
        with pytest.raises(ValueError):
            ServiceOptions(**wrong)


def test_the_follower_swaps_in_a_published_version_and_keeps_the_old_one(tmp_path: Path) -> None:
    shutil.copytree(FORMAT1, tmp_path / "library")
    store = Store(str(tmp_path / "library"))
    follower = VersionFollower(store, ServiceOptions())
    first = follower.searcher()
    assert first.library.version == 1 and not follower.check()

    # a manifest that a writer wrote but never published (as a killed job leaves one), published by rollback
    shutil.copy(tmp_path / "library" / "versions" / "1.json", tmp_path / "library" / "versions" / "2.json")
    assert rollback(store, 2).number == 3
    assert follower.searcher() is first  # nothing changes until the next check
    assert follower.check()
    second = follower.searcher()
    assert second.library.version == 3 and second.model is first.model  # the same weights: loaded once
    assert follower.searcher(1) is first  # the replaced version stays open
    assert [h.id for h in second.search("a red circle", k=5)] == [
        h.id for h in first.search("a red circle", k=5)
    ]
    # a repeated text is embedded once, for every version made with the same weights
    assert second.text_embedding("a red circle") is first.text_embedding("a red circle")
    with pytest.raises(VersionNotFoundError, match="no version 7; available versions: 1, 2, 3"):
        follower.searcher(7)


def test_a_version_that_cannot_be_opened_is_reported_once_and_the_current_one_keeps_serving(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A published manifest that is damaged (or a store that stays down): the service answers from the
    version it has, says so in one warning (not one per poll), and says when it follows again."""
    shutil.copytree(FORMAT1, tmp_path / "library")
    store = Store(str(tmp_path / "library"))
    follower = VersionFollower(store, ServiceOptions())
    first = follower.searcher()
    (tmp_path / "library" / "versions" / "2.json").write_text("{")
    (tmp_path / "library" / "_current").write_text("2")
    with caplog.at_level("WARNING"):
        for _ in range(3):
            follower.follow_once()
    assert follower.searcher() is first and first.search("a red circle", k=1)
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1 and "is damaged: versions/2.json cannot be read" in warnings[0]
    (tmp_path / "library" / "_current").write_text("1")
    caplog.clear()
    with caplog.at_level("WARNING"):
        follower.follow_once()
    assert [r.getMessage() for r in caplog.records] == [f"videosearch serve: following {store.uri} again"]


def test_a_video_on_a_web_server_plays_from_its_own_url() -> None:
    links = MediaLinks(StorageOptions(), ttl_s=3600)
    assert (
        links.presigned("https://videos.example.org/a%20clip.mp4")
        == "https://videos.example.org/a%20clip.mp4"
    )
    assert links.local_path("https://videos.example.org/a%20clip.mp4") is None


def test_an_example_video_is_decoded_apart_from_the_service(tmp_path: Path) -> None:
    """An upload that kills its decoder (as a crafted file crashing FFmpeg would) is refused with a 422; the
    service stays up and decodes the next upload. One larger than the service takes is refused unread."""
    from fastapi.testclient import TestClient

    from pipeline.search.service import create_app
    from pipeline.search.service.uploads import MAX_TRIES, PREFIX

    shutil.copytree(FORMAT1, tmp_path / "library")
    # one keyframe in 300 frames: its decoder keeps it open (~0.3 s) long enough to be seen and killed
    frames = pattern_frames(300, 160, 120, "noise", 22)
    video = Path(write_frames(tmp_path / "clip.mp4", frames, 6, gop=300)).read_bytes()
    assert len(video) < 4 * 2**20
    app = create_app(str(tmp_path / "library"), options=ServiceOptions(max_upload_mb=4))
    with TestClient(app) as client:
        killer = DecoderKiller(PREFIX, b"pipeline.embed.decode_worker")
        killer.start()
        try:
            crashed = client.post("/search/like", content=video)
        finally:
            killer.done.set()
            killer.join()
        assert crashed.status_code == 422, crashed.text
        assert f"the decoder crashed on this video {MAX_TRIES} times" in crashed.json()["error"]
        assert len(killer.killed) == 1 + MAX_TRIES and client.get("/healthz").status_code == 200
        fine = client.post("/search/like", params={"k": 3}, content=video)
        assert fine.status_code == 200 and len(fine.json()["hits"]) == 3, fine.text

        refused = client.post("/search/like", content=b"\0" * (4 * 2**20 + 1))
        assert refused.status_code == 413 and "larger than 4 MiB" in refused.json()["error"]
        empty = client.post("/search/like", content=b"")
        assert empty.status_code == 422 and "holds no video" in empty.json()["error"]
        noise = client.post("/search/like", content=b"\0" * 1000)
        assert noise.status_code == 422 and "the video cannot be used as an example" in noise.json()["error"]
    assert not list(Path(tempfile.gettempdir()).glob(f"{PREFIX}*"))  # no upload left behind


def test_an_example_video_that_decodes_past_the_time_limit_is_refused(tmp_path: Path) -> None:
    from fastapi.testclient import TestClient

    from pipeline.search.service import create_app

    shutil.copytree(FORMAT1, tmp_path / "library")
    # one keyframe in 300 frames: no decoder opens, seeks and decodes it in a millisecond
    video = Path(write_frames(tmp_path / "clip.mp4", pattern_frames(300, 160, 120, "noise", 22), 6, gop=300))
    app = create_app(str(tmp_path / "library"), options=ServiceOptions(max_decode_s=0.001))
    with TestClient(app) as client:
        for _ in range(2):  # and the next upload finds a decoder again
            slow = client.post("/search/like", content=video.read_bytes())
            assert slow.status_code == 422, slow.text
            assert "the video took longer than 0.001 s to decode" in slow.json()["error"]
