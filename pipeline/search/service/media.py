"""Where a browser can play a library's source videos.

A video on an object store that signs URLs (S3 and S3-compatible stores, GCS...) plays from a presigned URL:
the bytes go from the store to the browser, not through the service. A video on the local disk plays from
the service's ``/videos/{id}/media``, a file response that answers HTTP range requests (browsers seek with
them). A video on a web server (an ``http(s)://`` source) plays from its own URL. A video on any other
storage has no playable URL.
"""

from __future__ import annotations

import logging
import re
import time

from fastapi.responses import FileResponse
from starlette.types import Receive, Scope, Send

from ...storage import StorageError, StorageOptions, Store
from .lru import LRU

log = logging.getLogger(__name__)

PRESIGNED_KEPT = 4096  # presigned URLs kept for reuse, by source URI
_RANGE_SPEC = re.compile(r"(\d+)-(\d*)|-(\d+)")  # RFC 9110 14.1.1: first-last, first-, -suffix


def valid_range(header: str) -> bool:
    """Whether ``header`` (a Range header's value) is a byte-ranges specifier as RFC 9110 writes it:
    ``bytes=`` and comma-separated ranges, none whose last byte comes before its first."""
    unit, equals, ranges = header.partition("=")
    if not equals or unit.strip().lower() != "bytes":
        return False
    specs = [spec.strip() for spec in ranges.split(",")]
    matches = [_RANGE_SPEC.fullmatch(spec) for spec in specs if spec]  # empty list elements are allowed
    if not matches or not all(matches):
        return False
    return all(not m[1] or not m[2] or int(m[1]) <= int(m[2]) for m in matches)


class VideoFile(FileResponse):
    """A local video, answering range requests; a Range header it cannot read is ignored (the whole file, a
    200, as RFC 9110 allows) where Starlette would answer a plain-text 400 that a player cannot use."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        headers = [
            (name, value)
            for name, value in scope["headers"]
            if name != b"range" or valid_range(value.decode("latin-1"))
        ]
        await super().__call__({**scope, "headers": headers}, receive, send)


class MediaLinks:
    """Playable locations of source videos, read with the library's storage ``options``; presigned URLs
    live ``ttl_s`` seconds and are reused while more than half of that remains."""

    def __init__(self, options: StorageOptions, ttl_s: int) -> None:
        self.options = options
        self.ttl_s = ttl_s
        self._presigned: LRU[tuple[str, float]] = LRU(PRESIGNED_KEPT)

    def local_path(self, uri: str) -> str | None:
        """The path of ``uri`` on this machine's disk, or ``None`` when it is elsewhere."""
        store = Store(uri, self.options)
        return store.path() if store.is_local else None

    def presigned(self, uri: str) -> str | None:
        """A presigned URL of ``uri`` (an ``http(s)://`` one is its own), or ``None`` when its storage signs
        no URLs, cannot sign it (no credentials) or is the local disk."""
        if uri.startswith(("http://", "https://")):
            return uri
        now = time.time()
        cached = self._presigned.get(uri)
        if cached is not None and cached[1] - now > self.ttl_s / 2:
            return cached[0] or None  # "": this URI could not be signed (told once)
        store = Store(uri, self.options)
        if store.is_local:
            return None
        try:
            with store.errors("signing a URL of"):
                url = store.fs.sign(store.path(), expiration=self.ttl_s)
        except NotImplementedError:
            return None
        except StorageError as e:  # e.g. no credentials to sign with: the hit stays, without a playable URL
            log.warning("no playable URL: %s", e)
            url = ""
        self._presigned.put(uri, (url, now + self.ttl_s))
        return url or None
