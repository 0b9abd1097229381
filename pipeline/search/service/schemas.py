"""The JSON bodies of the service's API (its OpenAPI schema at ``/openapi.json``)."""

from __future__ import annotations

from pydantic import BaseModel, Field

from .options import MAX_K, MAX_QUERIES, MAX_UNDER

PER_VIDEO = (
    "one hit per video, its best segment, for the k best videos (default: the k best segments, several of a "
    "video possibly)"
)
UNDER = (
    "only the videos in this folder (a uri as hits show them: s3://bucket/videos/2024/) or this one video "
    "(default: the whole library)"
)


class HitOut(BaseModel):
    """One result: a video, or a segment of one, with where to see it. URLs without a scheme are paths of
    this service."""

    id: int = Field(description="the row's id in the library")
    uri: str = Field(description="the source video")
    score: float = Field(
        description="in [-1, 1]: the exact score for a text; the stored embeddings' inner product for similar"
    )
    scored_by: str = Field(
        description="video-conditioned (the model's exact score) or cosine (a model without a re-rank "
        "stage, such as EVL; similar videos)"
    )
    segment: int
    start_s: float = Field(description="segment start, seconds from the start of the video")
    end_s: float = Field(description="segment end, seconds")
    thumbnail_url: str = Field(description="the segment's JPEG thumbnail")
    similar_url: str = Field(
        description="more like this row (JavaScript clients: use it rather than build one from ``id``, a "
        "63-bit integer that a JavaScript number cannot hold exactly)"
    )
    play_url: str | None = Field(
        description="where a browser plays the video: a presigned URL on an object store, this service's "
        "/videos/{id}/media for a local file, null otherwise"
    )


class QueryResult(BaseModel):
    query: str
    truncated: bool = Field(description="the text was longer than the model's context and was cut to it")
    hits: list[HitOut]


class SearchOut(QueryResult):
    version: int = Field(description="the library version that answered")
    k: int
    per_video: bool = Field(description="one hit per video: its best segment")
    under: str | None = Field(description="the folder searched (null: the whole library)")


class BatchIn(BaseModel):
    queries: list[str] = Field(min_length=1, max_length=MAX_QUERIES)
    k: int = Field(10, ge=1, le=MAX_K)
    version: int | None = Field(None, ge=1, description="default: the current version")
    per_video: bool = Field(False, description=PER_VIDEO)
    under: str | None = Field(None, min_length=1, max_length=MAX_UNDER, description=UNDER)


class BatchOut(BaseModel):
    version: int
    k: int
    per_video: bool
    under: str | None
    results: list[QueryResult] = Field(description="one per query, in their order")


class VideoOut(BaseModel):
    """A row of the library: a video (or a segment of one), or the error row of a video that failed."""

    id: int
    version: int
    uri: str
    segment: int | None
    start_s: float | None
    end_s: float | None
    duration_s: float | None = Field(description="the whole video's duration")
    fps: float | None
    frame_count: int | None
    width: int | None
    height: int | None
    size: int | None = Field(description="bytes of the source object")
    etag: str | None
    error: str | None = Field(description="why the video could not be embedded; null for a row that was")
    thumbnail_url: str | None
    play_url: str | None


class LikeOut(BaseModel):
    version: int
    k: int
    per_video: bool
    under: str | None
    hits: list[HitOut] = Field(description="the rows nearest to the video sent, by the cosine of embeddings")


class SimilarOut(BaseModel):
    id: int
    version: int
    k: int
    per_video: bool
    under: str | None
    hits: list[HitOut] = Field(description="the nearest rows by stored embedding, nearest first, not the row")


class HealthOut(BaseModel):
    ok: bool
    library: str
    version: int = Field(description="the current version, which answers queries without ?version=")
    videos: int
    segments: int = Field(description="rows with an embedding: what a search ranks")
    failed: int = Field(description="videos that could not be embedded")


class ErrorOut(BaseModel):
    error: str
