"""Fixtures of the edge tests: one tiny classifier whose logits vary by text, built once for the session."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def spread_model_dir(tiny_model_dir, review_frame, tmp_path_factory):
    """The tiny model with larger random weights and a centred head (tests.helpers.spread_classifier), so that
    quantization and export have logits to disagree on; the INC and ONNX export tests share it."""
    from tests.helpers import spread_classifier

    return spread_classifier(tiny_model_dir, review_frame["text"].tolist()[:96], tmp_path_factory.mktemp("spread-model"))
