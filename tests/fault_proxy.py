"""A fault-injecting HTTP proxy in front of the moto S3 server, for the flaky-store tests.

Requests pass through to the upstream server; a seeded fraction of them (or all of them, during an outage)
are answered with a fault instead: 503 ``SlowDown``, 500 ``InternalError``, a reset connection or a delay
before passing through. Answers can be sent at a stream's pace (``Faults.bytes_per_s``).
The clients (botocore, through s3fs) use the proxy's URL as their endpoint.
"""

from __future__ import annotations

import http.client
import random
import socket
import struct
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

FAULTS = ("slowdown", "internal", "reset", "delay")
_ERRORS = {
    "slowdown": (503, "SlowDown", "Please reduce your request rate."),
    "internal": (500, "InternalError", "We encountered an internal error. Please try again."),
}
PIECE = 1 << 16  # bytes written at a time of an answer sent at a stream's pace
HOP_HEADERS = {"connection", "keep-alive", "transfer-encoding", "proxy-connection", "upgrade"}


@dataclass
class Faults:
    """What the proxy does to the next requests; change it while the proxy runs.

    ``rate``: the fraction of requests that get a fault (chosen with ``seed``), one of ``kinds`` at random;
    ``outage``: the requests (numbered from 1) that all fail, ``range(1, 10**9)`` for a total outage; only
    requests whose method is in ``methods`` and whose path contains ``only`` are numbered and faulted.
    """

    rate: float = 0.0
    outage: range = range(0)
    only: str = ""
    methods: tuple[str, ...] = ("GET", "HEAD", "PUT", "POST", "DELETE")
    kinds: tuple[str, ...] = FAULTS
    delay_s: float = 2.0
    together: int = 0  # a delay ends early once this many requests have been answered at once (0: never)
    bytes_per_s: float = 0.0  # each answer's body sent at most this fast (0: at once), as S3 sends a stream
    seed: int = 0
    requests: int = 0  # the requests that could be faulted
    seen: list[tuple[str, str, str | None]] = field(default_factory=list)  # method, path, Range of each
    faulted: dict[str, int] = field(default_factory=dict)
    in_flight: int = 0  # requests being answered now
    most_in_flight: int = 0  # the most answered at once
    _random: random.Random = field(init=False, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _changed: threading.Condition = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._random = random.Random(self.seed)
        self._changed = threading.Condition(self._lock)

    def arrive(self) -> None:
        """Count a request being answered."""
        with self._changed:
            self.in_flight += 1
            self.most_in_flight = max(self.most_in_flight, self.in_flight)
            self._changed.notify_all()

    def leave(self) -> None:
        """Count a request answered."""
        with self._changed:
            self.in_flight -= 1

    def hold(self) -> None:
        """A ``delay`` fault: ``delay_s``, or until ``together`` requests have been in flight at once, so
        that a test of requests sent together does not depend on how fast a busy machine sends them."""
        with self._changed:
            self._changed.wait_for(lambda: 0 < self.together <= self.most_in_flight, timeout=self.delay_s)

    def pick(self, method: str, path: str) -> str | None:
        """The fault for a request, or None to pass it through."""
        with self._lock:
            if method not in self.methods or self.only not in path:
                return None
            self.requests += 1
            if self.requests in self.outage:
                kind = self._random.choice([k for k in self.kinds if k != "delay"] or ["internal"])
            elif self._random.random() < self.rate:
                kind = self._random.choice(self.kinds)
            else:
                return None
            self.faulted[kind] = self.faulted.get(kind, 0) + 1
            return kind


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128  # a client opening many connections at once (socketserver's default: 5)


class FaultProxy:
    """``FaultProxy(upstream_url)``: serves on 127.0.0.1 (``url``) until :meth:`close`."""

    def __init__(self, upstream: str, faults: Faults | None = None) -> None:
        self.faults = faults or Faults()
        target = urlsplit(upstream)
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: object) -> None:  # quiet
                pass

            def _handle(self) -> None:
                faults = proxy.faults
                faults.arrive()
                try:
                    self._answer()
                finally:
                    faults.leave()

            def _answer(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                proxy.faults.seen.append((self.command, self.path, self.headers.get("Range")))
                fault = proxy.faults.pick(self.command, self.path)
                if fault == "reset":  # RST instead of an answer
                    self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    self.close_connection = True
                    return
                if fault in _ERRORS:
                    status, code, message = _ERRORS[fault]
                    xml = f"<Error><Code>{code}</Code><Message>{message}</Message></Error>"
                    self._reply(status, {"Content-Type": "application/xml"}, xml.encode())
                    return
                if fault == "delay":
                    proxy.faults.hold()
                upstream_conn = http.client.HTTPConnection(target.hostname, target.port, timeout=60)
                try:
                    headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_HEADERS}
                    upstream_conn.request(self.command, self.path, body=body or None, headers=headers)
                    answer = upstream_conn.getresponse()
                    data = answer.read()
                    kept = {k: v for k, v in answer.getheaders() if k.lower() not in HOP_HEADERS}
                    self._reply(answer.status, kept, data)
                finally:
                    upstream_conn.close()

            def _reply(self, status: int, headers: dict[str, str], data: bytes) -> None:
                self.send_response(status)
                for name, value in headers.items():
                    if name.lower() != "content-length":
                        self.send_header(name, value)
                # a HEAD answer has no body but the length of the object's
                length = (
                    headers.get("Content-Length", headers.get("content-length"))
                    if self.command == "HEAD"
                    else None
                )
                self.send_header("Content-Length", length or str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self._send(data)

            def _send(self, data: bytes) -> None:
                rate = proxy.faults.bytes_per_s
                if not rate:
                    self.wfile.write(data)
                    return
                started = time.perf_counter()
                for at in range(0, len(data), PIECE):
                    self.wfile.write(data[at : at + PIECE])
                    time.sleep(max(0.0, (at + PIECE) / rate - (time.perf_counter() - started)))

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle

        self.server = _Server(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
