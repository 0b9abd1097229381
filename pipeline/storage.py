"""Storage layer: one way to reach S3, local disks and anything else fsspec reads.

Everything takes a URI (``s3://bucket/key``, ``/local/path``, ``file:///x``, ``memory://x``, ...) and an
optional :class:`StorageOptions`. Failures at the edge (missing bucket, access denied, unreachable endpoint,
missing object) become :class:`StorageError` subclasses whose messages name the URI and say what to check;
credentials never appear in them.

:func:`put_if` is the compare-and-swap the library's publish step is built on:

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
import hashlib
import os
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any
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
S3_CLIENT_CONFIG = {"connect_timeout": 10, "retries": {"max_attempts": 3, "mode": "standard"}}

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
_GENERIC_LOCK = threading.Lock()


class StorageError(Exception):
    """A storage operation failed; the message names the URI and what to check."""


class ObjectNotFound(StorageError, FileNotFoundError):
    """The object (or local file) does not exist. Also a ``FileNotFoundError``."""


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
        region: ``AWS_REGION`` then ``AWS_DEFAULT_REGION`` (the AWS CLI's order).
        """
        env = os.environ
        env_endpoint = env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL")
        return cls(
            endpoint_url=endpoint_url or env_endpoint or None,
            profile=profile or env.get("AWS_PROFILE") or None,
            anon=anon,
            region=region or env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION") or None,
        )

    def for_protocol(self, protocol: str) -> dict[str, Any]:
        """fsspec keyword arguments for a filesystem of ``protocol`` (nothing for non-S3 protocols)."""
        if protocol not in S3_PROTOCOLS:
            return {}
        # fail within seconds, not minutes, when an endpoint does not answer; botocore's standard retries
        kwargs: dict[str, Any] = {"anon": self.anon, "config_kwargs": copy.deepcopy(S3_CLIENT_CONFIG)}
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
            f"anon={self.anon!r}, region={self.region!r}, extra_keys={sorted(self.extra)!r})"
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


def filesystem(uri: str, options: StorageOptions | None = None) -> tuple[AbstractFileSystem, str]:
    """The fsspec filesystem for ``uri`` and the path inside it (``bucket/key`` on S3, absolute locally).

    ``options=None`` reads the environment (:meth:`StorageOptions.from_env_and_flags`). No request is made
    here; network errors surface (as :class:`StorageError`) from the operations.
    """
    options = options if options is not None else StorageOptions.from_env_and_flags()
    protocol = protocol_of(uri)
    try:
        return url_to_fs(uri, **options.for_protocol(protocol))
    except ImportError as e:
        raise StorageError(
            f"cannot open {uri}: support for {protocol}:// is not installed ({e}). "
            "Install the fsspec implementation for it (s3fs for s3://)."
        ) from e
    except ValueError as e:
        raise StorageError(f"cannot open {uri}: {e}") from e


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

    Exceptions that are not storage failures (programming errors) are returned unchanged.
    """
    if isinstance(exc, StorageError):
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
        return StorageError(
            f"{action} {uri}: cannot reach {where} ({type(exc).__name__}). "
            "Check --endpoint-url / AWS_ENDPOINT_URL, the network and any proxy settings."
        )
    if code == "NoSuchKey" or isinstance(exc, FileNotFoundError):
        return ObjectNotFound(f"{action} {uri}: no such object or file")
    if code in ("NotImplemented", "501"):
        return StorageError(f"{action} {uri}: the store at {where} does not support this request ({exc})")
    if isinstance(exc, OSError) or code is not None or "BotoCoreError" in names:
        return StorageError(f"{action} {uri} failed at {where}: {exc}")
    return exc


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


def read_bytes(uri: str, options: StorageOptions | None = None) -> bytes:
    """The whole object. A missing one raises :class:`ObjectNotFound`."""
    fs, path = filesystem(uri, options)
    with storage_errors(uri, "reading", options):
        return fs.cat_file(path)


def write_bytes(uri: str, data: bytes, options: StorageOptions | None = None) -> None:
    """Write (replace) the whole object. Locally: parent directories are created, the write is atomic."""
    fs, path = filesystem(uri, options)
    with storage_errors(uri, "writing", options):
        if is_local(fs):
            _local_atomic_write(path, data)
        else:
            fs.pipe_file(path, data)


async def _s3_get(fs: Any, bucket: str, key: str) -> tuple[bytes, str]:
    response = await fs._call_s3("get_object", Bucket=bucket, Key=key)
    try:
        return await response["Body"].read(), response["ETag"]
    finally:
        response["Body"].close()


def read_with_token(uri: str, options: StorageOptions | None = None) -> tuple[bytes, str]:
    """The object's bytes and the version token to pass to :func:`put_if` to replace exactly this version.

    On S3 both come from one ``GetObject`` (the ETag of the bytes returned, never of a later version).
    """
    fs, path = filesystem(uri, options)
    with storage_errors(uri, "reading", options):
        if is_s3(fs):
            bucket, key, _ = fs.split_path(path)
            return sync(fs.loop, _s3_get, fs, bucket, key)
        data = fs.cat_file(path)
        return data, content_token(data)


def current_token(uri: str, options: StorageOptions | None = None) -> str | None:
    """The object's current version token, ``None`` if it does not exist (S3: one ``HeadObject``)."""
    fs, path = filesystem(uri, options)
    with storage_errors(uri, "reading", options):
        try:
            if is_s3(fs):
                bucket, key, _ = fs.split_path(path)
                return fs.call_s3("head_object", Bucket=bucket, Key=key)["ETag"]
            return content_token(fs.cat_file(path))
        except FileNotFoundError as e:
            if _error_code(e) == "NoSuchBucket":
                raise
            return None


def put_if(uri: str, data: bytes, expected_etag: str | None, options: StorageOptions | None = None) -> str:
    """Compare-and-swap: write ``data`` only if the object is still at version ``expected_etag``.

    ``expected_etag=None`` means "only if it does not exist yet". Returns the new version token (the ETag on
    S3, the SHA-256 of ``data`` elsewhere). Raises :class:`PreconditionFailed` when the object changed (or
    exists, or was deleted) in the meantime. See the module docstring for how atomic this is on each kind of
    store; on S3 it needs a store that honours conditional writes (AWS S3 does; some S3-compatible stores
    ignore the headers).
    """
    fs, path = filesystem(uri, options)
    with storage_errors(uri, "publishing", options):
        if is_s3(fs):
            return _s3_put_if(fs, uri, path, data, expected_etag)
        if is_local(fs):
            return _local_put_if(uri, path, data, expected_etag)
        with _GENERIC_LOCK:  # best effort: atomic within this process only
            try:
                current = content_token(fs.cat_file(path))
            except FileNotFoundError:
                current = None
            if current != expected_etag:
                raise _lost(uri, expected_etag, current is None)
            fs.pipe_file(path, data)
            return content_token(data)


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


def check_container(uri: str, options: StorageOptions | None = None) -> None:
    """Raise :class:`StorageError` if the bucket (S3) or the base directory (local) of ``uri`` is missing.

    ``uri`` may be a glob; its part before the first wildcard is checked. Other stores are not checked.
    """
    fs, path = filesystem(uri, options)
    if is_s3(fs):
        bucket = fs.split_path(path)[0]
        with storage_errors(uri, "listing", options):
            try:
                fs.call_s3("head_bucket", Bucket=bucket)
            except FileNotFoundError as e:  # HEAD has no body: a bare 404, not NoSuchBucket
                raise StorageError(
                    f"listing {uri}: bucket '{bucket}' does not exist at {_where(uri, options)}. "
                    "Check the bucket name, --endpoint-url and --region."
                ) from e
    elif is_local(fs):
        root = glob_root(path)
        if not os.path.exists(root):
            raise StorageError(f"listing {uri}: {root} does not exist. Check the path.")


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
    """Seconds since the epoch from a datetime, a number or an ISO string; ``None`` if unknown."""
    if isinstance(value, datetime):
        return value.timestamp()
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, str) and value:
        with contextlib.suppress(ValueError):
            return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
    return None
