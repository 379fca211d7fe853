"""Test helpers shared by several test modules (plain functions; fixtures live in conftest.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

# Quality gates opened, for tests about wiring, stores and faults rather than model quality. A tiny model trained
# on 120 rows moves with the CPU's float kernels, so a gate near its threshold flips between machines: CI once
# failed the tiny pipeline on an OOD AUROC drop of 0.038 against 0.030, and one flipped validation row of 64 is
# beyond the INC tolerance of 1%. The gates themselves are tested in tests/distill_gap/evaluation/test_gates.py
# and, failing inside a pipeline run, in tests/reliability/test_gate_rollback.py.
OPEN_GATES = {"max_edge_drop": 1.0, "min_edge_agreement": 0.0, "max_ece": 1.0, "max_ood_auroc_drop": 1.0,
              "max_flip_rate_increase": 1.0,
              "margins": {"aggregate": 1.0, "critical_slice": 1.0, "class_recall": 1.0, "teacher_vs_majority": 1.0}}
OPEN_TOLERABLE_LOSS = 0.5  # quantize.tolerable_loss: the first INC candidate is accepted
OPEN_GATE_OVERRIDES = [*(f"evaluate.{k}={v}" for k, v in OPEN_GATES.items() if k != "margins"),
                       *(f"evaluate.margins.{k}={v}" for k, v in OPEN_GATES["margins"].items()),
                       f"quantize.tolerable_loss={OPEN_TOLERABLE_LOSS}"]
# The edge model of tests about wiring, stores, faults and triggers: ONNX Runtime INT8 only, no INC (torch.export and
# INC's convert cost ~6 CPU-s of a ~30 CPU-s `distill run` subprocess on the tiny config, measured) and no fp32 ONNX
# copy. INC INT8 is built by tests/flows/test_pipeline.py's first run, tests/tasks/test_quantize.py and
# tests/distill_gap/edge/test_inc_quantization.py.
ONNX_INT8_ONLY = {"inc": False, "onnx": False, "onnx_int8": True}
ONNX_INT8_ONLY_OVERRIDES = [f"quantize.{k}={str(v).lower()}" for k, v in ONNX_INT8_ONLY.items()]


def sharpened_teacher(model_dir, texts: Sequence[str], out_dir) -> Path:
    """A copy of a tiny classifier whose head is rescaled so that logits spread ~1 across `texts`.

    Untrained, its logits differ by ~1e-5 from text to text: too little for a test to notice a
    row put in the wrong place. Only the head changes; it stays a real BERT classifier.
    """
    import torch

    from distill_gap.models.loading import load_classifier, save_classifier

    model, tok = load_classifier(model_dir)
    model.eval()
    with torch.no_grad():
        batch = tok(list(texts), padding=True, truncation=True, max_length=64, return_tensors="pt")
        pooled = model.bert(**batch).pooler_output                          # (N, H)
        head = model.classifier
        head.weight.div_((pooled @ head.weight.T).std(0).mean())            # (C, H)
        head.bias.copy_(-(pooled.mean(0) @ head.weight.T))                  # centre the logits on 0
    return save_classifier(model, tok, out_dir)


def spread_classifier(model_dir, texts: Sequence[str], out_dir, *, max_length: int = 64) -> Path:
    """A copy of a tiny classifier with larger random weights and a centred head, so logits vary by text and class.

    Untrained at init scale, every text gets nearly the same logits and any parity check would pass.
    """
    import torch

    from distill_gap.inference.batching import predict_logits
    from distill_gap.models.loading import load_classifier, save_classifier

    model, tokenizer = load_classifier(model_dir)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.2)
        model.classifier.weight.normal_(0.0, 1.0)
        mean = predict_logits(model, tokenizer, list(texts), max_length=max_length).mean(0)
        model.classifier.bias -= torch.from_numpy(mean)
    return save_classifier(model, tokenizer, out_dir)


def wait_http(url: str, proc, log: Path, timeout: float) -> None:
    """Wait until `url` answers 200; fail early, with the end of its log, when the server process exits."""
    import time
    import urllib.request

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"{proc.args[:3]} exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise AssertionError(f"{url} did not answer within {timeout} s:\n{log.read_text()[-3000:]}")


def task_runs(flow_run_id, timeout: float = 15) -> list:
    """A flow run's task runs as the Prefect API holds them, once each has a final state. The server records task runs
    from the events their engines send, so just after the flow returns a task run can still lack its state or its
    last attempt (seen in a whole-suite run: `state` None); read again until none does, for at most `timeout` s."""
    import time

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    deadline = time.monotonic() + timeout
    with get_client(sync_client=True) as client:
        while True:
            runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
            if all(r.state is not None and r.state.is_final() for r in runs) or time.monotonic() > deadline:
                return runs
            time.sleep(0.2)


def drain_prefect_services(timeout: float = 30) -> None:
    """Deliver what this process's Prefect client services still hold (events, API logs, concurrency-slot
    clients), then stop them. Each is bound to the API it was started against, and a pytest worker runs many
    modules: one left running after its module's own server stopped would fail the events and the promotion lock of
    every later module on that worker (the slot client), and hang the next harness drain (the events)."""
    from prefect._internal.concurrency.services import _QueueServiceBase

    _QueueServiceBase.drain_all(timeout=timeout)  # one registry of instances for every service class


def import_tiny_teacher(config, model_dir) -> dict:
    """Register `model_dir` as the config's pinned teacher (`distill teacher import`, in this process): seconds,
    where `distill teacher bootstrap` trains one for ~30 s. For tests about faults, not about teacher quality."""
    from flows.config import load_config
    from distill_gap.kd.teacher import import_teacher

    cfg = config if hasattr(config, "teacher_model_name") else load_config(config)  # a PipelineConfig or a path
    return import_teacher(cfg, model_dir, license="apache-2.0", log=lambda *_: None)


def data_overrides(data: dict) -> list[str]:
    """`--set data.KEY=VALUE` overrides for a `data` config section (values as JSON, which YAML reads)."""
    import json

    return [f"data.{key}={json.dumps(value)}" for key, value in data.items()]


def fresh_mlflow_db(template: Path, folder: Path) -> str:
    """A new MLflow SQLite store in `folder`, copied from the session's migrated empty database (conftest's
    mlflow_db_template); returns its tracking URI."""
    import shutil

    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(template, folder / "mlflow.db")
    return f"sqlite:///{folder}/mlflow.db"


def drill_workspace(tmp: Path, name: str, model_dir, *, data: dict, mlflow_db: Path) -> dict:
    """A workspace for `distill run` subprocesses on the embedded defaults: configs/tiny.yaml trimmed for speed
    (its 64-row splits read from CSV files (conftest's tiny_data), 4 shards of 16, ONNX Runtime INT8 only (no INC),
    no bootstrap or stress suites, gates open: these tests are about faults, not quality), its own PREFECT_HOME,
    MLflow SQLite store (a copy of the migrated `mlflow_db` template), soft-label folder and keys, and a pinned
    teacher. Returns {"tmp", "config", "env"}."""
    import os

    import yaml

    raw = yaml.safe_load((Path(__file__).resolve().parents[1] / "configs/tiny.yaml").read_text())
    raw["name"] = name
    raw["data"].update(data, max_rows=64)
    raw["soft_labels"].update(store=f"file://{tmp}/soft-labels", shard_size=16, task_runner="local")
    raw["tracking"] = {"uri": fresh_mlflow_db(mlflow_db, tmp), "artifact_location": str(tmp / "mlartifacts")}
    raw["governance"] = {"key_dir": str(tmp / "keys")}
    raw["quantize"].update(**ONNX_INT8_ONLY, tolerable_loss=OPEN_TOLERABLE_LOSS)
    raw["evaluate"] = {"bootstrap_samples": 0, "stress_rows": 0, **OPEN_GATES}
    raw["runtime"]["threads"] = 1  # the other pytest worker has the other core
    config = tmp / f"{name}.yaml"
    config.write_text(yaml.safe_dump(raw))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_API", "MLFLOW_TRACKING"))}
    env.update(PREFECT_HOME=str(tmp / "prefect-home"), PREFECT_LOGGING_LEVEL="INFO", DISTILL_PROGRESS="0",
               PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="180")
    import_tiny_teacher(config, model_dir)
    return {"tmp": tmp, "config": config, "env": env}


def log_model_dir(client, run_id: str, local_dir, artifact_path: str) -> str:
    """Upload a model folder as run artifacts; return the artifact URI to register as a version source (a plain
    folder, not an MLflow model: tests that need a registered version, not a servable pyfunc)."""
    client.log_artifacts(run_id, str(local_dir), artifact_path)
    return f"{client.get_run(run_id).info.artifact_uri.rstrip('/')}/{artifact_path}"


def add_scope_guard(edge_folder, texts, *, detector: str = "knn") -> "object":
    """Fit a real scope guard on the primary artifact of a hand-made edge folder (its own features of every other
    text as the reference rows, its threshold at 95% of the remaining texts) and write it, as the evaluate stage
    does; returns the guard. For tests whose edge folder is not built by the pipeline."""
    from distill_gap.edge.serving import load_edge
    from distill_gap.evaluation.scope import fit_guard

    edge = load_edge(edge_folder)
    logits, features = edge.predict_outputs(list(texts))
    texts = list(texts)
    guard = fit_guard(detector, train_features=features[::2], train_labels=logits[::2].argmax(-1),
                      num_classes=logits.shape[1], val_logits=logits[1::2], val_features=features[1::2], tpr=0.95,
                      temperature=1.0, k=1, train_texts=texts[::2], val_texts=texts[1::2])
    guard.info = {"model": "test edge folder", "fitted_on": f"{len(texts)} test texts"}
    guard.write(edge_folder)
    return guard
