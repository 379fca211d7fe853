"""Runs tests/distill_gap/test_cuda.py on a GPU image that has torch and transformers but not this project's stack
(no mlflow or prefect, which tests/conftest.py and tests/distill_gap/conftest.py import). A pytest plugin with the
two session fixtures the CUDA tests need: tests/conftest.py's own tiny_model_dir (that module imports the stack only
inside its fixtures), on a review_frame of the same rows exported beforehand:

    .venv/bin/python -m tests.cuda_plugin .gpu                  # here: .gpu/reviews.jsonl (the 240 review rows)
    # there (the device), with transformers 4.57.6, tokenizers and huggingface-hub wheels installed to /tmp/site:
    PYTHONPATH=/tmp/site:. CUDA_PLUGIN_ROWS=.gpu/reviews.jsonl HF_HUB_OFFLINE=1 python3 -m pytest \
        tests/distill_gap/test_cuda.py --noconftest -p tests.cuda_plugin -o addopts="" -q -rs

The three tests that build the loss through tasks.distill skip there (they need prefect); the suite's own run
of this file (make test) skips every test where torch sees no CUDA device.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from tests.conftest import tiny_model_dir  # noqa: F401 - the fixture, registered by this plugin


@pytest.fixture(scope="session")
def review_frame():
    import pandas as pd

    return pd.read_json(os.environ["CUDA_PLUGIN_ROWS"], lines=True, dtype={"id": str})


if __name__ == "__main__":  # export the rows tests/conftest.py's review_frame reads, for a machine without the data
    from tests.conftest import review_frame as _fixture

    out = Path(sys.argv[1]) / "reviews.jsonl"
    out.parent.mkdir(parents=True, exist_ok=True)
    _fixture.__wrapped__().to_json(out, orient="records", lines=True)
    print(f"wrote {out}")
