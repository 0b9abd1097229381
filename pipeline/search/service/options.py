"""The search service's settings, and the limits its API documents."""

from __future__ import annotations

from dataclasses import dataclass

from ...library.local_cache import LocalCache

MAX_K = 100  # results per query (k), and neighbours per "more like this"
MAX_QUERIES = 32  # texts in one POST /search
MAX_QUERY_CHARS = 4096  # longer texts are refused; a text past the model's context is truncated and says so
MAX_UNDER = 4096  # characters of the folder a search is restricted to


@dataclass(frozen=True)
class ServiceOptions:
    """How ``videosearch serve`` runs.

    ``api_key``: when set, every endpoint but ``/healthz``, the page and the API's schema wants it
    (``X-API-Key`` or ``Authorization: Bearer``). ``poll_s``: how often the library's ``_current`` is read to
    follow new versions. ``cached_versions``: searchers of other versions than the current one kept open
    (``?version=N``; the version a new one replaced among them), at most ``cached_versions_mb`` MiB of
    memory together (their indexes and row lookups: a large library's versions are opened again when asked
    for rather than held). ``cached_texts``: text embeddings of recent queries kept. ``url_ttl_s``: the
    lifetime of the presigned and signed URLs that answers carry. ``max_upload_mb``: the largest example
    video that ``POST /search/like`` takes; ``max_decode_s``: how long its decoding may take (past it, a
    422). ``cache``: where to keep local copies of a remote library's index files and parts' lookup columns
    (:mod:`~pipeline.library.local_cache`; on a volume that outlives the service, a restart reads them).
    """

    api_key: str | None = None
    poll_s: float = 2.0
    cached_versions: int = 4
    cached_versions_mb: int = 1024
    cached_texts: int = 1024
    url_ttl_s: int = 3600
    max_upload_mb: int = 256
    max_decode_s: float = 60.0
    cache: LocalCache | None = None

    def __post_init__(self) -> None:
        if self.api_key is not None and not self.api_key.strip():
            raise ValueError("the API key is empty")
        if not self.poll_s > 0:
            raise ValueError(f"the poll interval must be positive, got {self.poll_s}")
        if self.cached_versions < 1 or self.cached_texts < 1:
            raise ValueError("the caches need room for at least one entry")
        if self.cached_versions_mb < 0:
            raise ValueError(
                f"the other versions' memory must be at least 0 MiB, got {self.cached_versions_mb}"
            )
        if self.max_upload_mb < 1:
            raise ValueError(f"the largest upload must be at least 1 MiB, got {self.max_upload_mb}")
        if not self.max_decode_s > 0:
            raise ValueError(f"the decoding time limit must be positive, got {self.max_decode_s}")
        if self.url_ttl_s < 1:
            raise ValueError(f"the URL lifetime must be at least 1 s, got {self.url_ttl_s}")
