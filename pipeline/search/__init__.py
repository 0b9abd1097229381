"""Searching libraries: two-stage text search, the exact scorer it shares with eval, zero-shot classify.

Each name is imported on first use, so that the service's settings (``pipeline.search.service.options``,
which the command line's parser reads) do not import the model.
"""

from __future__ import annotations

from ..lazy import lazy_exports

_EXPORTS = {"DEFAULT_CANDIDATES": ".searcher", "Hit": ".searcher", "Searcher": ".searcher"}
__all__ = list(_EXPORTS)
__getattr__ = lazy_exports(__name__, _EXPORTS)
