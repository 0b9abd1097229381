"""The optional API key, and the signed URLs that let a browser load thumbnails and videos without it.

With a key set, a request shows it as ``X-API-Key: KEY`` or ``Authorization: Bearer KEY``. An ``<img>`` or
``<video>`` element cannot send a header, so the thumbnail and media URLs in the service's answers carry a
signature instead, as a presigned S3 URL does: ``?expires=UNIX_TIME&signature=HMAC`` (HMAC-SHA256 of the
path and the expiry, keyed with the API key). Such a URL opens that one path, until it expires.
"""

from __future__ import annotations

import hashlib
import hmac
import time
from urllib.parse import parse_qsl, urlencode


class ApiKey:
    """Checks requests against ``key``; with ``key`` ``None`` every request passes and URLs go unsigned."""

    def __init__(self, key: str | None, ttl_s: int) -> None:
        self._key = key.encode() if key else None
        self.ttl_s = ttl_s

    @property
    def required(self) -> bool:
        return self._key is not None

    def accepts(self, key: str | None) -> bool:
        """Whether ``key`` is the API key (always, when none is set)."""
        if self._key is None:
            return True
        return key is not None and hmac.compare_digest(key.encode(), self._key)

    def sign(self, url: str) -> str:
        """``url`` (a path, optionally with a query) with an expiry and a signature added (as it is, when no
        key is set)."""
        if self._key is None:
            return url
        path, _, query = url.partition("?")
        expires = int(time.time()) + self.ttl_s
        params = [*parse_qsl(query), ("expires", str(expires)), ("signature", self._signature(path, expires))]
        return f"{path}?{urlencode(params)}"

    def signed(self, path: str, expires: str | None, signature: str | None) -> bool:
        """Whether ``signature`` is this service's for ``path`` with ``expires``, and not expired."""
        if self._key is None or not expires or not signature or not expires.isdigit():
            return False
        if int(expires) < time.time():
            return False
        return hmac.compare_digest(signature, self._signature(path, int(expires)))

    def _signature(self, path: str, expires: int) -> str:
        assert self._key is not None
        return hmac.new(self._key, f"{path}\n{expires}".encode(), hashlib.sha256).hexdigest()
