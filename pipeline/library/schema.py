"""The rows that flow between the stages, and the Parquet schema of a library's part files.

list   -> ListedRow     one per object in the source
decode -> DecodedRow    one per segment of a video (one per video without --segment), or one error row
encode -> EncodedRow    the decoded row without its frames, plus the embeddings
write  -> Parquet parts with part_schema(...) (one row per EncodedRow)

Errors are data: a row whose ``error`` is set carries no frames/embeddings, and says why in ``error``.
Rows are plain dicts (Ray Data batches are dicts of columns); the keys below are the contract.
"""

from __future__ import annotations

import hashlib
import math

import numpy as np
import pyarrow as pa

# ListedRow: what the listing knows about an object.
LISTED = ("uri", "size", "etag", "mtime")

# DecodedRow adds (per segment): where the segment lies, what the video is, the model-ready frames.
DECODED = (
    *LISTED,
    "segment",  # int: 0-based segment index within the video (0 when not segmented)
    "start_s",  # float: segment start, seconds from the start of the video
    "end_s",  # float: segment end (exclusive), seconds
    "duration_s",  # float: duration of the whole video
    "fps",  # float: average frame rate
    "frame_count",  # int: frames in the whole video
    "width",  # int: display width (after rotation)
    "height",  # int: display height (after rotation)
    "sample_error_s",  # float: the largest distance of a sampled frame's time from its wanted time
    "frames",  # uint8 ndarray (num_frames, crop, crop, 3): resized + centre-cropped, not normalized
    "thumbnail",  # bytes: a small JPEG of the segment's middle frame
    "error",  # str | None: why the object could not be decoded (then frames/thumbnail are empty)
)

# EncodedRow: the decoded row without frames, plus the model's output.
ENCODED = (
    *(name for name in DECODED if name != "frames"),
    "embedding",  # float32 ndarray (P,): the video embedding, L2-normalized
    "prompt_features",  # float16 ndarray (*rerank_shape): re-rank features (X-CLIP: the prompt generator's
    #                     input), absent for a model family without them
    "model_id",  # str: the model identity's tag (ModelIdentity.tag)
)


PROMPT = "prompt_features"  # the re-rank features' column (format 3 on: stored beside the part, not in it)


def dense_rows(column: pa.ChunkedArray | pa.Array, dtype: type) -> np.ndarray:
    """A fixed-size-list column as a dense (rows, width) array of ``dtype``; null rows become zeros."""
    array = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    out = np.zeros((len(array), array.type.list_size), dtype)
    valid = array.is_valid().to_numpy(zero_copy_only=False)
    if valid.any():
        out[valid] = array.filter(valid).flatten().to_numpy(zero_copy_only=False).reshape(-1, out.shape[1])
    return out


def stored_schema(schema: pa.Schema) -> pa.Schema:
    """The columns a format-3 part file holds: the part schema without the re-rank features."""
    return schema.remove(schema.get_field_index(PROMPT)) if PROMPT in schema.names else schema


def part_schema(embedding_dim: int, prompt_shape: tuple[int, int] | None) -> pa.Schema:
    """Arrow schema of a part file. Embeddings are fixed-size lists so that readers get dense arrays.

    ``prompt_shape`` is the shape of one row's re-rank features (X-CLIP: the prompt generator's input,
    patches x P); a model family without re-rank features (``None``) has no ``prompt_features`` column.
    """
    fields = [
        ("id", pa.int64()),  # stable row id in the library; the FAISS index maps ids to rows
        ("uri", pa.string()),
        ("size", pa.int64()),
        ("etag", pa.string()),
        ("mtime", pa.float64()),
        ("segment", pa.int32()),
        ("start_s", pa.float64()),
        ("end_s", pa.float64()),
        ("duration_s", pa.float64()),
        ("fps", pa.float64()),
        ("frame_count", pa.int64()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("sample_error_s", pa.float64()),  # null in parts written before it was recorded
        ("thumbnail", pa.binary()),
        ("error", pa.string()),
        ("embedding", pa.list_(pa.float32(), embedding_dim)),
        ("prompt_features", pa.list_(pa.float16(), math.prod(prompt_shape or (0,)))),
        ("model_id", pa.string()),  # the model identity's tag: "<source>@<sha256[:16]>"
    ]
    return pa.schema([f for f in fields if f[0] != "prompt_features" or prompt_shape])


_ID_MASK = (1 << 63) - 1


def row_id(uri: str, segment: int) -> int:
    """Stable, non-negative 63-bit id of a (video, segment): blake2b of ``f"{uri}#{segment}"``.

    The same pair gets the same id in every run, so re-embedding a video replaces its rows in the index.
    """
    digest = hashlib.blake2b(f"{uri}#{int(segment)}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") & _ID_MASK
