"""A library's versions: manifests, their format, and the errors of opening one.

Layout under the library root (any :class:`~pipeline.storage.Store`)::

    parts/part-<uuid>.parquet   rows with the schema pipeline.library.schema.part_schema(...)
    index/<uuid>.faiss          the FAISS index of one version (row ids -> embeddings)
    versions/<n>.json           the manifest of version n (see LibraryWriter.prepare)
    _current                    "n": the published version, the only object of a version ever replaced
    runs/<run>.json, _lease     running writers' journals and their lease (pipeline.library.journal):
                                rewritten while a job runs, never part of a version

Everything of a version but ``_current`` is immutable once written, and versions are numbered from 1. A
reader reads ``_current`` once, then only immutable files: writers never disturb it, and any published
version stays readable by number.

Manifest formats: 1 named the model ``{"id", "sha256"}``; 2 names it by its identity ``{"source", "sha256",
"family"}``, allows libraries without re-rank features (``prompt_shape`` null), records how videos were
decoded (``decode``) and what changed since the parent (``changes``), and may mask rows of a part that a
version no longer holds (a part's ``deleted`` ids: see :class:`PartInfo`); 3 stores each new part's
re-rank features (and a copy of its embeddings) beside it, a row readable in O(its bytes) (a part's
``features``: see :mod:`pipeline.library.features`), and a version may mix such parts with older ones.
Readers read all three.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Any

import pyarrow as pa

from xclip_core.identity import ModelIdentity

from ..storage import ObjectNotFound, Store, each_at_once

FORMAT = 3  # manifest format written; readers refuse newer ones (3: re-rank records beside the parts)
CURRENT = "_current"
VERSIONS = "versions"
# how long garbage collection spares what no kept version names: files a writer in flight wrote before naming
# them, and the files of a version that stopped being current, which its readers may still be reading
GRACE_S = 3600.0
MANIFEST_READS = 16  # manifests read at once (``versions`` and ``gc`` read them all: one request each on S3)


class LibraryError(Exception):
    """A library is missing, damaged, or could not be updated."""


class DamagedLibraryError(LibraryError):
    """A file of the library cannot be parsed: truncated, overwritten, or not the library's."""


# what JSON, Parquet (pyarrow), NumPy and FAISS raise for content they cannot parse
UNPARSABLE = (ValueError, EOFError, RuntimeError, pa.ArrowException)
MANIFEST_REMEDY = (
    "restore it from a copy, roll back to a version without it (`videosearch versions`, `videosearch "
    "rollback --to N`), or embed the videos into a new library"
)
REMEDY = (  # for a part or its re-rank records
    "restore it from a copy, roll back to a version without it (`videosearch versions`, `videosearch "
    "rollback --to N`), or publish a version without it (`videosearch check --repair`), whose videos the "
    "next refresh embeds again"
)


@contextlib.contextmanager
def parsing(root: Store, name: str, remedy: str = REMEDY) -> Iterator[None]:
    """Reading the library's file ``name`` in the block: content that cannot be parsed (:data:`UNPARSABLE`),
    or no such file where the manifest names one, becomes a :class:`DamagedLibraryError` that names the file
    and says what to do (``remedy``)."""
    try:
        yield
    except ObjectNotFound as e:
        raise DamagedLibraryError(f"{root.uri} is damaged: {name} is missing; {remedy}") from e
    except (*UNPARSABLE, OSError) as e:
        if isinstance(e, OSError) and not _checksum_failed(e):
            raise  # reading failed: the storage's error, not the content's
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise DamagedLibraryError(f"{root.uri} is damaged: {name} cannot be read ({reason}); {remedy}") from e


def _checksum_failed(error: OSError) -> bool:
    """Whether ``error`` is Arrow's report of a Parquet page whose CRC does not match its bytes."""
    return "checksum verification failed" in str(error).lower()


class NotALibraryError(LibraryError):
    """There is no library at the URI (no ``_current``)."""


class VersionNotFoundError(LibraryError):
    """The library has no such version."""


class WorseVersionError(LibraryError):
    """A job would publish a version far worse than the current one; nothing was published."""


class ConcurrentWriteError(LibraryError):
    """Another writer published a version after this writer's base version: re-run on the new one."""


@dataclass(frozen=True)
class PartInfo:
    """A part file: its path relative to the library root, its rows, and how many of them are ok / errors;
    ``deleted``: the ids of its rows that the version leaves out (a deletion mask: the file stays as written).
    """

    path: str
    rows: int
    ok: int
    errors: int
    deleted: tuple[int, ...] = ()
    crc32: int | None = None  # the file's CRC-32, checked by ``videosearch check``; None: not recorded
    file_bytes: int | None = None  # the file's size (a remote read then need not ask); None: not recorded
    features: str | None = None  # its re-rank records (library.features); None: inside the part (format < 3)
    features_crc32: int | None = None  # the records file's CRC-32, as ``crc32``

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PartInfo:
        return cls(**{**data, "deleted": tuple(data.get("deleted", ()))})

    def to_dict(self) -> dict[str, Any]:
        """The manifest's entry (``deleted`` only where there is a mask, ``features`` and the checksums where
        there are)."""
        entry: dict[str, Any] = {"path": self.path, "rows": self.rows, "ok": self.ok, "errors": self.errors}
        optional = {
            "crc32": self.crc32,
            "file_bytes": self.file_bytes,
            "features": self.features,
            "features_crc32": self.features_crc32,
        }
        entry.update({name: value for name, value in optional.items() if value is not None})
        return {**entry, "deleted": list(self.deleted)} if self.deleted else entry

    def masked(self, ids: set[int] | frozenset[int]) -> PartInfo:
        """This part with ``ids`` (of its rows) left out too."""
        return replace(self, deleted=tuple(sorted(set(self.deleted) | set(ids))))


@dataclass(frozen=True)
class Version:
    """One version of a library: its number and manifest.

    ``token`` is the version token of the ``_current`` that named it, as read: what a writer starting from
    this version compares against. ``None`` for a version opened by number (it cannot be a base then).
    """

    number: int
    manifest: dict[str, Any]
    token: str | None = None

    @property
    def parts(self) -> list[PartInfo]:
        """The version's part files."""
        return [PartInfo.from_dict(part) for part in self.manifest["parts"]]

    @property
    def model(self) -> ModelIdentity:
        """The model that made the version's embeddings."""
        return ModelIdentity.from_dict(self.manifest["model"])

    @property
    def rerank_shape(self) -> tuple[int, int] | None:
        """The shape of one row's re-rank features; ``None`` for a model family without them."""
        shape = self.manifest.get("prompt_shape")
        return tuple(shape) if shape else None


def manifest_name(number: int) -> str:
    return f"{VERSIONS}/{number}.json"


def list_versions(root: Store) -> list[int]:
    """The numbers of all manifests in the library, ascending (``[]`` if none).

    This includes the manifests of writers that crashed or lost a race before publishing: complete but
    never current. ``_current`` says which version is published.
    """
    stems = (name.removesuffix(".json") for name in root.names(VERSIONS) if name.endswith(".json"))
    return sorted(int(stem) for stem in stems if stem.isdigit())


def current_version(root: Store) -> Version | None:
    """The published version of the library at ``root`` (a writer's base); ``None`` if there is none."""
    try:
        data, token = root.read_with_token(CURRENT)
    except ObjectNotFound:
        return None
    try:
        number = int(data)
    except ValueError:
        versions = ", ".join(map(str, list_versions(root)))
        raise DamagedLibraryError(
            f"{root.uri} is damaged: {CURRENT} holds {data[:40]!r}, not a version number; write the number "
            f"of the version to publish into it (the library has versions {versions}, the highest the last "
            "one written)"
        ) from None
    return Version(number, read_manifest(root, number, named_by_current=True), token)


def all_versions(root: Store) -> tuple[Version, dict[int, dict[str, Any]], list[int]]:
    """The current version, every manifest by number, and the published versions newest first (the current
    one and its parents back to the first; other manifests were never current)."""
    current = current_version(root)
    if current is None:
        raise NotALibraryError(f"{root.uri} is not a videosearch library (it has no {CURRENT})")
    numbers = list_versions(root)
    read = each_at_once(lambda number: read_manifest(root, number), numbers, MANIFEST_READS)
    manifests = dict(zip(numbers, read, strict=True))
    published, number = [], current.number
    while number is not None and number in manifests:
        published.append(number)
        number = manifests[number].get("parent")
    return current, manifests, published


def read_manifest(root: Store, number: int, named_by_current: bool = False) -> dict[str, Any]:
    """Version ``number``'s manifest; errors say what the library has instead."""
    try:
        data = root.read_bytes(manifest_name(number))
    except ObjectNotFound:
        if named_by_current:
            message = f"{root.uri} is damaged: {CURRENT} names version {number}, which has no manifest"
            raise LibraryError(message) from None
        available = list_versions(root)
        if not available:
            raise NotALibraryError(
                f"{root.uri} is not a videosearch library (it has no versions); "
                f"create one with `videosearch embed <videos> {root.uri}`"
            ) from None
        raise VersionNotFoundError(
            f"{root.uri} has no version {number}; available versions: {', '.join(map(str, available))}"
        ) from None
    with parsing(root, manifest_name(number), MANIFEST_REMEDY):
        manifest = json.loads(data)
    if manifest.get("format", 0) > FORMAT:
        raise LibraryError(
            f"{root.uri} version {number} has manifest format {manifest['format']}, this program reads up to "
            f"{FORMAT}: upgrade videosearch"
        )
    return manifest
