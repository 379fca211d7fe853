"""The size sweep as a run of distill-pipeline (issue 21): candidates as Prefect tasks on a local Dask cluster (one
worker process: a second would import torch and transformers again on CI's two cores), each a nested MLflow run
under the `sweep` stage, judged against the teacher by every release gate; the chosen one goes on through
quantization and is registered and verified. A ladder where no candidate holds stops the run with the evidence kept
and nothing registered.

A real Prefect API (the session's server), MLflow on SQLite, a tiny teacher imported from a config."""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path

import pytest

from distill_gap.errors import DistillError
from distill_gap.registry.tracking import client_for
from flows.config import load_config
from tests.helpers import ONNX_INT8_ONLY_OVERRIDES, OPEN_GATE_OVERRIDES, fresh_mlflow_db, import_tiny_teacher

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
LADDER = [  # smallest last in the list: the choice must not depend on the order
    {"name": "layer1", "distill": {"student_layers": [1]}},
    {"name": "narrow", "distill": {"student": {"kind": "config", "num_layers": 1, "hidden_size": 16, "num_heads": 2,
                                               "intermediate_size": 32},
                                   "hidden_loss": "mse", "layer_map": [[1, 2]]},  # through a learned projection
     "quantize": {"onnx_embedding_bits": 8}},  # judged with, and shipped with, 8-bit embeddings (the run's: 4)
    {"name": "bad-layers", "distill": {"student_layers": [7]}},  # the teacher has 2: a candidate that cannot be built
]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, prefect_api, tiny_model_dir, mlflow_db_template):
    tmp = tmp_path_factory.mktemp("sweep")
    old = os.getcwd()
    os.chdir(tmp)
    base = [f"tracking.uri={fresh_mlflow_db(mlflow_db_template, tmp)}", "soft_labels.store=file://soft-labels",
            "evaluate.bootstrap_samples=0", "evaluate.stress_rows=0", *ONNX_INT8_ONLY_OVERRIDES, *OPEN_GATE_OVERRIDES,
            "runtime.threads=1"]
    import_tiny_teacher(load_config(ROOT / "configs/tiny.yaml", base), tiny_model_dir)
    yield tmp, base
    os.chdir(old)


def _config(workspace, *overrides):
    return load_config(ROOT / "configs/tiny.yaml", [*workspace[1], *overrides])


def _children(client, run_id):
    run = client.get_run(run_id)
    return client.search_runs([run.info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{run_id}'")


def test_the_smallest_candidate_that_holds_goes_on_and_is_registered(workspace):
    from flows.pipeline import distill_pipeline
    from distill_gap.governance.verify import verify

    cfg = _config(workspace, "sweep.enabled=true", f"sweep.candidates={json.dumps(LADDER)}", "sweep.task_runner=dask",
                  "sweep.dask_workers=1")  # one worker process: the candidates still cross a process boundary
    out = distill_pipeline(cfg, trigger_reason="test")
    client = client_for(cfg.tracking)

    stages = {r.data.tags["distill.stage"]: r for r in _children(client, out["run_id"])}
    assert "sweep" in stages and "distill" not in stages
    sweep_run = stages["sweep"]
    candidates = {r.data.tags["distill.candidate"]: r for r in _children(client, sweep_run.info.run_id)}
    assert set(candidates) == {"layer1", "narrow", "bad-layers"}
    assert candidates["bad-layers"].info.status == "FAILED"
    for name in ("layer1", "narrow"):
        m = candidates[name].data.metrics
        assert {"sweep.accuracy", "sweep.parameters", "sweep.latency_ms"} <= set(m)
        assert candidates[name].data.tags["distill.sweep.outcome"] in ("pass", "insufficient")
    # the open gates pass every check of both: the smaller one (16 wide, one layer) is chosen
    assert candidates["narrow"].data.metrics["sweep.parameters"] < candidates["layer1"].data.metrics["sweep.parameters"]
    assert sweep_run.data.tags["distill.sweep.chosen"] == "narrow"
    assert out["student"]["spec"]["kind"] == "config" and out["student"]["spec"]["hidden_size"] == 16
    assert json.loads(candidates["narrow"].data.params["candidate.changes"])["quantize"] == {"onnx_embedding_bits": 8}

    rows = json.loads(Path(client.download_artifacts(sweep_run.info.run_id, "sweep/candidates.json",
                                                     str(workspace[0]))).read_text())
    assert {r["name"]: r["outcome"] for r in rows}["bad-layers"] == "error"
    assert "teacher has 2" in next(r["error"] for r in rows if r["name"] == "bad-layers")
    png = Path(client.download_artifacts(sweep_run.info.run_id, "sweep/pareto.png", str(workspace[0])))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # the chosen student went on: quantized, evaluated, registered, its distill Statement naming the sweep
    student = client.get_model_version("tiny-student", str(out["registered"]["student"]["version"]))
    assert student.tags["soft_labels.key"] == out["soft_labels"]["key"]
    result = verify(client, f"models:/tiny-edge/{out['registered']['edge']['version']}",
                    key_dir=cfg.governance.key_dir)
    assert result.ok, [c for c in result.checks if not c.ok]
    # ... with the quantize changes it was judged with: its embeddings at 8 bits, the run's section says 4
    from distill_gap.registry.versions import fetch_model

    assert cfg.quantize.onnx_embedding_bits == 4
    edge = fetch_model(client, "tiny-edge", version=int(out["registered"]["edge"]["version"]),
                       cache_root=workspace[0] / "models").path
    assert json.loads((edge / "onnx-int8" / "ort_int8.json").read_text())["embeddings"]["bits"] == 8

    async def _report():
        from prefect.client.orchestration import get_client
        from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

        async with get_client() as c:
            return await c.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["tiny-size-sweep"])))

    md = max(asyncio.run(_report()), key=lambda a: a.created).data
    assert md.startswith("**Size sweep: `narrow` goes on**") and "bad-layers" in md and "could not be trained" in md


def test_on_the_local_runner_a_broken_candidate_is_a_row_and_a_ladder_where_nothing_holds_registers_nothing(
        workspace):
    """The default task runner (one candidate at a time in the flow's process): the candidate that cannot be built
    is reported with its own message and the other goes on; with only the broken one, the run stops before anything
    is registered and the sweep's stage run keeps the evidence."""
    from flows.pipeline import distill_pipeline

    cfg = _config(workspace, "sweep.enabled=true", f"sweep.candidates={json.dumps([LADDER[2], LADDER[0]])}")
    assert cfg.sweep.task_runner == "local"
    out = distill_pipeline(cfg, trigger_reason="test")
    assert out["student"]["spec"] == {"kind": "layers", "layers": [1]} and out["registered"]["edge"]["version"]

    cfg = _config(workspace, "sweep.enabled=true", f"sweep.candidates={json.dumps([LADDER[2]])}")
    client = client_for(cfg.tracking)
    before = {m.name: len(client.search_model_versions(f"name='{m.name}'")) for m in client.search_registered_models()}
    with pytest.raises(DistillError) as err:
        distill_pipeline(cfg, trigger_reason="test")
    assert "none of the 1 candidates holds" in str(err.value)
    assert "bad-layers: could not be trained: " in str(err.value) and "teacher has 2" in str(err.value)
    assert "tiny-size-sweep" in err.value.fix
    after = {m.name: len(client.search_model_versions(f"name='{m.name}'")) for m in client.search_registered_models()}
    assert after == before  # nothing registered
    runs = client.search_runs([client.get_experiment_by_name(cfg.tracking.experiment).experiment_id],
                              filter_string="tags.`distill.stage` = 'sweep'", order_by=["attributes.start_time DESC"])
    assert runs[0].info.status == "FAILED" and runs[0].data.metrics["sweep.candidates"] == 1  # the evidence stays
