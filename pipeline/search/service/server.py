"""``videosearch serve``: the app (:mod:`.app`) under uvicorn, with thread settings for concurrent queries."""

from __future__ import annotations

import logging
import os

import faiss
import torch
import uvicorn

from ...storage import StorageOptions
from .app import create_app
from .options import ServiceOptions

# Concurrent queries share the cores: each runs its torch kernels on a quarter of them (one below 8 cores), so
# that queries in parallel threads fill the machine instead of oversubscribing it. FAISS gets one OpenMP
# thread: a request searches one query, and the parallelism comes from the other requests' threads.
SEARCH_THREADS = max(1, (os.cpu_count() or 1) // 4)
LOOPBACK = ("127.0.0.1", "localhost", "::1")
log = logging.getLogger(__name__)


def serve(
    location: str,
    storage: StorageOptions | None = None,
    options: ServiceOptions | None = None,
    host: str = "127.0.0.1",
    port: int = 8000,
) -> None:
    """Serve the library at ``location`` on ``host:port`` until interrupted."""
    options = options or ServiceOptions()
    if host not in LOOPBACK and not options.api_key:
        log.warning(
            "videosearch serve: listening on %s without an API key: anyone who reaches it may query", host
        )
    torch.set_num_threads(SEARCH_THREADS)
    faiss.omp_set_num_threads(1)
    uvicorn.run(create_app(location, storage, options), host=host, port=port, log_level="info")
