"""The search service's HTTP API and web page, as a FastAPI app over one library.

Endpoints (JSON; errors are ``{"error": "..."}``, see :mod:`.errors`):

- ``GET /search?q=TEXT&k=10&version=N``: the ``k`` best rows for a text, as ``Searcher.search`` ranks them.
- ``POST /search`` ``{"queries": [...], "k": 10, "version": N}``: several texts against one version.
- ``POST /search/like?k=10`` with a video as the body: the rows nearest to it (:meth:`Searcher.like`).
- ``GET /videos/{id}``: a row's metadata; ``/videos/{id}/thumbnail``: its JPEG thumbnail;
  ``/videos/{id}/media``: the source video (a local file, with range requests; a redirect to a presigned
  URL on an object store); ``/videos/{id}/similar?k=10``: more like this (:meth:`Searcher.similar`).
- ``GET /healthz``: ok, the current version and its counts. ``GET /``: the web page (``static/``).

Handlers are plain functions, which FastAPI runs in its thread pool: searches run side by side (torch and
FAISS release the GIL in their kernels), each on the searcher it took when it started (:mod:`.follow`).
"""

from __future__ import annotations

import contextlib
import functools
import mimetypes
import os
from collections.abc import AsyncIterator
from pathlib import Path as FilePath
from typing import Annotated, Any

from fastapi import APIRouter, Depends, FastAPI, Path, Query, Request, Security
from fastapi.responses import FileResponse, RedirectResponse, Response
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool

from ...library import Library
from ...storage import StorageOptions, Store, as_store
from ..example import BadExample
from ..searcher import Hit, NoEmbedding, Searcher
from . import errors
from .auth import ApiKey
from .errors import ApiError
from .follow import VersionFollower
from .media import MediaLinks, VideoFile
from .options import MAX_K, MAX_UNDER, ServiceOptions
from .query import checked, checked_folder, truncated
from .schemas import (
    PER_VIDEO,
    UNDER,
    BatchIn,
    BatchOut,
    ErrorOut,
    HealthOut,
    HitOut,
    LikeOut,
    QueryResult,
    SearchOut,
    SimilarOut,
    VideoOut,
)
from .uploads import UploadDecoders, received

STATIC = FilePath(__file__).parent / "static"
MAX_ID = 2**63 - 1
METADATA = [
    "id", "uri", "segment", "start_s", "end_s", "duration_s", "fps", "frame_count", "width", "height", "size",
    "etag", "error",
]  # fmt: skip
ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorOut, "description": description}
    for status, description in {
        400: "the body is not valid JSON",
        401: "missing or wrong API key (when the service has one)",
        404: "no such row or version",
        422: "a parameter is missing or out of range, or the query is empty",
        503: "the library's storage failed",
    }.items()
}
AT_VERSION = Query(None, ge=1, description="the library version to read (default: the current one)")
API_KEY_HEADER = APIKeyHeader(name="X-API-Key", auto_error=False, description="the service's API key")
BEARER = HTTPBearer(auto_error=False, description="the service's API key as a bearer token")
ROW_ID = Path(alias="id", ge=0, le=MAX_ID, description="the row's id in the library")
PER_VIDEO_QUERY = Query(False, description=PER_VIDEO)
UNDER_QUERY = Query(None, min_length=1, max_length=MAX_UNDER, description=UNDER)


def create_app(
    location: str | Store, storage: StorageOptions | None = None, options: ServiceOptions | None = None
) -> FastAPI:
    """The service of the library at ``location``: it opens the current version now (raising what
    ``Library.open`` raises), and follows ``_current`` while it runs."""
    options = options or ServiceOptions()
    store = as_store(location, storage)
    follower = VersionFollower(store, options)
    links = MediaLinks(store.options, options.url_ttl_s)
    uploads = UploadDecoders(options.max_decode_s)
    key = ApiKey(options.api_key, options.url_ttl_s)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        follower.start()
        try:
            yield
        finally:
            follower.stop()
            await run_in_threadpool(uploads.close)

    app = FastAPI(
        title="videosearch",
        summary="Text-to-video search over a videosearch library",
        lifespan=lifespan,
        responses=ERRORS,
        docs_url=None,  # FastAPI's documentation pages load their scripts from a CDN: the schema is enough
        redoc_url=None,
    )
    errors.install(app)

    def presented(
        api_key: Annotated[str | None, Security(API_KEY_HEADER)] = None,
        bearer: Annotated[HTTPAuthorizationCredentials | None, Security(BEARER)] = None,
    ) -> str | None:
        return api_key or (bearer.credentials if bearer else None)

    def refuse() -> ApiError:
        return ApiError(
            401, "missing or wrong API key: send it as X-API-Key: KEY or Authorization: Bearer KEY"
        )

    def require_key(given: str | None = Depends(presented)) -> None:
        if not key.accepts(given):
            raise refuse()

    def require_key_or_signature(request: Request, given: str | None = Depends(presented)) -> None:
        params = request.query_params
        if not (
            key.accepts(given) or key.signed(request.url.path, params.get("expires"), params.get("signature"))
        ):
            raise refuse()

    api = APIRouter(dependencies=[Depends(require_key)] if key.required else [])
    media = APIRouter(dependencies=[Depends(require_key_or_signature)] if key.required else [])

    def library(version: int | None) -> Library:
        return follower.searcher(version).library

    def row(library: Library, row_id: int, columns: list[str]) -> dict[str, Any]:
        try:
            return library.rows_by_id([row_id], columns).to_pylist()[0]
        except KeyError:
            raise ApiError(404, f"version {library.version} of the library has no row {row_id}") from None

    def play_url(row_id: int, uri: str, version: int) -> str | None:
        if links.local_path(uri) is not None:
            return key.sign(f"/videos/{row_id}/media?version={version}")
        return links.presigned(uri)

    def hit(found: Hit, version: int) -> HitOut:
        return HitOut(
            **found.to_dict(),
            thumbnail_url=key.sign(f"/videos/{found.id}/thumbnail?version={version}"),
            similar_url=f"/videos/{found.id}/similar?version={version}",
            play_url=play_url(found.id, found.uri, version),
        )

    def answer(searcher: Searcher, text: str, k: int, per_video: bool, under: str | None) -> QueryResult:
        version = searcher.library.version
        found = searcher.search(text, k, per_video=per_video, under=under)
        hits = [hit(each, version) for each in found]
        return QueryResult(query=text, truncated=truncated(searcher.model, text), hits=hits)

    @api.get("/search", response_model=SearchOut, tags=["search"])
    def search(
        q: str = Query(description="the text to search for"),
        k: int = Query(10, ge=1, le=MAX_K, description="results wanted"),
        version: int | None = AT_VERSION,
        per_video: bool = PER_VIDEO_QUERY,
        under: str | None = UNDER_QUERY,
    ) -> SearchOut:
        """The ``k`` rows that match ``q`` best, best first (the exact score of the library's model)."""
        text, folder = checked(q), checked_folder(under)
        searcher = follower.searcher(version)
        found = answer(searcher, text, k, per_video, folder)
        return SearchOut(
            version=searcher.library.version, k=k, per_video=per_video, under=folder, **found.model_dump()
        )

    @api.post("/search", response_model=BatchOut, tags=["search"])
    def search_batch(batch: BatchIn) -> BatchOut:
        """Several texts against one version; a result per text, in their order."""
        texts = [checked(text, f"queries[{i}]") for i, text in enumerate(batch.queries)]
        folder = checked_folder(batch.under)
        searcher = follower.searcher(batch.version)
        results = [answer(searcher, text, batch.k, batch.per_video, folder) for text in texts]
        return BatchOut(
            version=searcher.library.version,
            k=batch.k,
            per_video=batch.per_video,
            under=folder,
            results=results,
        )

    @api.post(
        "/search/like",
        response_model=LikeOut,
        tags=["search"],
        openapi_extra={"requestBody": {"content": {"video/*": {}}, "required": True}},
    )
    async def search_like(
        request: Request,
        k: int = Query(10, ge=1, le=MAX_K, description="results wanted"),
        version: int | None = AT_VERSION,
        per_video: bool = PER_VIDEO_QUERY,
        under: str | None = UNDER_QUERY,
    ) -> LikeOut:
        """Videos like the one the body holds (its bytes; 256 MiB at most unless the service says
        otherwise), embedded as the library's videos were: the ``k`` rows nearest to it, by the cosine of
        embeddings."""
        folder = checked_folder(under)
        async with received(request.stream(), options.max_upload_mb) as (path, size):
            searcher = await run_in_threadpool(follower.searcher, version)
            try:
                found = await run_in_threadpool(
                    searcher.like,
                    path,
                    k,
                    per_video=per_video,
                    under=folder,
                    decode=functools.partial(uploads.frames, size=size),  # in a decoder process
                )
            except BadExample as err:
                raise ApiError(422, str(err)) from None
        read = searcher.library.version
        return LikeOut(
            version=read, k=k, per_video=per_video, under=folder, hits=[hit(h, read) for h in found]
        )

    @api.get("/videos/{id}", response_model=VideoOut, tags=["videos"])
    def video(row_id: int = ROW_ID, version: int | None = AT_VERSION) -> VideoOut:
        """A row's metadata: its video, segment, duration, size, frame rate..., or why it failed."""
        read = library(version)
        found = row(read, row_id, METADATA)
        embedded = found["error"] is None
        return VideoOut(
            **found,
            version=read.version,
            thumbnail_url=key.sign(f"/videos/{row_id}/thumbnail?version={read.version}")
            if embedded
            else None,
            play_url=play_url(row_id, found["uri"], read.version) if embedded else None,
        )

    @api.get("/videos/{id}/similar", response_model=SimilarOut, tags=["videos"])
    def more_like_this(
        row_id: int = ROW_ID,
        k: int = Query(10, ge=1, le=MAX_K, description="neighbours wanted"),
        version: int | None = AT_VERSION,
        per_video: bool = Query(False, description=f"{PER_VIDEO}; the row's own video is left out"),
        under: str | None = UNDER_QUERY,
    ) -> SimilarOut:
        """The ``k`` rows nearest to this one by their stored embeddings, nearest first."""
        folder = checked_folder(under)
        searcher = follower.searcher(version)
        read = searcher.library
        try:
            hits = searcher.similar(row_id, k, per_video=per_video, under=folder)
        except KeyError:
            raise ApiError(404, f"version {read.version} of the library has no row {row_id}") from None
        except NoEmbedding as err:
            raise ApiError(422, str(err)) from None
        hits_out = [hit(h, read.version) for h in hits]
        return SimilarOut(
            id=row_id, version=read.version, k=k, per_video=per_video, under=folder, hits=hits_out
        )

    @media.get("/videos/{id}/thumbnail", tags=["videos"], response_class=Response)
    def thumbnail(row_id: int = ROW_ID, version: int | None = AT_VERSION) -> Response:
        """The row's JPEG thumbnail (its segment's middle frame)."""
        found = row(library(version), row_id, ["thumbnail", "error"])
        if not found["thumbnail"]:
            raise ApiError(404, f"row {row_id} has no thumbnail: {found['error'] or 'none was stored'}")
        return Response(
            found["thumbnail"], media_type="image/jpeg", headers={"Cache-Control": "max-age=3600"}
        )

    @media.get("/videos/{id}/media", tags=["videos"], response_class=Response)
    def play(row_id: int = ROW_ID, version: int | None = AT_VERSION) -> Response:
        """The source video: a local file with range requests, or a redirect to a presigned URL."""
        uri = row(library(version), row_id, ["uri"])["uri"]
        path = links.local_path(uri)
        if path is None:
            url = links.presigned(uri)
            if url is None:
                raise ApiError(404, f"{uri} is on a storage that the service can neither sign nor stream")
            return RedirectResponse(url, status_code=307)
        if not os.path.isfile(path):
            raise ApiError(404, f"the source video {uri} is not there any more")
        return VideoFile(path, media_type=mimetypes.guess_type(path)[0] or "application/octet-stream")

    @app.get("/healthz", response_model=HealthOut, tags=["service"])
    async def healthz() -> HealthOut:
        """Always open: the service is up, and the version it answers from."""
        current = follower.current.library
        counts = current.manifest["counts"]
        return HealthOut(
            ok=True,
            library=current.uri,
            version=current.version,
            videos=counts["videos"],
            segments=counts["segments"],
            failed=counts["failed"],
        )

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(STATIC / "index.html")

    app.include_router(api)
    app.include_router(media)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app
