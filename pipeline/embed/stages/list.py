"""List the video objects under a source URI: the first stage, a plain function (a Ray plan wraps it)."""

from __future__ import annotations

from typing import Any

from fsspec.core import split_protocol

from ...storage import StorageOptions, Store, as_store, each_at_once, has_magic, to_timestamp

_MTIME_KEYS = ("mtime", "LastModified", "last_modified", "updated", "modified", "Last-Modified")
INFO_THREADS = 16  # objects asked for their size at once, where a listing gives none (HTTP)


def list_objects(source: str | Store, options: StorageOptions | None = None) -> list[dict[str, Any]]:
    """Rows ``{"uri", "size", "etag", "mtime"}`` for every object under ``source`` (a URI with ``options``,
    or a :class:`~pipeline.storage.Store`), sorted by ``uri``.

    ``source`` is a prefix (listed recursively, like a directory), a glob (``s3://b/videos/*.mp4``,
    ``/data/**/*.mkv``) or a single object. URIs keep the source's scheme (``s3://bucket/key``); plain local
    paths come back absolute. Directories and zero-size ``.../`` directory-marker keys are skipped; other
    zero-byte objects are kept. ``etag`` is ``None`` where the store has none (local files), ``mtime`` is
    seconds since the epoch or ``None``. A glob selects objects: directories it matches are skipped (write
    ``dir*/**`` to take everything under them). A source whose name has glob characters (``[2024] trip/``)
    and that matches nothing as a glob is listed as the prefix or object of that name.

    Nothing matching is a valid, empty result. A missing bucket, a missing local base directory, denied access
    or an unreachable endpoint raise :class:`pipeline.storage.StorageError`.
    """
    store = as_store(source, options)
    fs, path = store.fs, store.path()
    with store.errors("listing"):
        fs.invalidate_cache()  # instances are shared: never answer from an older listing
        entries = fs.glob(path, detail=True) if has_magic(path) else {}
        if not entries:  # a prefix, an object, or a name with glob characters that matches nothing as one
            entries = fs.find(path, withdirs=False, detail=True)
    if not entries:
        store.check_container()  # tell "empty" apart from "no such bucket / directory"
        return []
    scheme = split_protocol(store.uri)[0]
    objects = {name: info for name, info in entries.items() if _is_object(name, info)}
    unsized = [name for name, info in objects.items() if info.get("size") is None]
    if unsized:  # an HTTP server's index page gives links only: ask each object (a HEAD request)
        with store.errors("listing"):
            objects.update(zip(unsized, each_at_once(fs.info, unsized, INFO_THREADS), strict=True))
    rows = [
        {
            "uri": name if "://" in name or not scheme else f"{scheme}://{name}",  # HTTP names are URLs
            "size": int(info.get("size") or 0),
            "etag": info.get("ETag") or info.get("etag") or None,
            "mtime": _mtime(info),
        }
        for name, info in objects.items()
    ]
    return sorted(rows, key=lambda row: row["uri"])


def _is_object(name: str, info: dict[str, Any]) -> bool:
    if info.get("type", "file") != "file":
        return False
    return not (name.endswith("/") and not info.get("size"))  # "dir/" marker keys


def _mtime(info: dict[str, Any]) -> float | None:
    for key in _MTIME_KEYS:
        if info.get(key) is not None:
            return to_timestamp(info[key])
    return None
