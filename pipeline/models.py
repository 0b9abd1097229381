"""The model interface the pipeline speaks to, and the one loader that picks a model family.

The embed job, search, eval, classify and training use a model only through :class:`VideoTextModel`:
a family plugs in by implementing it (``xclip_core.XCLIPModel`` does) and by a line in :data:`FAMILIES`
keyed by the ``model_type`` of its checkpoints' ``config.json``. Nothing here imports a family until
:func:`load_model` needs it.
"""

from __future__ import annotations

import importlib
import json
import os
from dataclasses import replace
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from xclip_core.identity import ModelIdentity

from .storage import StorageOptions, Store

if TYPE_CHECKING:
    import torch

    from xclip_core.tokenizer import CLIPTokenizer
    from xclip_core.video_transforms import VideoPreprocessor

#: ``model_type`` of a checkpoint's config.json -> the class that loads it (``module:Class``, with
#: ``from_pretrained(src, storage_options=...)``). A single weights file (no config.json) is X-CLIP's
#: original release.
FAMILIES = {"xclip": "xclip_core.model:XCLIPModel", "evl": "xclip_core.evl.model:EVLModel"}
SINGLE_FILE_FAMILY = "xclip"
BUNDLED = "videosearch-tiny"  # the name of the bundled default model, wherever it is installed


@runtime_checkable
class VideoTextModel(Protocol):
    """What the pipeline needs of a model family.

    ``encode_videos`` takes pixel values (B, T, 3, H, W) normalized by ``preprocessor`` and returns the video
    embeddings (B, P), not normalized, and the re-rank features (B, *rerank_shape) or ``None``;
    ``encode_texts`` returns text embeddings (N, P), not normalized. ``score(text_embeds, embeddings,
    rerank_features)`` is the family's exact score (B, N) as a cosine in [-1, 1] (X-CLIP conditions each text
    on each video); a family without one has ``rerank_shape`` ``None`` and search ranks by the plain cosine.
    """

    family: str
    identity: ModelIdentity
    tokenizer: CLIPTokenizer
    preprocessor: VideoPreprocessor
    num_frames: int
    embedding_dim: int
    rerank_shape: tuple[int, ...] | None

    def encode_videos(self, pixel_values: torch.Tensor) -> Any: ...

    def encode_texts(self, texts: str | list[str]) -> torch.Tensor: ...

    def score(
        self, text_embeds: torch.Tensor, embeddings: torch.Tensor, rerank_features: torch.Tensor
    ) -> torch.Tensor: ...

    def to(self, *args: Any, **kwargs: Any) -> Any: ...

    def parameters(self) -> Any: ...


def default_model_source() -> str:
    """The bundled default model's directory in this installation (no download)."""
    from xclip_core.default_model import default_model_dir

    return default_model_dir()


def absolute_source(src: str | None) -> str:
    """What a library records as its model's source, so that any machine can load it again: the bundled
    model by its name (:data:`BUNDLED`; its directory differs per installation), a URL as it is, a local path
    made absolute."""
    if src is None or src == BUNDLED:
        return BUNDLED
    return src if "://" in src else os.path.abspath(src)


def model_type(src: str, store: Store) -> str:
    """The family of the checkpoint at ``src``: its config.json's ``model_type``, or X-CLIP's original
    release for a single weights file."""
    if store.fs.isfile(store.path()):
        return SINGLE_FILE_FAMILY
    try:
        config = json.loads(store.read_bytes("config.json"))
    except FileNotFoundError:
        raise FileNotFoundError(
            f"model {src!r} not found: pass a checkpoint directory or URL holding config.json and its "
            "weights (e.g. a copy of microsoft/xclip-base-patch32), or an original-release .pth file"
        ) from None
    except json.JSONDecodeError as err:
        raise ValueError(f"{src}/config.json is not valid JSON: {err}") from None
    return str(config.get("model_type", SINGLE_FILE_FAMILY))


def load_model(
    src: str | None = None, options: StorageOptions | None = None, **kwargs: Any
) -> VideoTextModel:
    """The model at ``src`` (a directory, URL or single weights file; ``None`` or :data:`BUNDLED`: the bundled
    model), of the family its config.json names, in float32 on the CPU (``dtype=``/``device=`` change
    that)."""
    bundled = src in (None, BUNDLED)
    path = default_model_source() if bundled else src
    store = Store(path, options)
    cls = _family_class(model_type(path, store), f"{path}/config.json")
    model = cls.from_pretrained(path, storage_options=store.fsspec_options(), **kwargs)
    # hashed now, as loaded (float32), before anyone changes its dtype; the bundled model by its name
    model.identity = replace(model.identity, source=BUNDLED) if bundled else model.identity
    return model


def _family_class(family: str, where: str) -> Any:
    if family not in FAMILIES:
        raise ValueError(f"{where}: unknown model_type {family!r}; known: {', '.join(sorted(FAMILIES))}")
    module, name = FAMILIES[family].split(":")
    return getattr(importlib.import_module(module), name)


def new_model(config: Any) -> VideoTextModel:
    """A randomly initialized model of ``config``'s geometry and family (``config.to_dict()["model_type"]``),
    to train from scratch."""
    family = config.to_dict().get("model_type", SINGLE_FILE_FAMILY)
    return _family_class(family, "the config")(config)


def load_library_model(identity: ModelIdentity, options: StorageOptions | None = None) -> VideoTextModel:
    """The model that built a library, checked against its recorded weights hash.

    A library built with the bundled model names it :data:`BUNDLED`. One built before names the directory the
    bundled model had where it was built (another machine, a job's working directory): where that is gone
    and the hash is the bundled model's, this installation's copy serves.
    """
    try:
        model = load_model(identity.source, options)
    except FileNotFoundError:
        bundled = load_model(None)
        if bundled.identity.sha256 != identity.sha256:
            raise
        model = bundled
    if identity.sha256 and model.identity.sha256 != identity.sha256:
        raise ValueError(
            f"the weights at {identity.source} differ from those that built this library "
            f"(sha256 {identity.sha256[:16]}...): query with the library's own model"
        )
    return model
