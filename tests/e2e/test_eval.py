"""``videosearch eval``: recall and median rank of captioned videos, zero-shot accuracy of labeled ones.

The library is built by the real embed job (local Ray) from real synthetic clips. The metrics are checked
against another path to the same scores: the ranking that ``Searcher.search`` returns (exact for a library
of at most 200 rows), text by text.
"""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline import Searcher
from pipeline.cli import main
from pipeline.embed.job import embed
from pipeline.embed.options import EmbedOptions
from pipeline.samples.synthetic import sample_scenes, write_dataset
from pipeline.search.evaluate import evaluate
from pipeline.video_table import read_video_table

CLIPS = 8


def write_table(path: Path, header: tuple[str, str], rows: list[tuple[str, str]]) -> str:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    return str(path)


@pytest.fixture(scope="module")
def library(tiny_model, tmp_path_factory) -> tuple[str, str]:
    """A library of eight captioned clips (one file in it is not a video), and its captions table."""
    clips = tmp_path_factory.mktemp("eval-clips")
    table = write_dataset(clips, sample_scenes(CLIPS, seed=5, max_shapes=2), seconds=1.0, fps=8)
    (clips / "broken.mp4").write_bytes(b"\0" * 100)
    lib = str(tmp_path_factory.mktemp("eval") / "library")
    embed(str(clips), lib, EmbedOptions(model=str(tiny_model)))
    return lib, table


def search_ranks(library: str, texts: list[str]) -> list[list[str]]:
    lib = Searcher.open(library)
    return [[hit.uri for hit in lib.search(text, k=100)] for text in texts]


def test_recall_and_median_rank_follow_the_search_ranking(library) -> None:
    lib, table = library
    captions = read_video_table(table)
    orders = search_ranks(lib, [c.text for c in captions])
    ranks = [order.index(c.uri) + 1 for c, order in zip(captions, orders, strict=True)]
    result = evaluate(lib, table)
    assert (result.task, result.videos, result.queries, result.missing) == ("retrieval", CLIPS, CLIPS, [])
    for k in (1, 5, 10):
        assert result.metrics[f"recall@{k}"] == pytest.approx(sum(r <= k for r in ranks) / CLIPS)
    assert result.metrics["median_rank"] == sorted(ranks)[(CLIPS - 1) // 2]  # the lower median, as torch's


def test_eval_reads_no_index(library, tmp_path) -> None:
    lib, table = library
    copy = shutil.copytree(lib, tmp_path / "library")
    (index,) = (copy / "index").iterdir()
    index.unlink()  # a search would fail: eval scores every video exactly, without it
    assert evaluate(str(copy), table).metrics == evaluate(lib, table).metrics


def test_labeled_table_gives_zero_shot_accuracy(library, tmp_path) -> None:
    lib, captions_table = library
    captions = read_video_table(captions_table)
    videos = [c.uri for c in captions]
    kinds = [next(k for k in ("circle", "square", "triangle") if k in c.text) for c in captions]
    table = write_table(tmp_path / "labels.csv", ("uri", "label"), list(zip(videos, kinds, strict=True)))
    labels = sorted(set(kinds))
    # a video's predicted label is the one whose prompt scores it highest in a search
    searched = Searcher.open(lib)
    scores = {
        label: {h.uri: h.score for h in searched.search(f"a clip of a {label}", k=100)} for label in labels
    }
    predicted = [max(labels, key=lambda label: scores[label][uri]) for uri in videos]

    result = evaluate(lib, table, template="a clip of a {}")
    assert result.task == "classification" and result.queries == CLIPS
    assert result.metrics["top1_accuracy"] == pytest.approx(
        sum(p == k for p, k in zip(predicted, kinds, strict=True)) / CLIPS
    )
    assert "top5_accuracy" not in result.metrics  # three labels: top-5 would always be right


def test_videos_missing_from_the_library_are_reported_and_skipped(library, tmp_path) -> None:
    lib, table = library
    rows = [(c.uri, c.text) for c in read_video_table(table)]
    extra = [(str(tmp_path / "never-embedded.mp4"), "a video nobody embedded")]
    result = evaluate(lib, write_table(tmp_path / "more.csv", ("uri", "caption"), rows + extra))
    assert result.queries == CLIPS and result.missing == [extra[0][0]]

    with pytest.raises(ValueError, match="none of the 1 videos"):
        evaluate(lib, write_table(tmp_path / "none.csv", ("uri", "caption"), extra))


def test_a_library_without_an_embedded_video_is_said_to_be_so(tiny_model, tmp_path, capsys) -> None:
    """Every object failed (published all the same, as a new library's first version is): eval says so,
    where the scorer failed to reshape an empty tensor, and query's empty answer says why."""
    (tmp_path / "videos").mkdir()
    (tmp_path / "videos" / "broken.mp4").write_bytes(b"\0" * 100)
    lib = str(tmp_path / "library")
    assert embed(str(tmp_path / "videos"), lib, EmbedOptions(model=str(tiny_model))).failed == 1
    broken = str(tmp_path / "videos" / "broken.mp4")
    table = write_table(tmp_path / "t.csv", ("uri", "caption"), [(broken, "x")])
    with pytest.raises(ValueError, match="library version 1 has no embedded video .*nothing to evaluate"):
        evaluate(lib, table)
    capsys.readouterr()
    assert main(["query", lib, "a circle"]) == 0
    out, err = capsys.readouterr()
    assert out == "" and f"no results: {lib} version 1 holds no embedded video" in err


def test_cli_eval_prints_json_metrics(library, capsys) -> None:
    lib, table = library
    assert main(["eval", lib, "--captions", table, "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["metrics"] == evaluate(lib, table).metrics


def test_tables_resolve_relative_uris_and_reject_bad_columns(tmp_path) -> None:
    table = write_table(tmp_path / "t.csv", ("uri", "label"), [("a.mp4", "dog"), ("s3://b/c.mp4", "cat")])
    rows = read_video_table(table, template="a photo of a {}")
    assert [(r.uri, r.text, r.label) for r in rows] == [
        (str(tmp_path / "a.mp4"), "a photo of a dog", "dog"),
        ("s3://b/c.mp4", "a photo of a cat", "cat"),
    ]
    parquet = tmp_path / "t.parquet"
    pq.write_table(pa.table({"uri": ["b.mp4", "b.mp4"], "caption": ["one", "two"]}), parquet)
    assert [(r.uri, r.text) for r in read_video_table(str(parquet))] == [
        (str(tmp_path / "b.mp4"), "one"),
        (str(tmp_path / "b.mp4"), "two"),
    ]
    bad = write_table(tmp_path / "bad.csv", ("path", "caption"), [("a.mp4", "x")])
    with pytest.raises(ValueError, match="needs a 'uri' column"):
        read_video_table(bad)
    empty = write_table(tmp_path / "empty.csv", ("uri", "caption"), [("a.mp4", " ")])
    with pytest.raises(ValueError, match="row 2: empty uri or caption"):
        read_video_table(empty)
    with pytest.raises(ValueError, match="must contain"):
        read_video_table(table, template="no slot")
