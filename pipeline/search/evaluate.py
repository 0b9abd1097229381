"""``videosearch eval``: how well a library's model finds described videos, by the model's exact score.

A captioned table (``uri,caption``) measures text -> video retrieval: each caption ranks every video of the
library, and recall@k is the share of captions whose video is among the first k (median rank beside it).
A labeled table (``uri,label``) measures zero-shot classification: each listed video's best label among the
table's labels, each prompted through a template. A video embedded in segments scores as its best segment.
Scores are exact (every video against every text), not the FAISS candidates of a search: the index is
never read.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import pyarrow.compute as pc
import torch

from ..library import Library
from ..models import load_library_model
from ..storage import StorageOptions
from ..video_table import DEFAULT_TEMPLATE, DescribedVideo, read_video_table
from .scorer import ExactScorer, StoredVideos

RECALL_AT = (1, 5, 10)
TEXTS_PER_CHUNK = 64  # texts encoded at once


@dataclass
class Evaluation:
    task: str  # "retrieval" or "classification"
    videos: int  # library videos scored
    queries: int  # captions (retrieval) or labeled videos (classification) evaluated
    metrics: dict[str, float]
    missing: list[str] = field(default_factory=list)  # table videos absent from the library or failed

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def text(self) -> str:
        what = "captions" if self.task == "retrieval" else "labeled videos"
        lines = [f"{self.task}: {self.queries} {what} against {self.videos} videos"]
        lines += [f"  {name:<14} {value:.4f}" for name, value in self.metrics.items()]
        if self.missing:
            lines.append(f"  skipped {len(self.missing)} table videos not embedded in the library")
        return "\n".join(lines)


class _VideoScores:
    """Every library video against any texts: (videos, texts) exact scores, best segment per video."""

    def __init__(self, library: Library):
        # the model alone: scores are exact, so neither the index nor the row lookup is read
        self.scorer = ExactScorer(load_library_model(library.model, library.options))
        columns = ["uri", "error", "embedding"] + (["prompt_features"] if library.rerank_shape else [])
        table = library.table(columns)
        table = table.filter(pc.is_null(table["error"]))
        if not table.num_rows:
            raise ValueError(
                f"{library.uri} version {library.version} has no embedded video (every row is an error "
                "row): nothing to evaluate"
            )
        self.uris = sorted(set(table["uri"].to_pylist()))
        self.position = {uri: i for i, uri in enumerate(self.uris)}
        self.row_video = torch.tensor([self.position[uri] for uri in table["uri"].to_pylist()])
        self.videos = StoredVideos.from_table(table, library.rerank_shape)

    @torch.inference_mode()
    def __call__(self, texts: list[str]) -> torch.Tensor:
        scores = torch.full((len(self.uris), len(texts)), -torch.inf)
        for t in range(0, len(texts), TEXTS_PER_CHUNK):
            rows = self.scorer(self.scorer.text_embeddings(texts[t : t + TEXTS_PER_CHUNK]), self.videos)
            videos = self.row_video[:, None].expand_as(rows)
            scores[:, t : t + TEXTS_PER_CHUNK].scatter_reduce_(0, videos, rows, reduce="amax")
        return scores


def evaluate(
    library: str,
    table: str,
    storage: StorageOptions | None = None,
    template: str = DEFAULT_TEMPLATE,
) -> Evaluation:
    """Retrieval metrics for a captioned table, zero-shot accuracy for a labeled one."""
    described = read_video_table(table, storage, template)
    scores = _VideoScores(Library.open(library, storage))
    known = scores.position
    missing = sorted({d.uri for d in described} - known.keys())
    present = [d for d in described if d.uri in known]
    if not present:
        raise ValueError(
            f"none of the {len(described)} videos of {table} is embedded in {library} "
            f"(e.g. {described[0].uri}); eval needs the table's uris as the library lists them"
        )
    if present[0].label is None:
        return _retrieval(scores, present, missing)
    return _classification(scores, present, missing)


def _retrieval(scores: _VideoScores, captions: list[DescribedVideo], missing: list[str]) -> Evaluation:
    matrix = scores([c.text for c in captions])  # (videos, captions)
    target = torch.tensor([scores.position[c.uri] for c in captions])
    own = matrix[target, torch.arange(len(captions))]
    ranks = (matrix > own).sum(0) + 1  # 1 = the caption's video is first
    metrics = {f"recall@{k}": (ranks <= k).float().mean().item() for k in RECALL_AT}
    metrics["median_rank"] = ranks.float().median().item()
    return Evaluation("retrieval", len(scores.uris), len(captions), metrics, missing)


def _classification(scores: _VideoScores, labeled: list[DescribedVideo], missing: list[str]) -> Evaluation:
    prompts = {d.label: d.text for d in labeled}
    labels = sorted(prompts)
    matrix = scores([prompts[label] for label in labels])  # (videos, labels)
    rows = torch.tensor([scores.position[d.uri] for d in labeled])
    truth = torch.tensor([labels.index(d.label) for d in labeled])
    own = matrix[rows, truth]
    ranks = (matrix[rows] > own[:, None]).sum(1) + 1
    metrics = {"top1_accuracy": (ranks <= 1).float().mean().item()}
    if len(labels) > 5:
        metrics["top5_accuracy"] = (ranks <= 5).float().mean().item()
    return Evaluation("classification", len(scores.uris), len(labeled), metrics, missing)
