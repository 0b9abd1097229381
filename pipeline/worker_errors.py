"""Errors that a job's workers raise and the command reports in one line: found behind the wrapping of the
framework that ran the worker (Ray's ``RayTaskError`` and ``ActorDiedError``, Ray Data's own exceptions)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator


def cause_of(exc: BaseException, kinds: tuple[type[BaseException], ...]) -> BaseException | None:
    """The first exception of ``kinds`` behind ``exc`` (``exc`` itself, its causes and contexts, and where a
    framework wrapped it, the ``cause`` it carries: a Ray task's error is also an instance of its cause's
    class); ``None`` if there is none."""
    seen: set[int] = set()
    pending: list[BaseException | None] = [exc]
    while pending:
        current = pending.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        wrapped = getattr(current, "cause", None)
        if isinstance(wrapped, BaseException):
            pending.append(wrapped)
            continue
        if isinstance(current, kinds):
            return current
        pending += [current.__cause__, current.__context__]
    return None


@contextlib.contextmanager
def worker_errors(kinds: tuple[type[BaseException], ...]) -> Iterator[None]:
    """Re-raise an exception that a framework raised for a failed worker as the exception of ``kinds``
    behind it, if there is one: the same class, its first line only (Ray Data appends advice to it)."""
    try:
        yield
    except Exception as e:
        cause = cause_of(e, kinds)
        if cause is None or cause is e:
            raise
        raise type(cause)(str(cause).splitlines()[0]) from None
