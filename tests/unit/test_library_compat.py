"""A library written by an earlier release opens and answers the same queries today."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.search import Searcher

DATA = Path(__file__).parents[1] / "data"


@pytest.mark.parametrize("name", ["library-format1"])
def test_an_older_library_answers_the_same_queries(name: str) -> None:
    recorded = json.loads((DATA / f"{name}.queries.json").read_text())
    # its manifest names the bundled model where it was on the machine that wrote it: found by its hash
    searcher = Searcher.open(str(DATA / name))
    assert searcher.library.manifest["counts"] == {"videos": 7, "segments": 12, "ok": 6, "failed": 1}
    for caption, hits in recorded["hits"].items():
        found = [[Path(h.uri).name, h.segment, h.score] for h in searcher.search(caption, k=4)]
        assert [h[:2] for h in found] == [h[:2] for h in hits], caption
        assert [h[2] for h in found] == pytest.approx([h[2] for h in hits], abs=1e-5), caption
