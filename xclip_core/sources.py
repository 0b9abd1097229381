"""Where model files come from: a local directory or any fsspec URL (``s3://``, ``file://``, ``hf://``...).

Every loader in ``xclip_core`` (weights, config, tokenizer, preprocessor) goes through ``ModelSource`` so
that a checkpoint directory on object storage works exactly like one on disk.
"""

from __future__ import annotations

import json
import os
from typing import Any

import fsspec


class ModelSource:
    """A directory of model files addressed by a local path or an fsspec URL."""

    def __init__(self, src: str | os.PathLike, storage_options: dict[str, Any] | None = None):
        self.uri = os.fspath(src)
        self.fs, self.root = fsspec.core.url_to_fs(self.uri, **(storage_options or {}))
        self.root = self.root.rstrip("/")

    def path(self, name: str) -> str:
        return f"{self.root}/{name}" if name else self.root

    def exists(self, name: str) -> bool:
        return self.fs.exists(self.path(name))

    def is_file(self) -> bool:
        """True when the source itself is a single file (e.g. an original-release ``.pth``)."""
        return self.fs.isfile(self.root)

    def read_bytes(self, name: str = "") -> bytes:
        path = self.path(name)
        try:
            return self.fs.cat_file(path)
        except FileNotFoundError:
            raise FileNotFoundError(f"{self.uri}: no file {name!r} (looked for {path})") from None

    def read_json(self, name: str) -> dict[str, Any]:
        try:
            return json.loads(self.read_bytes(name))
        except json.JSONDecodeError as err:
            raise ValueError(f"{self.uri}/{name} is not valid JSON: {err}") from None

    def first_existing(self, *names: str) -> str | None:
        return next((name for name in names if self.exists(name)), None)
