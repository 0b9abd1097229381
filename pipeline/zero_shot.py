"""``videosearch classify``: zero-shot X-CLIP classification of a video or of every video under a prefix.

Runs in one process (no Ray): list -> decode (the embed job's decode stage) -> classify with the full X-CLIP
score. A video that cannot be decoded gets its error instead of labels.
"""

from __future__ import annotations

from typing import Any

from xclip_core import XCLIPModel
from xclip_core.classify import ZeroShotClassifier, load_labels
from xclip_core.processor import XCLIPProcessor

from .stages.decode import decode_video, error_reason
from .stages.list import list_objects
from .storage import StorageOptions, protocol_of


def classify_source(
    source: str, labels: str, model_src: str, template: str, k: int, storage: StorageOptions
) -> list[dict[str, Any]]:
    """For each video under ``source``: ``{"uri", "labels": [(label, probability)...], "error"}``."""
    options = storage.for_protocol(protocol_of(model_src))
    model = XCLIPModel.from_pretrained(model_src, storage_options=options)
    processor = XCLIPProcessor.from_pretrained(model_src, options)
    classifier = ZeroShotClassifier(model, processor.tokenizer, template, labels=load_labels(labels))
    preprocessor = processor.video_preprocessor
    frames = model.config.vision_config.num_frames
    results = []
    for row in list_objects(source, storage):
        try:
            (decoded,) = decode_video(row["uri"], frames, preprocessor, storage_options=storage)
        except Exception as err:  # noqa: BLE001 - a bad video is a result, not a crash
            results.append({"uri": row["uri"], "labels": [], "error": error_reason(err)})
            continue
        pixel_values = preprocessor.normalize(decoded["frames"]).unsqueeze(0)
        results.append({"uri": row["uri"], "labels": classifier.top_k(pixel_values, k)[0], "error": None})
    return results
