"""A followed library's next index, made from the index of the version before it, in memory.

A refresh publishes its index as its base's index file plus a delta (ids ``removed``, parts whose rows are
``added``; see :mod:`pipeline.library.refresh`), so that consecutive versions mostly name the same file. A
reader that holds the version before (the service, following ``_current``) has that file's vectors in memory
already and needs only what changed between the two deltas:

* out: the ids the new delta removes that the old one did not, and the rows of the old delta's parts that
  the new version no longer has (the part dropped, or rows masked in it);
* in: the embedded rows of the parts the new delta adds that the old one did not (read from their files).

The result holds the same ids and vectors as the file with the new delta applied
(:meth:`~pipeline.library.reader.Library.read_index`), in another storage order. Where the versions cannot
be bridged this way (another index file; a delta that gives back ids the old one removed, as a rollback's
does), :func:`index_after` returns ``None`` and the reader reads the file.
"""

from __future__ import annotations

import logging

import faiss
import numpy as np

from .index import add, remove
from .lookup import RowLookup
from .reader import Library, embedded_rows

log = logging.getLogger(__name__)


def index_after(
    before: Library, before_index: faiss.Index, before_rows: RowLookup, library: Library, rows: RowLookup
) -> faiss.Index | None:
    """The index of ``library``'s version made from ``before_index``, the index of the version ``before``
    that a reader holds (left unchanged); ``before_rows`` and ``rows``: the two versions' row lookups.
    ``None`` where the index must be read."""
    old, new = before.manifest["index"], library.manifest["index"]
    if old["path"] != new["path"] or not set(old.get("removed", ())) <= set(new.get("removed", ())):
        return None
    old_added, new_added = set(old.get("added", ())), set(new.get("added", ()))
    old_ids, new_ids = before_rows.ids_of_parts(old_added), rows.ids_of_parts(old_added & new_added)
    out = [
        np.setdiff1d(np.array(new.get("removed", []), np.int64), np.array(old.get("removed", []), np.int64))
    ]
    for path, ids in old_ids.items():  # rows of the old delta's parts that the new one does not keep
        out.append(np.setdiff1d(ids, new_ids.get(path, np.zeros(0, np.int64))))
    index = remove(faiss.clone_index(before_index), np.concatenate(out))
    added = [part for part in library.snapshot.parts if part.path in new_added - old_added]
    if added:
        add(index, *embedded_rows(library.store, added, library.schema))
    if index.ntotal != new["ntotal"]:  # rows given back that the old index had taken out: read the file
        log.warning(
            "%s version %d: its index made from version %d's holds %d vectors, its manifest says %d: read",
            library.uri,
            library.version,
            before.version,
            index.ntotal,
            new["ntotal"],
        )
        return None
    return index
