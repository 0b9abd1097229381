"""The versioned store of a collection's embedded rows and their search index (see ``manifest``).

Each name is imported on first use, so that ``pipeline.library.schema`` (the decoders' row layout) does not
import the readers' pandas and FAISS.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "CURRENT": ".manifest",
    "ConcurrentWriteError": ".manifest",
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


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'pipeline.library' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name], __name__), name)
