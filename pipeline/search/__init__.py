"""Searching libraries: two-stage text search, the exact scorer it shares with eval, zero-shot classify."""

from .searcher import DEFAULT_CANDIDATES, Hit, Searcher

__all__ = ["DEFAULT_CANDIDATES", "Hit", "Searcher"]
