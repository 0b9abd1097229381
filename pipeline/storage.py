"""Storage layer: one way to reach S3, local disks and anything else fsspec reads.

A :class:`Store` binds a URI (``s3://bucket/key``, ``/local/path``, ``file:///x``, ``memory://x``, ...) to its
filesystem and :class:`StorageOptions` once; the library, the stages and the jobs carry stores, never
``(uri, options)`` pairs. Failures at the edge (missing bucket, access denied, unreachable endpoint,
missing object) become :class:`StorageError` subclasses whose messages name the URI and say what to check;
credentials never appear in them.

:meth:`Store.put_if` is the compare-and-swap the library's publish step is built on:

* S3: a conditional ``PutObject`` (``If-Match: <etag>``, or ``If-None-Match: *`` for "must not exist yet");
  the server decides, so two writers cannot both win. Tokens are ETags.
* local disk: an exclusive ``flock`` on a sibling lock file, compare, write a temporary file, ``os.replace``.
  Atomic among writers on the same machine (POSIX). Tokens are SHA-256 hashes of the content.
* any other fsspec filesystem: compare then write under a process-wide lock. NOT atomic across processes or
  machines; good enough for ``memory://`` in tests. Tokens are SHA-256 hashes of the content.
"""

from __future__ import annotations

import contextlib
import copy
import email.utils
import hashlib
import os
import threading
import uuid
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from typing import IO, Any
from urllib.parse import urlsplit, urlunsplit

from fsspec.asyn import sync
from fsspec.core import split_protocol, url_to_fs
from fsspec.implementations.local import LocalFileSystem
from fsspec.spec import AbstractFileSystem

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

S3_PROTOCOLS = ("s3", "s3a")
# Transient failures (5xx, throttling, resets, timeouts) are retried by botocore, every kind alike: 5 attempts
# (AWS_MAX_ATTEMPTS) with exponential backoff (a random wait of up to 1, 2, 4, 8 s). s3fs adds one more round
# for what botocore cannot see (a body cut off while it is read, SlowDown): 10 attempts at most, ~30 s at
# worst, before an operation fails.
MAX_ATTEMPTS = 5
# connections: a library's part reads send a request per part at once (botocore's default is 10)
S3_CLIENT_CONFIG = {
    "connect_timeout": 10,
    "read_timeout": 60,
    "retries": {"mode": "standard"},
    "max_pool_connections": 64,
}
S3FS_RETRIES = 2

_PRECONDITION_CODES = {"PreconditionFailed", "412", "ConditionalRequestConflict"}
_DENIED_CODES = {
    "AccessDenied",
    "403",
    "Forbidden",
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "AllAccessDisabled",
    "ExpiredToken",
    "InvalidToken",
    "AccountProblem",
}
_UNREACHABLE_NAMES = {
    "EndpointConnectionError",
    "ConnectTimeoutError",
    "ConnectionClosedError",
    "ReadTimeoutError",
    "ClientConnectorError",
    "ServerDisconnectedError",
    "FSTimeoutError",
    "ConnectionError",
    "TimeoutError",
}
_CREDENTIAL_NAMES = {"NoCredentialsError", "PartialCredentialsError", "CredentialRetrievalError"}
_TRANSIENT_CODES = {
    "500",
    "502",
    "503",
    "504",
    "InternalError",
    "ServiceUnavailable",
    "SlowDown",
    "RequestTimeout",
    "Throttling",
    "ThrottlingException",
    "RequestLimitExceeded",
}
_GENERIC_LOCK = threading.Lock()


class StorageError(Exception):
    """A storage operation failed; the message names the URI and what to check."""


class StorageUnavailable(StorageError):
    """The store failed transiently (5xx, throttling, a reset or refused connection, a timeout) and kept
    failing through every retry: the store is down or unreachable, not the object at fault."""


class ObjectNotFound(StorageError, FileNotFoundError):
    """The object (or local file) does not exist. Also a ``FileNotFoundError``."""


class RangeNotSatisfiable(StorageError):
    """Bytes asked for lie past the object's end (HTTP 416): the object is shorter than its reader expects."""


class PreconditionFailed(StorageError):
    """A conditional write lost: the object changed since the caller read it (or exists when it must not)."""


@dataclass(repr=False)
class StorageOptions:
    """How to reach object storage. All fields are optional; the defaults use the standard AWS chain.

    ``extra`` holds further keyword arguments for the S3 filesystem (``s3fs.S3FileSystem``), e.g.
    ``config_kwargs`` (botocore ``Config``: retries, timeouts), ``key``/``secret``, ``s3_additional_kwargs``.
    ``client_kwargs``/``config_kwargs`` in it are merged with the ones built here. Other protocols are
    configured the fsspec way (``fsspec.config.conf`` / ``FSSPEC_<PROTOCOL>_<OPTION>`` environment variables).
    """

    endpoint_url: str | None = None
    profile: str | None = None
    anon: bool = False
    region: str | None = None
    max_attempts: int = MAX_ATTEMPTS  # per request, the first included
    retry_mode: str = "standard"  # botocore's: "standard" or "adaptive" (client-side rate limiting too)
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_env_and_flags(
        cls,
        endpoint_url: str | None = None,
        profile: str | None = None,
        anon: bool = False,
        region: str | None = None,
    ) -> StorageOptions:
        """Options from command-line flags, falling back to the standard AWS environment variables.

        Flags win. Endpoint: ``AWS_ENDPOINT_URL_S3`` then ``AWS_ENDPOINT_URL``; profile: ``AWS_PROFILE``;
        region: ``AWS_REGION`` then ``AWS_DEFAULT_REGION`` (the AWS CLI's order); retries:
        ``AWS_MAX_ATTEMPTS`` and ``AWS_RETRY_MODE``, as botocore reads them.
        """
        env = os.environ
        env_endpoint = env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL")
        attempts = env.get("AWS_MAX_ATTEMPTS", "").strip()
        if attempts and not (attempts.isdigit() and int(attempts) >= 1):
            raise StorageError(f"AWS_MAX_ATTEMPTS must be a whole number of at least 1, got {attempts!r}")
        return cls(
            endpoint_url=endpoint_url or env_endpoint or None,
            profile=profile or env.get("AWS_PROFILE") or None,
            anon=anon,
            region=region or env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION") or None,
            max_attempts=int(attempts) if attempts else MAX_ATTEMPTS,
            retry_mode=env.get("AWS_RETRY_MODE") or "standard",
        )

    def for_protocol(self, protocol: str) -> dict[str, Any]:
        """fsspec keyword arguments for a filesystem of ``protocol`` (nothing for non-S3 protocols)."""
        if protocol not in S3_PROTOCOLS:
            return {}
        # fail within seconds, not minutes, when an endpoint does not answer; botocore's standard retries
        config = copy.deepcopy(S3_CLIENT_CONFIG)
        config["retries"] = {"mode": self.retry_mode, "total_max_attempts": self.max_attempts}
        kwargs: dict[str, Any] = {"anon": self.anon, "config_kwargs": config}
        if self.endpoint_url:
            kwargs["endpoint_url"] = self.endpoint_url
        if self.profile and not self.anon:
            kwargs["profile"] = self.profile
        if self.region:
            kwargs["client_kwargs"] = {"region_name": self.region}
        for key, value in self.extra.items():
            if key in ("client_kwargs", "config_kwargs") and isinstance(value, dict):
                kwargs[key] = {**kwargs.get(key, {}), **value}
            else:
                kwargs[key] = value
        return kwargs

    def __repr__(self) -> str:
        # ``extra`` may carry keys/secrets/tokens: show its key names only.
        return (
            f"StorageOptions(endpoint_url={_redact_url(self.endpoint_url)!r}, profile={self.profile!r}, "
            f"anon={self.anon!r}, region={self.region!r}, max_attempts={self.max_attempts!r}, "
            f"retry_mode={self.retry_mode!r}, extra_keys={sorted(self.extra)!r})"
        )

    __str__ = __repr__


def _redact_url(url: str | None) -> str | None:
    """``url`` without any ``user:password@`` part."""
    if not url:
        return url
    parts = urlsplit(url)
    if "@" not in parts.netloc:
        return url
    return urlunsplit(parts._replace(netloc="***@" + parts.netloc.rsplit("@", 1)[1]))


def protocol_of(uri: str) -> str:
    """The URI's scheme, ``"file"`` for a plain path."""
    return split_protocol(uri)[0] or "file"


def join(uri: str, *parts: str) -> str:
    """Join path segments onto a URI, keeping its scheme: ``join("s3://b/lib", "parts", "x")``."""
    out = uri
    for part in parts:
        part = part.strip("/")
        if part:
            out = (out if out.endswith("/") else out + "/") + part
    return out


def _chain(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def _raised_from_storage_error(exc: BaseException) -> bool:
    """Whether ``exc`` was raised ``from`` a :class:`StorageError` (explicit causes only, not the context)."""
    cause = exc.__cause__
    while cause is not None:
        if isinstance(cause, StorageError):
            return True
        cause = cause.__cause__
    return False


def _error_code(exc: BaseException) -> str | None:
    """The S3 error code (``NoSuchBucket``, ``PreconditionFailed``, ...) of a botocore error in the chain."""
    for e in _chain(exc):
        response = getattr(e, "response", None)
        if isinstance(response, dict):
            code = response.get("Error", {}).get("Code")
            return str(code) if code else None
    return None


def _class_names(exc: BaseException) -> set[str]:
    return {cls.__name__ for e in _chain(exc) for cls in type(e).__mro__}


def _bucket(uri: str) -> str:
    return uri.split("://", 1)[-1].split("/", 1)[0]


def _where(uri: str, options: StorageOptions | None) -> str:
    protocol = protocol_of(uri)
    if protocol not in S3_PROTOCOLS:
        return "the local disk" if protocol in ("file", "local") else f"the {protocol}:// store"
    endpoint = _redact_url((options or StorageOptions.from_env_and_flags()).endpoint_url)
    return f"endpoint {endpoint}" if endpoint else "AWS S3 (default endpoint)"


def translate_error(
    exc: BaseException, uri: str, action: str, options: StorageOptions | None = None
) -> BaseException:
    """The :class:`StorageError` to raise for ``exc`` from ``action`` ("reading", "listing") on ``uri``.

    Exceptions that are not storage failures (programming errors) are returned unchanged, as are those raised
    from a :class:`StorageError` (``raise ... from``): a failure already translated and told as what it
    means to its reader (a library's missing file is a damaged library).
    """
    if isinstance(exc, StorageError) or _raised_from_storage_error(exc):
        return exc
    code = _error_code(exc)
    names = _class_names(exc)
    where = _where(uri, options)
    if code in _PRECONDITION_CODES:
        return PreconditionFailed(f"{uri} was changed by another writer; re-read it and retry")
    if code == "NoSuchBucket":
        return StorageError(
            f"{action} {uri}: bucket '{_bucket(uri)}' does not exist at {where}. "
            "Check the bucket name, --endpoint-url and --region."
        )
    if code in _DENIED_CODES or isinstance(exc, PermissionError):
        if protocol_of(uri) not in S3_PROTOCOLS:
            return StorageError(f"{action} {uri}: permission denied ({exc}). Check the permissions.")
        return StorageError(
            f"{action} {uri}: access denied ({code or 'permission error'}) at {where}. Check the credentials "
            "(--profile / AWS_PROFILE / AWS_ACCESS_KEY_ID), that they may access this bucket, and --region; "
            "use --anon for public buckets."
        )
    if code == "ProfileNotFound" or "ProfileNotFound" in names:
        return StorageError(f"{action} {uri}: {exc}. Check --profile / AWS_PROFILE and ~/.aws/config.")
    if names & _CREDENTIAL_NAMES:
        return StorageError(
            f"{action} {uri}: no credentials found. Set --profile / AWS_PROFILE or AWS_ACCESS_KEY_ID and "
            "AWS_SECRET_ACCESS_KEY, or use --anon for public buckets."
        )
    if names & _UNREACHABLE_NAMES or isinstance(exc, (ConnectionError, TimeoutError)):
        return StorageUnavailable(
            f"{action} {uri}: cannot reach {where} ({type(exc).__name__}). "
            "Check --endpoint-url / AWS_ENDPOINT_URL, the network and any proxy settings."
        )
    if code == "NoSuchKey" or isinstance(exc, FileNotFoundError):
        return ObjectNotFound(f"{action} {uri}: no such object or file")
    if code == "InvalidRange":
        return RangeNotSatisfiable(f"{action} {uri}: the object ends before the bytes asked for")
    if code in _TRANSIENT_CODES:
        return StorageUnavailable(
            f"{action} {uri}: the store at {where} keeps failing ({code}: {_message(exc)}) after retries; "
            "it is down or overloaded. Try again later."
        )
    if code in ("NotImplemented", "501"):
        return StorageError(f"{action} {uri}: the store at {where} does not support this request ({exc})")
    if isinstance(exc, OSError) or code is not None or "BotoCoreError" in names:
        return StorageError(f"{action} {uri} failed at {where}: {exc}")
    return exc


def _message(exc: BaseException) -> str:
    """The store's message for a botocore error in the chain (its HTTP reason when it sent no body)."""
    for e in _chain(exc):
        response = getattr(e, "response", None)
        if isinstance(response, dict):
            error = response.get("Error", {})
            return str(error.get("Message") or response.get("ResponseMetadata", {}).get("HTTPStatusCode", ""))
    return str(exc)


@contextlib.contextmanager
def storage_errors(uri: str, action: str, options: StorageOptions | None = None) -> Iterator[None]:
    """Re-raise storage failures inside the block as :class:`StorageError` (see :func:`translate_error`)."""
    try:
        yield
    except Exception as e:
        err = translate_error(e, uri, action, options)
        if err is e:
            raise
        raise err from e


def is_s3(fs: AbstractFileSystem) -> bool:
    """Whether ``fs`` is an s3fs filesystem (conditional writes, ETags)."""
    protocols = (fs.protocol,) if isinstance(fs.protocol, str) else tuple(fs.protocol)
    return any(p in S3_PROTOCOLS for p in protocols) and hasattr(fs, "call_s3")


def is_local(fs: AbstractFileSystem) -> bool:
    """Whether ``fs`` is the local disk."""
    return isinstance(fs, LocalFileSystem)


def content_token(data: bytes) -> str:
    """The version token of ``data`` on non-S3 stores: its SHA-256 hex digest."""
    return hashlib.sha256(data).hexdigest()


class Store:
    """A location on some filesystem (a root URI) bound once to its filesystem and options: the handle that
    the library, the stages and the jobs carry instead of ``(uri, options)`` pairs.

    ``Store("s3://bucket/lib", options)``; names below it are relative (``store.read_bytes("_current")``), and
    ``store / "parts"`` is the store one level down on the same filesystem. Every operation translates storage
    failures into :class:`StorageError` naming the URI. The filesystem is created on first use and not
    pickled: a store sent to a Ray worker opens its own there.
    """

    def __init__(self, uri: str | os.PathLike, options: StorageOptions | None = None) -> None:
        self.uri = os.fspath(uri)
        self.options = options if options is not None else StorageOptions.from_env_and_flags()
        self._fs: tuple[AbstractFileSystem, str] | None = None

    def __repr__(self) -> str:
        return f"Store({self.uri!r}, {self.options!r})"

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_fs": None}

    def __truediv__(self, name: str) -> Store:
        child = Store(join(self.uri, name), self.options)
        if self._fs is not None:
            child._fs = (self._fs[0], join(self._fs[1], name))
        return child

    @property
    def protocol(self) -> str:
        """The URI's scheme, ``"file"`` for a plain path."""
        return protocol_of(self.uri)

    @property
    def fs(self) -> AbstractFileSystem:
        """The fsspec filesystem (created on first use)."""
        return self._opened()[0]

    def path(self, name: str = "") -> str:
        """The path of ``name`` inside the filesystem (``bucket/key`` on S3, absolute locally)."""
        return join(self._opened()[1], name)

    def url(self, name: str = "") -> str:
        """The URI of ``name``, with this store's scheme."""
        return join(self.uri, name)

    def fsspec_options(self) -> dict[str, Any]:
        """fsspec keyword arguments for this store's protocol (for libraries that open URLs themselves)."""
        return self.options.for_protocol(self.protocol)

    def _opened(self) -> tuple[AbstractFileSystem, str]:
        if self._fs is None:
            try:
                self._fs = url_to_fs(self.uri, **self.fsspec_options())
                if is_s3(self._fs[0]):
                    self._fs[0].retries = S3FS_RETRIES  # a class attribute of s3fs, not an argument
            except ImportError as e:
                raise StorageError(
                    f"cannot open {self.uri}: support for {self.protocol}:// is not installed ({e}). "
                    "Install the fsspec implementation for it (s3fs for s3://)."
                ) from e
            except ValueError as e:
                raise StorageError(f"cannot open {self.uri}: {e}") from e
        return self._fs

    def errors(self, action: str, name: str = "") -> contextlib.AbstractContextManager[None]:
        """Re-raise storage failures inside the block as :class:`StorageError` about ``name``."""
        return storage_errors(self.url(name), action, self.options)

    @property
    def is_s3(self) -> bool:
        """Whether this store is S3 (conditional writes, ETags)."""
        return is_s3(self.fs)

    @property
    def is_local(self) -> bool:
        """Whether this store is the local disk."""
        return is_local(self.fs)

    # ------------------------------------------------------------------------------------------- reading
    def read_bytes(self, name: str = "") -> bytes:
        """The whole object, in one request. A missing one raises :class:`ObjectNotFound`."""
        with self.errors("reading", name):
            # s3fs asks an object's size before it reads it whole, to read a large one in concurrent ranges
            return self.fs.cat_file(self.path(name), **({"max_concurrency": 1} if self.is_s3 else {}))

    def read_large(self, name: str = "") -> bytes:
        """The whole object, as :meth:`read_bytes`; on S3, one larger than 50 MB in ranges fetched at once
        (s3fs's ``cat_file``: one stream runs at ~100 MB/s), for a request more (its size)."""
        with self.errors("reading", name):
            return self.fs.cat_file(self.path(name))

    def read_ranges(self, name: str, starts: list[int], ends: list[int]) -> list[bytes]:
        """The bytes ``[start, end)`` of the object for each pair (fetched concurrently where possible); fewer
        where the object ends first, :class:`RangeNotSatisfiable` where it ends before ``start``."""
        path = self.path(name)
        with self.errors("reading", name):
            return self.fs.cat_ranges([path] * len(starts), starts, ends, on_error="raise")

    def read_ranges_of(self, names: list[str], starts: list[int], ends: list[int]) -> list[bytes | Exception]:
        """The bytes ``[start, end)`` of object ``name`` for each triple, all fetched concurrently where the
        store allows (fewer where the object ends first); a range that failed is its error instead (a
        storage failure's :class:`StorageError`, naming its object)."""
        if not names:
            return []
        with self.errors("reading"):
            found = self.fs.cat_ranges([self.path(n) for n in names], starts, ends, on_error="return")
        return [
            translate_error(data, self.url(name), "reading", self.options)
            if isinstance(data, BaseException)
            else data
            for name, data in zip(names, found, strict=True)
        ]

    def size(self, name: str = "") -> int:
        """The object's size in bytes."""
        with self.errors("reading", name):
            return int(self.fs.size(self.path(name)))

    def open(self, name: str = "", mode: str = "rb", **kwargs: Any) -> IO[bytes]:
        """A file object (``fs.open``); for writing locally, parent directories are created first."""
        path = self.path(name)
        with self.errors("writing" if "w" in mode else "reading", name):
            if "w" in mode and self.is_local:
                self.fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
            return self.fs.open(path, mode, **kwargs)

    def names(self, name: str = "") -> list[str]:
        """The names directly below ``name`` (``[]`` where there is nothing), never from a cached listing."""
        return sorted(entry.rsplit("/", 1)[-1] for entry in self._ls(name))

    def entries(self, name: str = "") -> dict[str, dict[str, Any]]:
        """The objects (not directories) directly below ``name`` with their details (``size``, a modification
        time...), by their names relative to this store (``parts/part-1.parquet``)."""
        return {
            join(name, entry.rsplit("/", 1)[-1]): info
            for entry, info in self._ls(name).items()
            if info.get("type", "file") == "file"
        }

    def _ls(self, name: str) -> dict[str, dict[str, Any]]:
        directory = self.path(name)
        with self.errors("listing", name):
            self.fs.invalidate_cache(directory)
            try:
                infos = self.fs.ls(directory, detail=True)
            except FileNotFoundError:
                return {}
        return {info["name"].rstrip("/"): info for info in infos}

    def read_with_token(self, name: str = "") -> tuple[bytes, str]:
        """The object's bytes and the version token to pass to :meth:`put_if` to replace exactly this
        version. On S3 both come from one ``GetObject`` (the ETag of the bytes returned, never of a later
        version)."""
        path = self.path(name)
        with self.errors("reading", name):
            if self.is_s3:
                bucket, key, _ = self.fs.split_path(path)
                return sync(self.fs.loop, _s3_get, self.fs, bucket, key)
            data = self.fs.cat_file(path)
            return data, content_token(data)

    def current_token(self, name: str = "") -> str | None:
        """The object's current version token, ``None`` if it does not exist (S3: one ``HeadObject``)."""
        path = self.path(name)
        with self.errors("reading", name):
            try:
                if self.is_s3:
                    bucket, key, _ = self.fs.split_path(path)
                    return self.fs.call_s3("head_object", Bucket=bucket, Key=key)["ETag"]
                return content_token(self.fs.cat_file(path))
            except FileNotFoundError as e:
                if _error_code(e) == "NoSuchBucket":
                    raise
                return None

    # ------------------------------------------------------------------------------------------- writing
    def write_bytes(self, name: str, data: bytes) -> None:
        """Write (replace) the whole object. Locally: parent directories are created, the write is atomic."""
        path = self.path(name)
        with self.errors("writing", name):
            if self.is_local:
                _local_atomic_write(path, data)
            else:
                self.fs.pipe_file(path, data)

    def delete(self, name: str = "") -> None:
        """Remove the object; one that is already gone is fine."""
        with self.errors("deleting", name), contextlib.suppress(FileNotFoundError):
            self.fs.rm_file(self.path(name))

    def put_if(self, name: str, data: bytes, expected_etag: str | None) -> str:
        """Compare-and-swap: write ``data`` only if the object is still at version ``expected_etag``.

        ``expected_etag=None`` means "only if it does not exist yet". Returns the new version token (the ETag
        on S3, the SHA-256 of ``data`` elsewhere). Raises :class:`PreconditionFailed` when the object changed
        (or exists, or was deleted) in the meantime. See the module docstring for how atomic this is on each
        kind of store; on S3 it needs a store that honours conditional writes (AWS S3 does; some
        S3-compatible stores ignore the headers).
        """
        uri, path = self.url(name), self.path(name)
        with self.errors("publishing", name):
            if self.is_s3:
                return _s3_put_if(self.fs, uri, path, data, expected_etag)
            if self.is_local:
                return _local_put_if(uri, path, data, expected_etag)
            with _GENERIC_LOCK:  # best effort: atomic within this process only
                try:
                    current = content_token(self.fs.cat_file(path))
                except FileNotFoundError:
                    current = None
                if current != expected_etag:
                    raise _lost(uri, expected_etag, current is None)
                self.fs.pipe_file(path, data)
                return content_token(data)

    def check_container(self) -> None:
        """Raise :class:`StorageError` if the bucket (S3) or the base directory (local) is missing.

        The URI may be a glob; its part before the first wildcard is checked. Other stores are not checked.
        """
        path = self.path()
        if self.is_s3:
            bucket = self.fs.split_path(path)[0]
            with self.errors("listing"):
                try:
                    self.fs.call_s3("head_bucket", Bucket=bucket)
                except FileNotFoundError as e:  # HEAD has no body: a bare 404, not NoSuchBucket
                    where = _where(self.uri, self.options)
                    raise StorageError(
                        f"listing {self.uri}: bucket '{bucket}' does not exist at {where}. "
                        "Check the bucket name, --endpoint-url and --region."
                    ) from e
        elif self.is_local:
            root = glob_root(path)
            if not os.path.exists(root):
                raise StorageError(f"listing {self.uri}: {root} does not exist. Check the path.")


async def _s3_get(fs: Any, bucket: str, key: str) -> tuple[bytes, str]:
    response = await fs._call_s3("get_object", Bucket=bucket, Key=key)
    try:
        return await response["Body"].read(), response["ETag"]
    finally:
        response["Body"].close()


def _lost(uri: str, expected: str | None, missing: bool) -> PreconditionFailed:
    if expected is None:
        return PreconditionFailed(f"{uri} already exists (another writer created it); re-read it and retry")
    state = "was deleted" if missing else "was changed by another writer"
    return PreconditionFailed(f"{uri} {state} since version {expected}; re-read it and retry")


def _s3_put_if(fs: Any, uri: str, path: str, data: bytes, expected: str | None) -> str:
    bucket, key, _ = fs.split_path(path)
    condition = {"IfNoneMatch": "*"} if expected is None else {"IfMatch": expected}
    try:
        response = fs.call_s3("put_object", Bucket=bucket, Key=key, Body=data, **condition)
    except FileNotFoundError as e:  # If-Match on a key that is gone: 404 NoSuchKey
        if expected is not None and _error_code(e) == "NoSuchKey":
            raise _lost(uri, expected, True) from e
        raise
    except OSError as e:
        if _error_code(e) in _PRECONDITION_CODES:
            raise _lost(uri, expected, False) from e
        raise
    finally:
        fs.invalidate_cache(path)
    return response["ETag"]


def _local_put_if(uri: str, path: str, data: bytes, expected: str | None) -> str:
    with _file_lock(path):
        try:
            with open(path, "rb") as f:
                current: str | None = content_token(f.read())
        except FileNotFoundError:
            current = None
        if current != expected:
            raise _lost(uri, expected, current is None)
        _local_atomic_write(path, data)
    return content_token(data)


@contextlib.contextmanager
def _file_lock(path: str) -> Iterator[None]:
    """Exclusive lock on ``.<name>.lock`` next to ``path``; released by the OS even if the process dies."""
    if fcntl is None:  # pragma: no cover - Windows
        raise StorageError(f"publishing {path}: atomic local writes need a POSIX system (fcntl.flock)")
    directory, name = os.path.split(path)
    os.makedirs(directory or ".", exist_ok=True)
    fd = os.open(os.path.join(directory, f".{name}.lock"), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _local_atomic_write(path: str, data: bytes) -> None:
    """Write a temporary file next to ``path``, fsync it, ``os.replace`` it over ``path``."""
    directory, name = os.path.split(path)
    os.makedirs(directory or ".", exist_ok=True)
    tmp = os.path.join(directory, f".{name}.{uuid.uuid4().hex}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    with contextlib.suppress(OSError):  # make the rename durable; not possible on every platform
        dir_fd = os.open(directory or ".", os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def has_magic(path: str) -> bool:
    """Whether ``path`` is a glob pattern."""
    return any(c in path for c in "*?[")


def glob_root(path: str) -> str:
    """The directory part of ``path`` before its first wildcard (``path`` itself if there is none)."""
    if not has_magic(path):
        return path
    head = path[: min(path.index(c) for c in "*?[" if c in path)]
    return head.rsplit("/", 1)[0] or "/"


def to_timestamp(value: Any) -> float | None:
    """Seconds since the epoch from a datetime, a number, an ISO string or an HTTP date (``Last-Modified``);
    ``None`` if unknown."""
    if isinstance(value, datetime):
        return value.timestamp()
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, str) and value:
        with contextlib.suppress(ValueError):
            return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
        with contextlib.suppress(TypeError, ValueError):
            return email.utils.parsedate_to_datetime(value).timestamp()
    return None


def each_at_once(work: Callable[[Any], Any], items: Sequence[Any], at_once: int) -> list[Any]:
    """``work(item)`` of each of ``items``, in their order, up to ``at_once`` at a time: for work that waits
    on storage requests (one each), which would otherwise add up their round trips."""
    if len(items) <= 1:
        return [work(item) for item in items]
    with ThreadPoolExecutor(min(at_once, len(items))) as pool:
        return list(pool.map(work, items))


def as_store(location: str | os.PathLike | Store, options: StorageOptions | None = None) -> Store:
    """``location`` itself if it is a :class:`Store`, else a store of that URI with ``options``."""
    return location if isinstance(location, Store) else Store(location, options)
