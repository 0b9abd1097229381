"""The text of a query: refused when empty or too long, flagged when the model will cut it; its folder."""

from __future__ import annotations

from ...models import VideoTextModel
from .errors import ApiError
from .options import MAX_QUERY_CHARS


def checked(text: str, name: str = "q") -> str:
    """``text`` as it is, or a 422 :class:`ApiError` naming ``name`` when it is blank or too long."""
    if not text.strip():
        raise ApiError(422, f"{name}: the query is empty")
    if len(text) > MAX_QUERY_CHARS:
        raise ApiError(
            422, f"{name}: the query has {len(text)} characters, at most {MAX_QUERY_CHARS} are taken"
        )
    return text


def checked_folder(under: str | None, name: str = "under") -> str | None:
    """``under`` as it is (``None``: the whole library), or a 422 :class:`ApiError` when it is blank."""
    if under is not None and not under.strip():
        raise ApiError(422, f"{name}: the folder is empty")
    return under


def truncated(model: VideoTextModel, text: str) -> bool:
    """Whether the model's tokenizer cuts ``text`` to its context (77 tokens for CLIP's, start and end tokens
    included; the end token stays last), so that the words past it are not searched."""
    tokenizer = model.tokenizer
    ids = tokenizer(text, padding=False, truncation=False, return_tensors=None)["input_ids"]
    return len(ids) > tokenizer.model_max_length
