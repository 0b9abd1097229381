"""The versioned store of a collection's embedded rows and their search index (see ``manifest``).

Each name is imported on first use, so that ``pipeline.library.schema`` (the decoders' row layout) does not
import the readers' pandas and FAISS.
"""

from __future__ import annotations

from ..lazy import lazy_exports

_EXPORTS = {
    "CURRENT": ".manifest",
    "ConcurrentWriteError": ".manifest",
    "DamagedLibraryError": ".manifest",
    "Library": ".reader",
    "LibraryError": ".manifest",
    "LibraryWriter": ".writer",
    "NotALibraryError": ".manifest",
    "PartInfo": ".manifest",
    "Version": ".manifest",
    "VersionNotFoundError": ".manifest",
    "WorseVersionError": ".manifest",
    "list_versions": ".manifest",
    "read_part": ".reader",
}
__all__ = list(_EXPORTS)
__getattr__ = lazy_exports(__name__, _EXPORTS)
