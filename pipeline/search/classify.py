"""``videosearch classify``: zero-shot classification of a video or of every video under a prefix.

Runs in one process (no Ray): list -> decode (the embed job's decode stage) -> classify with the model's
video-conditioned score over the labels' prompts (``xclip_core.classify``). A video that cannot be decoded
gets its error instead of labels.
"""

from __future__ import annotations

from typing import Any

from xclip_core.classify import ZeroShotClassifier, load_labels

from ..embed.stages.decode import DecodeSettings, decode_video, error_reason
from ..embed.stages.list import list_objects
from ..models import load_model
from ..storage import StorageOptions, Store


def classify_source(
    source: str, labels: str, model_src: str | None, template: str, k: int, storage: StorageOptions
) -> list[dict[str, Any]]:
    """For each video under ``source``: ``{"uri", "labels": [(label, probability)...], "error"}``."""
    model = load_model(model_src, storage)
    classifier = ZeroShotClassifier(model, model.tokenizer, template, labels=load_labels(labels))
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
