"""``videosearch classify``: classification of a video or of every video under a prefix.

Runs in one process (no Ray): list -> decode (the embed job's decode stage) -> classify: zero-shot with the
model's video-conditioned score over the labels' prompts (X-CLIP), or with a trained classifier's own head
(an EVL model with classes; ``xclip_core.classify``). A video that cannot be decoded gets its error instead
of labels.
"""

from __future__ import annotations

from typing import Any

from xclip_core.classify import TrainedClassifier, ZeroShotClassifier, load_labels

from ..embed.stages.decode import DecodeSettings, decode_video, error_reason
from ..embed.stages.list import list_objects
from ..models import load_model
from ..storage import StorageOptions, Store

DEFAULT_LABELS = "kinetics400"  # the zero-shot label set when none is given


def classify_source(
    source: str, labels: str | None, model_src: str | None, template: str, k: int, storage: StorageOptions
) -> list[dict[str, Any]]:
    """For each video under ``source``: ``{"uri", "labels": [(label, probability)...], "error"}``.

    ``labels``: a label set or file (:func:`load_labels`); ``None``: a trained classifier's own class names,
    else Kinetics-400."""
    model = load_model(model_src, storage)
    classes = getattr(model.config, "num_classes", 0)  # a trained head's classes (EVL); X-CLIP has none
    if classes:
        names = (
            load_labels(labels, Store(labels, storage).fsspec_options()) if labels else model.config.labels
        )
        if names is None:
            raise ValueError(f"the model {model_src} does not name its {classes} classes: pass --labels FILE")
        classifier = TrainedClassifier(model, names, classes)
    else:
        names = load_labels(
            labels or DEFAULT_LABELS, Store(labels or DEFAULT_LABELS, storage).fsspec_options()
        )
        classifier = ZeroShotClassifier(model, model.tokenizer, template, labels=names)
    settings = DecodeSettings(model.num_frames, model.preprocessor)
    results = []
    for row in list_objects(Store(source, storage)):
        try:
            (decoded,) = decode_video(Store(row["uri"], storage), settings)
        except Exception as err:  # noqa: BLE001 - a bad video is a result, not a crash
            results.append({"uri": row["uri"], "labels": [], "error": error_reason(err, row["uri"], storage)})
            continue
        pixel_values = model.preprocessor.normalize(decoded["frames"]).unsqueeze(0)
        results.append({"uri": row["uri"], "labels": classifier.top_k(pixel_values, k)[0], "error": None})
    return results
