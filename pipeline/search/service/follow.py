"""Following a library's current version while serving it.

The service answers from the version that ``_current`` names, and keeps following it: a thread reads
``_current`` every ``poll_s`` seconds and, when a writer (``embed``, ``refresh``, ``rollback``) has
published another version, opens it (manifest, index, the row lookup of its new parts: those it shares with
the version before are not read again, nor is the index file they share, whose new version is made from the
one in memory; the model is shared while its weights are the same) and then swaps it in with one
assignment. A request takes the searcher it uses once, when it starts, so a
request in flight finishes on the version it started with, and none waits for the swap. The replaced
searcher joins the few older versions kept open for ``?version=N``, within their memory budget
(``ServiceOptions.cached_versions_mb``): a large library's service holds its current version, not five.
"""

from __future__ import annotations

import logging
import threading

import torch

from ...library import Library
from ...library.lookup import PartTables
from ...models import VideoTextModel, load_library_model
from ...storage import Store
from ..searcher import Searcher
from .lru import LRU
from .options import ServiceOptions

log = logging.getLogger(__name__)
MODELS_KEPT = 2  # models of different weights loaded at once (a library re-embedded with another model)


class CachingSearcher(Searcher):
    """A :class:`Searcher` that keeps the text embeddings of recent queries (shared by the searchers of all
    versions made with the same weights)."""

    def __init__(
        self,
        library: Library,
        model: VideoTextModel,
        texts: LRU[torch.Tensor],
        tables: PartTables | None = None,
        before: Searcher | None = None,
    ) -> None:
        super().__init__(library, model, tables, before)
        self.texts = texts

    def text_embedding(self, text: str) -> torch.Tensor:
        key = (self.model.identity.sha256, text)
        return self.texts.get_or_make(key, lambda: super(CachingSearcher, self).text_embedding(text))


class VersionFollower:
    """The searchers of one library: the current version's, replaced when ``_current`` changes, and a few
    others opened on demand. :meth:`start` starts following; :meth:`stop` ends it."""

    def __init__(self, store: Store, options: ServiceOptions) -> None:
        self.store = store
        self.poll_s = options.poll_s
        self._texts: LRU[torch.Tensor] = LRU(options.cached_texts)
        self._models: LRU[VideoTextModel] = LRU(MODELS_KEPT)
        self._others: LRU[Searcher] = LRU(
            options.cached_versions, Searcher.memory_bytes, options.cached_versions_mb << 20
        )
        # the current version's part tables: the next version's lookup reads its new parts only
        self._cache = options.cache
        self._tables = PartTables(self._cache)
        self.current = self._searcher(Library.open(store, cache=self._cache), self._tables)
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._failing: str | None = None  # the failure of the last check, if it failed

    def searcher(self, version: int | None = None) -> Searcher:
        """The searcher of ``version`` (default: the current one). Raises ``VersionNotFoundError`` for a
        version the library does not have, and ``StorageError`` when storage fails."""
        current = self.current
        if version is None or version == current.library.version:
            return current
        return self._others.get_or_make(
            version, lambda: self._searcher(Library.open(self.store, version=version, cache=self._cache))
        )

    def check(self) -> bool:
        """Read ``_current``; if it names another version, open that one and make it current. Returns
        whether the current version changed."""
        published = Library.current_version(self.store)
        current = self.current
        if published is None or published.number == current.library.version:
            return False
        searcher = self._others.get(published.number) or self._searcher(
            Library(self.store, published, cache=self._cache), self._tables, current
        )
        self._others.put(current.library.version, current)
        self.current = searcher  # one assignment: requests take either the old searcher or the new one
        log.info("videosearch serve: %s version %d is now current", self.store.uri, published.number)
        return True

    def start(self) -> None:
        """Follow ``_current`` in a background thread."""
        self._stopping.clear()
        self._thread = threading.Thread(target=self._follow, name="videosearch-follow", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop following (waits for a check in progress)."""
        self._stopping.set()
        if self._thread is not None:
            self._thread.join()

    def _follow(self) -> None:
        while not self._stopping.wait(self.poll_s):
            self.follow_once()

    def follow_once(self) -> None:
        """One :meth:`check` of the following thread. Whatever fails, the version at hand keeps serving and
        the next poll tries again; a failure is logged when it starts or changes, not at every poll (a
        damaged version published, or a store down for an hour, would log one line every poll)."""
        try:
            self.check()
        except Exception as err:  # noqa: BLE001 - any failure: keep serving, say so once
            message = f"{type(err).__name__}: {err}"
            if message != self._failing:
                log.warning("videosearch serve: could not follow %s: %s", self.store.uri, err)
            self._failing = message
        else:
            if self._failing is not None:
                log.warning("videosearch serve: following %s again", self.store.uri)
            self._failing = None

    def _searcher(
        self, library: Library, tables: PartTables | None = None, before: Searcher | None = None
    ) -> Searcher:
        identity = library.model
        model = self._models.get_or_make(
            identity.sha256 or identity.source, lambda: load_library_model(identity, library.options)
        )
        return CachingSearcher(library, model, self._texts, tables, before)
