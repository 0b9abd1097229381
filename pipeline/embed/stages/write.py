"""Write stage: encoded rows -> one Parquet part file per batch under ``LIBRARY/parts/``.

Part files are written with :func:`pipeline.library.schema.part_schema`; a part becomes part of the library
only when a later publish step lists it in a manifest, so a part left behind by a failed job is never read.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import pyarrow as pa

from ...library import LibraryWriter, PartInfo
from ...library.schema import part_schema, row_id
from ...storage import Store

# PartInfo's fields but its mask
PART_COLUMNS = ("path", "features", "rows", "ok", "errors", "crc32", "file_bytes", "features_crc32")
_TEXT = ("path", "features")


def rows_to_table(
    batch: Mapping[str, Any], embedding_dim: int, prompt_shape: tuple[int, int] | None
) -> pa.Table:
    """Encoded rows (a dict of columns, as the encode stage returns them) -> an Arrow table with the
    part schema. ``id`` is computed with :func:`row_id`; ``prompt_features`` (where the model has re-rank
    features) are flattened per row; other columns than the schema's are ignored. ``None`` (and NaN in
    numeric columns) becomes null."""
    schema = part_schema(embedding_dim, prompt_shape)
    missing = [f.name for f in schema if f.name != "id" and f.name not in batch]
    if missing:
        raise ValueError(f"encoded rows lack the columns {missing}")
    rows = len(batch["uri"])
    ids = [row_id(uri, segment) for uri, segment in zip(batch["uri"], batch["segment"], strict=True)]
    columns = {
        "id": pa.array(ids, pa.int64()),
        "embedding": _fixed_size_list("embedding", batch["embedding"], np.float32, embedding_dim, rows),
    }
    if prompt_shape:
        width = math.prod(prompt_shape)
        columns["prompt_features"] = _fixed_size_list(
            "prompt_features", batch["prompt_features"], np.float16, width, rows
        )
    arrays = [
        columns[f.name] if f.name in columns else pa.array(batch[f.name], f.type, from_pandas=True)
        for f in schema
    ]
    return pa.Table.from_arrays(arrays, schema=schema)


def _fixed_size_list(name: str, values: Any, dtype: type, width: int, rows: int) -> pa.Array:
    flat = np.asarray(values, dtype=dtype).reshape(-1)
    if flat.size != rows * width:
        raise ValueError(f"column {name!r}: expected {rows} rows of {width} values, got {np.shape(values)}")
    return pa.FixedSizeListArray.from_arrays(pa.array(flat), width)


class WritePart:
    """Ray Data callable: each batch of encoded rows -> one part file of the library (through
    :class:`pipeline.library.LibraryWriter`), described by a one-row batch with the :class:`PartInfo`
    columns ``path`` (relative to the library), ``features``, ``rows``, ``ok``, ``errors``, ``crc32``,
    ``file_bytes`` and ``features_crc32``. An empty batch writes nothing and returns an empty batch."""

    def __init__(self, library: str | Store, embedding_dim: int, prompt_shape: tuple[int, int] | None):
        self.writer = LibraryWriter(library, embedding_dim=embedding_dim, prompt_shape=prompt_shape)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Write the batch's rows; return the part's description."""
        if len(batch["uri"]) == 0:
            return {name: np.array([], object if name in _TEXT else np.int64) for name in PART_COLUMNS}
        table = rows_to_table(batch, self.writer.embedding_dim, self.writer.prompt_shape)
        part = self.writer.write_part(table).to_dict()
        return {name: np.array([part[name]], object if name in _TEXT else np.int64) for name in PART_COLUMNS}


def written_part(row: Mapping[str, Any]) -> PartInfo:
    """The :class:`PartInfo` of one row of :class:`WritePart`'s output."""
    return PartInfo(
        str(row["path"]),
        int(row["rows"]),
        int(row["ok"]),
        int(row["errors"]),
        crc32=int(row["crc32"]),
        file_bytes=int(row["file_bytes"]),
        features=str(row["features"]),
        features_crc32=int(row["features_crc32"]),
    )
