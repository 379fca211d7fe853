"""Fixtures of the edge tests: one tiny classifier whose logits vary by text, and an ONNX edge folder made from it
(the lean runtime's and streaming tests'), each built once for the session."""

from __future__ import annotations

import pytest

LEAN_MAX_LENGTH = 64  # the ONNX edge folder's window: most reviews are longer


@pytest.fixture(scope="session")
def spread_model_dir(tiny_model_dir, review_frame, tmp_path_factory):
    """The tiny model with larger random weights and a centred head (tests.helpers.spread_classifier), so that
    quantization and export have logits to disagree on; the INC and ONNX export tests share it."""
    from tests.helpers import spread_classifier

    return spread_classifier(tiny_model_dir, review_frame["text"].tolist()[:96], tmp_path_factory.mktemp("spread-model"))


@pytest.fixture(scope="session")
def lean_edge_dir(spread_model_dir, review_frame, tmp_path_factory):
    """An edge folder as quantize + evaluate write it for the demo: onnx-int8 (primary) and onnx, the kNN guard
    fitted on the primary's own features."""
    import json

    from distill_gap.edge.onnx_export import export_onnx, quantize_onnx_int8
    from tests.conftest import LABELS
    from tests.helpers import add_scope_guard

    reviews = review_frame["text"].tolist()
    edge = tmp_path_factory.mktemp("lean-edge") / "edge"
    export_onnx(spread_model_dir, edge / "onnx", heldout_texts=reviews[:8], max_length=LEAN_MAX_LENGTH)
    quantize_onnx_int8(edge / "onnx", edge / "onnx-int8", heldout_texts=reviews[:8], max_length=LEAN_MAX_LENGTH)
    (edge / "edge.json").write_text(json.dumps({
        "format": 1, "primary": "onnx-int8", "labels": LABELS, "max_length": LEAN_MAX_LENGTH, "quantized": True,
        "artifacts": {"onnx-int8": {"path": "onnx-int8", "runtime": "onnxruntime", "ok": True, "check": "agrees"},
                      "onnx": {"path": "onnx", "runtime": "onnxruntime", "ok": True, "check": "agrees"}}}, indent=2))
    add_scope_guard(edge, reviews[40:120])
    return edge
