"""Zero-shot action recognition with X-CLIP: label sets, a cached-text classifier and a one-call helper.

::

    labels = load_labels("kinetics400")
    classifier = ZeroShotClassifier(model, processor.tokenizer, labels=labels)
    probs = classifier(pixel_values)          # (B, 400), each row sums to 1
    classifier.top_k(pixel_values, k=5)       # [[("abseiling", 0.91), ...], ...]

Scores are the full X-CLIP logits (:meth:`XCLIPModel.logits`): each label's text embedding is conditioned on
each video by the video-specific prompt generator before the cosine similarity, as in the paper.
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import fsspec
import numpy as np
import torch

from .label_prompts import DEFAULT_TEMPLATE, check_template
from .model import XCLIPModel
from .tokenizer import CLIPTokenizer

LABELS_DIR = Path(__file__).resolve().parent / "data" / "labels"
BUNDLED_LABEL_SETS = ("kinetics400", "kinetics600", "ucf101", "hmdb51")
LabelSet = Sequence[str] | str | os.PathLike  # class names, or a label set name / path for load_labels


# --------------------------------------------------------------------------------------------- label sets
def load_labels(name_or_path: str | os.PathLike, storage_options: dict[str, Any] | None = None) -> list[str]:
    """Class names in class-index order.

    ``name_or_path`` is a bundled label set (``"kinetics400"``, ``"kinetics600"``, ``"ucf101"``,
    ``"hmdb51"``: the label texts of the original X-CLIP code) or a local path / fsspec URL of a text
    file (one label per line; blank lines and lines starting with ``#`` are ignored), a ``.csv`` file with a
    ``name`` column (rows in class-index order, as X-CLIP's ``labels/*.csv``), or a ``.json`` file: a list, or
    a class-index -> name mapping (``{"0": "abseiling", ...}``, the format of the Kinetics-400 mapping that
    ships with EVL's release).

    Raises ``ValueError`` for an unknown label set name, an empty file, a CSV without a ``name`` column or
    duplicate labels, and ``FileNotFoundError`` for a missing file.
    """
    name = os.fspath(name_or_path)
    if name in BUNDLED_LABEL_SETS:
        return _parse_labels((LABELS_DIR / f"{name}.txt").read_text(encoding="utf-8"), name, "txt")
    try:
        with fsspec.open(name, "rb", **(storage_options or {})) as f:
            data = f.read()
    except FileNotFoundError:
        if not any(sep in name for sep in ("/", "\\", ".", ":")):  # a bare word: a mistyped set name
            raise ValueError(
                f"unknown label set {name!r}: known label sets are {', '.join(BUNDLED_LABEL_SETS)} "
                "(or pass the path or URL of a label file)"
            ) from None
        raise FileNotFoundError(f"label file {name!r} not found") from None
    suffix = name.lower().rsplit("?", 1)[0].rsplit(".", 1)[-1]
    return _parse_labels(data.decode("utf-8-sig"), name, suffix)


def _parse_labels(text: str, source: str, suffix: str) -> list[str]:
    if suffix == "json":
        labels = _json_labels(text, source)
    elif suffix == "csv":
        reader = csv.DictReader(io.StringIO(text))
        if "name" not in (reader.fieldnames or []):
            raise ValueError(f"{source}: a label CSV needs a 'name' column, found {reader.fieldnames}")
        labels = [(row["name"] or "").strip() for row in reader]
        if "" in labels:
            raise ValueError(f"{source}: row {labels.index('') + 1} has an empty name")
    else:
        lines = (line.strip() for line in text.splitlines())
        labels = [line for line in lines if line and not line.startswith("#")]
    if not labels:
        raise ValueError(f"{source}: no labels in the file")
    return _check_unique(labels, source)


def _json_labels(text: str, source: str) -> list[str]:
    """A JSON list of names, or a mapping of class indices 0..N-1 (as strings) to names."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"{source}: not valid JSON: {err}") from None
    if isinstance(data, dict):
        try:
            indexed = {int(key): value for key, value in data.items()}
        except ValueError:
            raise ValueError(f'{source}: a label mapping\'s keys are class indices ("0", "1"...)') from None
        if sorted(indexed) != list(range(len(indexed))):
            raise ValueError(f"{source}: the class indices are not 0..{len(indexed) - 1}")
        data = [indexed[i] for i in range(len(indexed))]
    if not isinstance(data, list) or not all(isinstance(label, str) and label.strip() for label in data):
        raise ValueError(f"{source}: expected a list of names or an index -> name mapping")
    return [label.strip() for label in data]


def _check_unique(labels: list[str], source: str) -> list[str]:
    duplicates = sorted(label for label, count in Counter(labels).items() if count > 1)
    if duplicates:
        raise ValueError(f"{source}: duplicate labels {duplicates}")
    return labels


# --------------------------------------------------------------------------------------------- classifier
class ZeroShotClassifier:
    """Zero-shot video classification over a label set with the full X-CLIP score.

    Each label becomes the prompt ``template.format(label)`` (the original X-CLIP code uses ``"{}"``, the
    bare label). Text embeddings are computed once per label set, in batches of ``batch_size``, and cached
    (keyed by the tuple of labels). Everything runs under ``torch.inference_mode()`` on the model's device
    and in its dtype; probabilities come back as float32.

    Args:
        model: an :class:`~xclip_core.XCLIPModel` (put it in eval mode and on its device first).
        tokenizer: the model's :class:`~xclip_core.tokenizer.CLIPTokenizer`.
        template: prompt template with one ``{}``.
        labels: the default label set (class names, or a name/path for :func:`load_labels`); without it,
            every call must pass ``labels``.
        batch_size: prompts per text-encoder batch.
    """

    def __init__(
        self,
        model: XCLIPModel,
        tokenizer: CLIPTokenizer,
        template: str = DEFAULT_TEMPLATE,
        *,
        labels: LabelSet | None = None,
        batch_size: int = 256,
    ):
        self.model = model
        self.tokenizer = tokenizer
        self.template = check_template(template)
        self.batch_size = batch_size
        self.labels = None if labels is None else self._labels(labels)
        self._cache: dict[tuple[str, ...], torch.Tensor] = {}

    def _labels(self, labels: LabelSet | None) -> list[str]:
        if labels is None:
            if self.labels is None:
                raise ValueError("no labels: pass labels here or to ZeroShotClassifier(labels=...)")
            return self.labels
        if isinstance(labels, str | os.PathLike):
            return load_labels(labels)
        labels = list(labels)
        if not labels or not all(isinstance(label, str) for label in labels):
            raise ValueError("labels must be a non-empty sequence of strings (or a label set name / path)")
        return _check_unique(labels, "labels")

    @property
    def _param(self) -> torch.Tensor:
        return next(self.model.parameters())

    @torch.inference_mode()
    def text_embeddings(self, labels: LabelSet | None = None) -> torch.Tensor:
        """Unnormalized text embeddings ``(num_labels, P)`` of the prompts, computed once per label set."""
        labels = self._labels(labels)
        key = tuple(labels)
        if key not in self._cache:
            prompts = [self.template.format(label) for label in labels]
            chunks = []
            for start in range(0, len(prompts), self.batch_size):
                chunk = prompts[start : start + self.batch_size]
                tokens = self.model.tokenize(self.tokenizer, chunk, padding="max_length")
                chunks.append(self.model.get_text_features(tokens["input_ids"], tokens["attention_mask"]))
            self._cache[key] = torch.cat(chunks)
        return self._cache[key]

    @torch.inference_mode()
    def __call__(self, pixel_values: torch.Tensor, labels: LabelSet | None = None) -> torch.Tensor:
        """Label probabilities ``(B, num_labels)`` (float32, rows sum to 1) for ``pixel_values``
        ``(B, T, 3, H, W)``; ``labels`` overrides the default label set."""
        text = self.text_embeddings(labels)
        param = self._param
        videos = self.model.encode_videos(pixel_values.to(device=param.device, dtype=param.dtype))
        text = text.to(device=param.device, dtype=param.dtype)
        logits = self.model.logits(videos.video_embeds, videos.prompt_features, text)
        return logits.softmax(dim=-1, dtype=torch.float32)

    def top_k(
        self, pixel_values: torch.Tensor, k: int = 5, labels: LabelSet | None = None
    ) -> list[list[tuple[str, float]]]:
        """The ``k`` most probable ``(label, probability)`` pairs of each video, most probable first."""
        names = self._labels(labels)
        probs, indices = self(pixel_values, names).topk(min(k, len(names)), dim=-1)
        return [
            [(names[i], p) for i, p in zip(row_i, row_p, strict=True)]
            for row_i, row_p in zip(indices.tolist(), probs.tolist(), strict=True)
        ]


class TrainedClassifier:
    """Classification by a model's own trained head (EVL's): ``model(pixel_values)`` gives the logits of its
    ``num_classes`` classes, named by ``labels`` in class-index order. The same ``top_k`` as
    :class:`ZeroShotClassifier`."""

    def __init__(self, model: torch.nn.Module, labels: Sequence[str], num_classes: int):
        if len(labels) != num_classes:
            raise ValueError(f"{len(labels)} labels for a classifier of {num_classes} classes")
        self.model = model
        self.labels = _check_unique(list(labels), "labels")

    @torch.inference_mode()
    def top_k(self, pixel_values: torch.Tensor, k: int = 5) -> list[list[tuple[str, float]]]:
        """The ``k`` most probable ``(label, probability)`` pairs of each video, most probable first."""
        param = next(self.model.parameters())
        logits = self.model(pixel_values.to(device=param.device, dtype=param.dtype))
        probs, indices = logits.softmax(dim=-1, dtype=torch.float32).topk(min(k, len(self.labels)), dim=-1)
        return [
            [(self.labels[i], p) for i, p in zip(row_i, row_p, strict=True)]
            for row_i, row_p in zip(indices.tolist(), probs.tolist(), strict=True)
        ]


def classify(
    model: XCLIPModel,
    processor: Any,
    videos: Any,
    labels: LabelSet,
    template: str = DEFAULT_TEMPLATE,
) -> list[dict[str, float]]:
    """Zero-shot classify videos in one call; for repeated calls keep a :class:`ZeroShotClassifier`.

    Args:
        model: an :class:`~xclip_core.XCLIPModel`.
        processor: an :class:`~xclip_core.processor.XCLIPProcessor` (its tokenizer and video preprocessor).
        videos: one uint8 ``(T, H, W, 3)`` video or a list of them, ``T`` being the model's frame count
            (already sampled), or float ``pixel_values`` ``(B, T, 3, H, W)`` already preprocessed.
        labels: class names, or a label set name / path for :func:`load_labels`.
        template: prompt template with one ``{}``.

    Returns:
        One ``{label: probability}`` dict per video, most probable label first.
    """
    classifier = ZeroShotClassifier(model, processor.tokenizer, template, labels=labels)
    if not _is_pixel_values(videos):
        videos = processor(videos=videos, return_tensors="pt")["pixel_values"]
    probs = classifier(torch.as_tensor(videos))
    order = probs.argsort(dim=-1, descending=True).tolist()
    return [
        {classifier.labels[i]: row[i] for i in idx} for idx, row in zip(order, probs.tolist(), strict=True)
    ]


def _is_pixel_values(videos: Any) -> bool:
    """True for an already-preprocessed float ``(B, T, 3, H, W)`` tensor or array."""
    if isinstance(videos, torch.Tensor):
        return videos.is_floating_point() and videos.ndim == 5
    if isinstance(videos, np.ndarray):
        return np.issubdtype(videos.dtype, np.floating) and videos.ndim == 5
    return False
