"""The search service: an HTTP API and a web page over one library, following its current version.

``videosearch serve LIBRARY`` runs it (:func:`~.server.serve`); :func:`~.app.create_app` builds the FastAPI
app for another ASGI server. ``create_app`` and ``serve`` are imported on first use, so that the command
line reads :class:`ServiceOptions` without loading FastAPI or uvicorn.
"""

from __future__ import annotations

from ...lazy import lazy_exports
from .options import MAX_K, MAX_QUERIES, MAX_QUERY_CHARS, ServiceOptions

_LAZY = {"create_app": "pipeline.search.service.app", "serve": "pipeline.search.service.server"}
__all__ = ["MAX_K", "MAX_QUERIES", "MAX_QUERY_CHARS", "ServiceOptions", *_LAZY]


__getattr__ = lazy_exports(__name__, _LAZY)
