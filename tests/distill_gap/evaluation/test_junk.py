"""The fixed junk list the scope benchmark scores: every row is one `distill predict` accepts (so the scope guard,
not the parser, must keep it out), and the guard gives each a finite score on a real model."""

from __future__ import annotations

import json

import numpy as np
import pytest

from distill_gap.edge.serving import load_edge, parse_rows
from distill_gap.evaluation.junk import JUNK_ROWS


def test_every_junk_row_is_a_valid_input_row():
    rows = parse_rows([json.dumps({"id": k, "text": v}) for k, v in JUNK_ROWS.items()])
    assert [r["id"] for r in rows] == list(JUNK_ROWS)
    assert {"python", "sql", "german", "chinese", "spam", "digits", "emoji", "whitespace and zero-width",
            "one letter, 5 MB"} <= set(JUNK_ROWS)
    assert len(JUNK_ROWS["one letter, 5 MB"]) == 5 * 1024 * 1024


@pytest.mark.parametrize("detector", ["knn", "lexical"])
def test_the_guard_scores_every_junk_row(tiny_model_dir, review_frame, tmp_path, detector):
    import shutil

    from tests.conftest import LABELS
    from tests.helpers import add_scope_guard

    shutil.copytree(tiny_model_dir, tmp_path / "edge" / "fp32")
    (tmp_path / "edge" / "edge.json").write_text(json.dumps({
        "format": 1, "primary": "fp32", "labels": LABELS, "max_length": 64,
        "artifacts": {"fp32": {"path": "fp32", "runtime": "transformers"}}}))
    add_scope_guard(tmp_path / "edge", review_frame["text"].head(40).tolist(), detector=detector)
    out = load_edge(tmp_path / "edge").predict_rows([{"id": k, "text": v} for k, v in JUNK_ROWS.items()])
    assert [r["id"] for r in out] == list(JUNK_ROWS)
    assert all(np.isfinite(r["scope_score"]) and isinstance(r["in_scope"], bool) for r in out)
    assert all((r["label"] is None) == (not r["in_scope"]) for r in out)
    if detector == "lexical":  # none of these rows uses the reviews' words: the lexical guard keeps every one out
        assert [r["id"] for r in out if r["in_scope"]] == []
