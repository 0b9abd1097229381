"""The embed job's model, loaded only when there is something to embed.

Loading a checkpoint costs torch's import (1.5-3 s) and the hashing of its weights, most of a refresh that
finds nothing new. What the job needs before it embeds (the model's identity, frames per clip, embedding and
re-rank shapes) each version's manifest holds, with ``model_files``: a digest of the checkpoint's listing
(each file's name, size, and ETag or modification time). A job whose checkpoint lists the same takes those
facts from the library's current version and loads the model only for the videos it embeds (and checks its
identity then).
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from xclip_core.identity import ModelIdentity

from ..library import Version
from ..models import BUNDLED, VideoTextModel, default_model_source, load_model
from ..storage import StorageError, StorageOptions
from .stages.list import list_objects


def files_digest(source: str, options: StorageOptions | None = None) -> str | None:
    """SHA-256 of the listing of the checkpoint at ``source`` (:data:`~pipeline.models.BUNDLED`: this
    installation's copy): each file's path under it, size, and ETag or modification time. ``None`` when it
    cannot tell a changed file (one with neither) or cannot be listed (loading the model will say why)."""
    where = default_model_source() if source == BUNDLED else source
    try:
        listed = list_objects(where, options)
    except StorageError:
        return None
    if not listed or any(not row["etag"] and row["mtime"] is None for row in listed):
        return None
    files = [[row["uri"][len(where) :], row["size"], row["etag"], row["mtime"]] for row in listed]
    return hashlib.sha256(json.dumps(files).encode()).hexdigest()


class JobModel:
    """What the job needs of the model at ``options.model``: from the ``recorded`` version's manifest when
    the checkpoint's files are the ones it was loaded from, else from the model, loaded now (a bad checkpoint
    fails here, before any video)."""

    def __init__(self, source: str, options: StorageOptions | None, recorded: Version | None) -> None:
        self.source, self.storage = source, options
        self.files = files_digest(source, options)
        self._model: VideoTextModel | None = None
        facts = _recorded_facts(recorded.manifest if recorded else {}, source, self.files)
        if facts is None:
            model = self._model = load_model(source, options)
            facts = (model.identity, model.num_frames, model.embedding_dim, model.rerank_shape)
        self.identity, self.num_frames, self.embedding_dim, self.rerank_shape = facts

    def loaded(self) -> VideoTextModel:
        """The model, loaded on the first call; a ``ValueError`` when its weights are not the ones the library
        recorded for the same files (changed in place, their sizes and dates kept)."""
        if self._model is None:
            model = load_model(self.source, self.storage)
            if model.identity != self.identity:
                raise ValueError(
                    f"the weights at {self.source} changed without changing their files' sizes or dates "
                    f"(sha256 {model.identity.sha256[:16]}..., the library recorded "
                    f"{self.identity.sha256[:16]}... for these files): embed anew"
                )
            self._model = model
        return self._model


def _recorded_facts(
    manifest: dict[str, Any], source: str, files: str | None
) -> tuple[ModelIdentity, int, int, tuple[int, ...] | None] | None:
    """The identity, frames, embedding width and re-rank shape ``manifest`` records for the checkpoint
    ``source`` whose files' digest is ``files``; ``None`` unless it recorded the same files."""
    if files is None or manifest.get("model_files") != files:
        return None
    identity = ModelIdentity.from_dict(manifest["model"])
    if identity.source != source:
        return None
    shape = manifest.get("prompt_shape")
    return identity, int(manifest["decode"]["frames"]), int(manifest["embedding_dim"]), shape and tuple(shape)
