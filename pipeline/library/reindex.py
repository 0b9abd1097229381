"""Rebuilding a library's FAISS index: the current version published again with an index built anew.

For when the automatic rule (:func:`pipeline.library.index.needs_rebuild`) is not what a user wants: another
index kind (``hnsw`` for lower latency, ``ivfpq`` for less memory), or centroids retrained on today's data.
Nothing is re-embedded: the new version names the same parts and a new index file of their embeddings.
"""

from __future__ import annotations

from typing import Any

from ..storage import StorageOptions, Store, as_store
from .index import KINDS, build_index, describe
from .journal import maintenance
from .manifest import NotALibraryError, PartInfo, Version, current_version
from .reader import Library, embedded_rows
from .writer import LibraryWriter


def reindex(location: str | Store, kind: str = "auto", options: StorageOptions | None = None) -> Version:
    """Publish the current version of the library at ``location`` again with an index of ``kind`` (one of
    :data:`~pipeline.library.index.KINDS` or ``"auto"``) built from its embedded rows. Raises
    :class:`~pipeline.library.journal.LibraryBusyError` while a job writes the library."""
    if kind != "auto" and kind not in KINDS:
        raise ValueError(f"--kind must be auto or one of {', '.join(KINDS)}, got {kind!r}")
    root = as_store(location, options)
    with maintenance(root, "reindex"):
        current = current_version(root)
        if current is None:
            raise NotALibraryError(f"{root.uri} is not a videosearch library (it has no _current)")
        return publish_reindexed(root, current, current.parts, kind)


def publish_reindexed(
    root: Store,
    current: Version,
    parts: list[PartInfo],
    kind: str,
    extra: dict[str, Any] | None = None,
    changes: dict[str, int] | None = None,
) -> Version:
    """Publish ``parts`` on top of ``current`` (its model, decoding and checkpoint record) with an index of
    ``kind`` built from their embedded rows; the manifest's ``extra`` gets ``reindexed``: the index, in words.
    """
    library = Library(root, current)
    index = build_index(*embedded_rows(root, parts, library.schema), kind=kind)
    writer = LibraryWriter(
        root, embedding_dim=library.manifest["embedding_dim"], prompt_shape=library.rerank_shape
    )
    return writer.publish(
        parts,
        index,
        library.model,
        current,
        extra={**(extra or {}), "reindexed": describe(index)},
        decode=current.manifest.get("decode"),
        changes=changes,
        trained_on=index.ntotal,
        model_files=current.manifest.get("model_files"),
    )
