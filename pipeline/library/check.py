"""``videosearch check``: every file of a library version read in full and held against its manifest.

A search reads only the bytes it needs, and checks what it can as it reads (each Parquet page's CRC, the index
file's CRC-32); a re-rank record it reads is trusted. ``check`` reads all that a version names:

* each part file: its CRC-32 against the manifest's (parts written since it is recorded; a search checks
  only the CRCs of the pages it reads, and a Parquet footer has none), its rows against the manifest's counts
  (rows, ok, errors) and its mask (the ids it leaves out must be its own rows);
* each part's re-rank records file: its CRC-32 likewise, its layout (one record per row, of the version's
  width) and its embeddings against the part's;
* the index file: its CRC-32, and the ids the version's index holds (the file, with the manifest's delta)
  against the version's rows that have an embedding.

Each :class:`Problem` names a file and is ``missing`` (the manifest names it, storage has no such object),
``damaged`` (cannot be parsed, or a checksum differs) or ``inconsistent`` (readable, but disagrees with the
manifest or with another file). :func:`pipeline.library.repair.repair` publishes a version without them.
"""

from __future__ import annotations

import io
import zlib
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from ..storage import ObjectNotFound, StorageOptions, Store, each_at_once
from .features import record_dtype
from .index import ids_of
from .manifest import DamagedLibraryError, PartInfo, parsing
from .reader import READ_THREADS, Library, read_index_file, read_part
from .schema import PROMPT, dense_rows

MISSING, DAMAGED, INCONSISTENT = "missing", "damaged", "inconsistent"


@dataclass(frozen=True)
class Problem:
    """What is wrong with one file of a version (see the module docstring for ``kind``)."""

    path: str  # relative to the library
    kind: str
    detail: str

    def text(self) -> str:
        return f"{self.path}: {self.kind}: {self.detail}"


@dataclass
class Checked:
    """The outcome of :func:`check`: the version read, how many files, and the problems found."""

    library: str
    version: int
    files: int
    problems: list[Problem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "ok": self.ok}

    def text(self) -> str:
        head = f"library {self.library} version {self.version}: {self.files} files read"
        if self.ok:
            return f"{head}, no problems"
        lines = [f"  {problem.text()}" for problem in self.problems]
        return "\n".join([f"{head}, {counted(len(self.problems), 'problem')}:", *lines])


def counted(n: int, noun: str) -> str:
    """``1 problem``, ``2 problems``."""
    return f"{n} {noun}{'' if n == 1 else 's'}"


@dataclass
class _Part:
    problems: list[Problem]
    embedded: np.ndarray | None  # the ids of its visible rows with an embedding; None: unreadable


def check(
    location: str | Store, version: int | None = None, options: StorageOptions | None = None
) -> Checked:
    """Read every file of the library's current version (or version ``version``) and return the problems
    found. A manifest that cannot be read raises (:class:`~pipeline.library.manifest.LibraryError`), as does
    storage that fails (``StorageError``): the problems of files are values, those are not."""
    library = Library.open(location, options, version)
    parts = library.snapshot.parts
    checked = each_at_once(lambda part: _check_part(library, part), parts, READ_THREADS)
    problems = [problem for part in checked for problem in part.problems]
    problems += _check_index(library, {part.path: c.embedded for part, c in zip(parts, checked, strict=True)})
    files = 1 + len(parts) + sum(part.features is not None for part in parts) + 1  # manifest, parts, index
    return Checked(library.uri, library.version, files, problems)


def _check_part(library: Library, part: PartInfo) -> _Part:
    data, problem = _whole(library.store, part.path, part.crc32)
    if problem:
        return _Part([problem], None)
    columns = [name for name in library.schema.names if name != PROMPT or part.features is None]
    try:  # parsed as a search reads it (its pages' CRCs where it has them; parts from before whole-file CRCs)
        table = read_part(library.store, part, library.schema, columns, masked=False, source=data)
    except DamagedLibraryError as e:
        return _Part([_unreadable(part.path, e)], None)
    problems = _against_manifest(part, table)
    if part.features is not None:
        problems += _check_features(library, part, table)
    ids = table["id"].to_numpy()
    embedded = table["error"].is_null().to_numpy(zero_copy_only=False) & ~np.isin(ids, part.deleted)
    return _Part(problems, ids[embedded])


def _whole(store: Store, path: str, crc: int | None) -> tuple[bytes, Problem | None]:
    """The file's bytes, or the problem: missing, or a CRC-32 other than ``crc`` (where one was recorded)."""
    try:
        with parsing(store, path):
            data = store.read_bytes(path)
    except DamagedLibraryError as e:
        return b"", _unreadable(path, e)
    found = zlib.crc32(data)
    if crc is not None and found != crc:
        return b"", Problem(path, DAMAGED, f"its CRC-32 is {found}, the manifest recorded {crc}")
    return data, None


def _unreadable(path: str, error: DamagedLibraryError) -> Problem:
    """The problem of a file that :func:`~pipeline.library.manifest.parsing` found missing or unparsable."""
    cause = error.__cause__ or error
    if isinstance(cause, ObjectNotFound):
        return Problem(path, MISSING, "the manifest names it, storage has no such object")
    return Problem(path, DAMAGED, (str(cause).strip().splitlines() or [type(cause).__name__])[0])


def _against_manifest(part: PartInfo, table: pa.Table) -> list[Problem]:
    errors = table.num_rows - table["error"].null_count
    found = (table.num_rows, table.num_rows - errors, errors)
    problems = []
    if found != (part.rows, part.ok, part.errors):
        problems.append(
            Problem(
                part.path,
                INCONSISTENT,
                f"{found[0]} rows ({found[1]} ok, {found[2]} errors); the manifest says {part.rows} "
                f"({part.ok} ok, {part.errors} errors)",
            )
        )
    ids = table["id"].to_numpy()
    repeated = len(ids) - len(np.unique(ids))
    if repeated:
        problems.append(Problem(part.path, INCONSISTENT, f"{repeated} ids repeated"))
    strangers = np.setdiff1d(np.array(part.deleted, np.int64), ids)
    if strangers.size:
        problems.append(
            Problem(part.path, INCONSISTENT, f"the manifest masks {strangers.size} ids it has no rows of")
        )
    return problems


def _check_features(library: Library, part: PartInfo, table: pa.Table) -> list[Problem]:
    path = str(part.features)
    data, problem = _whole(library.store, path, part.features_crc32)
    if problem:
        return [problem]
    try:
        with parsing(library.store, path):
            records = np.load(io.BytesIO(data), allow_pickle=False)
    except DamagedLibraryError as e:
        return [_unreadable(path, e)]
    expected = record_dtype(library.manifest["embedding_dim"], library.rerank_shape)
    if records.dtype != expected or records.shape != (part.rows,):
        return [
            Problem(
                path,
                INCONSISTENT,
                f"{records.size} records of {records.dtype.itemsize} bytes; the part has {part.rows} rows, "
                f"whose records are {expected.itemsize} bytes",
            )
        ]
    differ = (records["embedding"] != dense_rows(table["embedding"], np.float32)).any(axis=1)
    if differ.any():
        return [Problem(path, INCONSISTENT, f"the embeddings of {differ.sum()} rows differ from the part's")]
    return []


def _check_index(library: Library, embedded: dict[str, np.ndarray | None]) -> list[Problem]:
    entry = library.manifest["index"]
    try:
        index = read_index_file(library.store, entry)
    except DamagedLibraryError as e:
        return [_unreadable(entry["path"], e)]
    if any(ids is None for ids in embedded.values()):
        return []  # a part could not be read: its rows are unknown, the index's ids not to be held to them
    base = ids_of(index)
    held = np.concatenate(
        [base[~np.isin(base, entry.get("removed", []))], *(embedded[path] for path in entry.get("added", ()))]
    )
    rows = np.concatenate([np.empty(0, np.int64), *embedded.values()])
    stray, lacking = np.setdiff1d(held, rows), np.setdiff1d(rows, held)
    repeated = len(held) - len(np.unique(held))
    if not (stray.size or lacking.size or repeated):
        return []
    found = [
        f"it lacks {lacking.size} of the version's rows" if lacking.size else "",
        f"it holds {stray.size} ids that no row of the version has" if stray.size else "",
        f"it holds {repeated} ids more than once" if repeated else "",
    ]
    return [Problem(entry["path"], INCONSISTENT, "; ".join(filter(None, found)))]
