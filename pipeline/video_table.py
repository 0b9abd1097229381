"""Tables of described videos, the input of ``train`` and ``eval``: CSV or Parquet with ``uri,caption`` or
``uri,label`` columns.

A relative ``uri`` is relative to the table's own location, so that a directory of clips with its table can
be moved or uploaded as one (``s3://bucket/clips/captions.csv`` naming ``clip-0.mp4``). A label becomes a
text through a template (``"a video of {}"``), as in X-CLIP's class-name prompts.
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass

import pyarrow.csv as pa_csv
import pyarrow.parquet as pq
from fsspec.core import split_protocol

from xclip_core.label_prompts import DEFAULT_TEMPLATE, check_template

from .storage import StorageOptions, Store, join


@dataclass(frozen=True)
class DescribedVideo:
    uri: str  # absolute, with the table's scheme
    text: str  # the caption, or the label's prompt
    label: str | None = None  # set for a labeled table


def _resolve(uri: str, table_uri: str) -> str:
    if split_protocol(uri)[0] or os.path.isabs(uri):
        return uri
    base = table_uri.rsplit("/", 1)[0] if "/" in table_uri else "."
    resolved = join(base, uri)
    return resolved if split_protocol(resolved)[0] else os.path.abspath(resolved)


def read_video_table(
    table_uri: str, storage: StorageOptions | None = None, template: str = DEFAULT_TEMPLATE
) -> list[DescribedVideo]:
    """The rows of a ``uri,caption`` or ``uri,label`` table (``.parquet``, else CSV with a header)."""
    check_template(template)
    data = Store(table_uri, storage).read_bytes()
    table = (  # in this thread, as a library's parts are read (pipeline.library.reader.read_part)
        pq.read_table(io.BytesIO(data), use_threads=False)
        if table_uri.endswith(".parquet")
        else pa_csv.read_csv(io.BytesIO(data), pa_csv.ReadOptions(use_threads=False))
    )
    columns = set(table.column_names)
    if "uri" not in columns or not columns & {"caption", "label"}:
        raise ValueError(
            f"{table_uri} needs a 'uri' column and a 'caption' or 'label' column; it has {table.column_names}"
        )
    labeled = "caption" not in columns
    rows = []
    for number, row in enumerate(table.select(["uri", "label" if labeled else "caption"]).to_pylist(), 2):
        uri, text = row["uri"], row["label" if labeled else "caption"]
        if not uri or text is None or not str(text).strip():
            raise ValueError(f"{table_uri}, row {number}: empty uri or {'label' if labeled else 'caption'}")
        text = str(text).strip()
        uri = _resolve(str(uri), table_uri)
        rows.append(
            DescribedVideo(uri, template.format(text), text) if labeled else DescribedVideo(uri, text)
        )
    if not rows:
        raise ValueError(f"{table_uri} has no rows")
    return rows
