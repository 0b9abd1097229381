"""Every failure as a JSON answer ``{"error": "..."}``: 4xx for what the request got wrong, 503 when storage
fails, and never a stack trace (an unexpected error answers 500 with its type; the server logs it)."""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from ...library import LibraryError, VersionNotFoundError
from ...storage import StorageError


class ApiError(Exception):
    """A request the service refuses: ``status`` (4xx) and a message for the user."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def error(status: int, message: str) -> JSONResponse:
    """The JSON answer of a failure."""
    return JSONResponse({"error": message}, status_code=status)


def _where(location: tuple[object, ...]) -> str:
    """Where a problem is: ``("query", "k")`` -> ``k``, ``("body", "queries", 2)`` -> ``queries[2]``,
    ``("body",)`` -> ``body``."""
    path = "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in location[1:])
    return path.lstrip(".") or str(location[0])


def _invalid(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    problems = exc.errors()
    if any(problem["type"] == "json_invalid" for problem in problems):
        return error(400, "the request body is not valid JSON")
    return error(422, "; ".join(f"{_where(p['loc'])}: {p['msg']}" for p in problems))


def _refused(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ApiError)
    return error(exc.status, exc.message)


def _http(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, HTTPException)
    return JSONResponse({"error": str(exc.detail)}, status_code=exc.status_code, headers=exc.headers)


def _unknown_version(request: Request, exc: Exception) -> JSONResponse:
    return error(404, str(exc))


def _unavailable(request: Request, exc: Exception) -> JSONResponse:
    """Storage failed (or the library is damaged): the service is fine, the data cannot be read now."""
    return error(503, str(exc).splitlines()[0])


def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    """A bug: Starlette hands the exception on to the server, which logs its traceback."""
    return error(500, f"internal error ({type(exc).__name__}); the service's log has the details")


def install(app: FastAPI) -> None:
    """Answer every failure of ``app`` as JSON."""
    app.add_exception_handler(ApiError, _refused)
    app.add_exception_handler(RequestValidationError, _invalid)
    app.add_exception_handler(HTTPException, _http)
    app.add_exception_handler(VersionNotFoundError, _unknown_version)
    app.add_exception_handler(LibraryError, _unavailable)
    app.add_exception_handler(StorageError, _unavailable)
    app.add_exception_handler(Exception, _unexpected)
