"""The versioned store of a collection's embedded rows and their search index (see ``manifest``)."""

from .manifest import (
    CURRENT,
    ConcurrentWriteError,
    LibraryError,
    NotALibraryError,
    PartInfo,
    Version,
    VersionNotFoundError,
    WorseVersionError,
    list_versions,
)
from .reader import Library, read_part
from .writer import LibraryWriter

__all__ = [
    "CURRENT",
    "ConcurrentWriteError",
    "Library",
    "LibraryError",
    "LibraryWriter",
    "NotALibraryError",
    "PartInfo",
    "Version",
    "VersionNotFoundError",
    "WorseVersionError",
    "list_versions",
    "read_part",
]
