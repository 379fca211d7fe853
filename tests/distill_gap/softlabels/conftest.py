"""Fixtures of the soft-label library tests: the sharp tiny teacher, its review rows, and the stores."""

from __future__ import annotations

import numpy as np
import pytest

from distill_gap.digest import model_digest, sha256_json, tokenizer_digest
from tests.conftest import LABELS
from tests.helpers import sharpened_teacher

N = 96             # rows of review_frame labelled per test: three shards of 32, and fast


@pytest.fixture(scope="package")
def rows(review_frame):
    return review_frame.head(N)


@pytest.fixture(scope="package")
def sharp_teacher_dir(tiny_model_dir, rows, tmp_path_factory):
    """The tiny teacher with logits that differ ~1 from text to text (tests.helpers.sharpened_teacher)."""
    return sharpened_teacher(tiny_model_dir, rows["text"].tolist(), tmp_path_factory.mktemp("sharp-teacher"))


@pytest.fixture(scope="package")
def teacher(sharp_teacher_dir, rows):
    """Arguments for ensure_soft_labels: the teacher, its digests, the review rows."""
    return dict(teacher_dir=sharp_teacher_dir, teacher_digest=model_digest(sharp_teacher_dir),
                tokenizer_digest=tokenizer_digest(sharp_teacher_dir),
                data_digest=sha256_json(rows[["id", "text", "label"]].values.tolist()),
                ids=rows["id"].tolist(), texts=rows["text"].tolist(), labels=list(LABELS),
                max_length=64, batch_size=16, shard_size=32, teacher_meta={"name": "tiny", "version": "1"})


@pytest.fixture(scope="package")
def reference_logits(sharp_teacher_dir, rows):
    """Per-example fp32 logits, one unpadded forward pass per text, in frame order."""
    import torch

    from distill_gap.models.loading import load_classifier

    model, tok = load_classifier(sharp_teacher_dir)
    model.eval()
    with torch.inference_mode():
        rows = [model(**tok(t, truncation=True, max_length=64, return_tensors="pt")).logits[0].numpy()
                for t in rows["text"]]
    return np.stack(rows)


@pytest.fixture(params=["file", "s3"])
def store_uri(request, tmp_path):
    """A store on a folder, and one on a moto S3 bucket (loopback)."""
    if request.param == "file":
        return f"file://{tmp_path}/store"
    bucket = request.getfixturevalue("s3_bucket")
    return f"s3://{bucket}/soft-labels/v1"
