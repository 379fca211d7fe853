"""The whole flow on configs/tiny.yaml: a real Prefect API (the session's server), MLflow on SQLite, soft labels
on a moto S3 server on 127.0.0.1. Bad input that stops the run is tests/reliability/test_bad_data.py."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from flows.config import load_config
from distill_gap.registry.registration import LINEAGE_TAGS
from distill_gap.registry.tracking import client_for
from distill_gap.monitoring.drift import sample_digest
from tests.helpers import ONNX_INT8_ONLY_OVERRIDES, OPEN_GATE_OVERRIDES, fresh_mlflow_db, import_tiny_teacher, task_runs

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, s3_endpoint, prefect_api, tiny_model_dir, mlflow_db_template):
    """A working directory with a bucket for soft labels, a SQLite MLflow store and a pinned tiny teacher.

    The teacher is imported, not trained (`distill teacher bootstrap` is tests/tasks/test_teacher.py and the
    production stack): this file is about the run's wiring, not the tiny model's quality, so the gates are open
    and the intervals use 100 resamples instead of 1000 (computed and reported all the same)."""
    import boto3

    tmp = tmp_path_factory.mktemp("pipeline")
    old = os.getcwd()
    os.chdir(tmp)
    boto3.client("s3").create_bucket(Bucket="distill-soft")
    base = [f"tracking.uri={fresh_mlflow_db(mlflow_db_template, tmp)}", "soft_labels.store=s3://distill-soft/labels",
            "soft_labels.engine=onnxruntime", "evaluate.bootstrap_samples=100", *OPEN_GATE_OVERRIDES,
            "runtime.threads=1"]  # tiny models gain nothing from a second thread; the other pytest worker has it
    import_tiny_teacher(load_config(ROOT / "configs/tiny.yaml", base), tiny_model_dir)
    yield tmp, base
    os.chdir(old)


def _config(workspace, *overrides):
    _, base = workspace
    return load_config(ROOT / "configs/tiny.yaml", [*base, *overrides])


def _versions(client, name):
    return client.search_model_versions(f"name='{name}'")


def _manifests():
    import boto3

    objs = boto3.client("s3").list_objects_v2(Bucket="distill-soft", Prefix="labels/").get("Contents", [])
    return sorted(o["Key"] for o in objs if o["Key"].endswith("manifest.json"))


@pytest.fixture(scope="module")
def first_run(workspace):
    from flows.pipeline import distill_pipeline

    cfg = _config(workspace)
    return cfg, distill_pipeline(cfg, trigger_reason="test: first run")


def test_pipeline_end_to_end_then_cache_hit(workspace, first_run):
    from prefect.client.orchestration import get_client

    from flows.pipeline import distill_pipeline

    cfg, first = first_run
    client = client_for(cfg.tracking)

    # every model evaluated on its own, on test and the OOD set
    test = first["report"]["suites"]["test"]
    assert set(test) == {"teacher", "student", "student-int8", "student-onnx", "student-onnx-int8"}
    assert all(0.0 <= m["accuracy"] <= 1.0 and "macro_f1" in m for m in test.values())
    assert "fidelity" in test["student-int8"]

    # quantization: INC autotune trials recorded, the primary INT8 artifact named, the gate evaluated
    e = first["edge"]
    assert e["quantized"] and e["primary"] in ("int8", "onnx-int8") and not e["errors"]
    assert "quantization" in first["gates"] and first["gates"]["quantization"]["passed"] == e["quantized"]
    assert "ood:unseen_conditions" in first["report"]["suites"]

    # soft labels computed once, in S3, with the manifest last
    assert not first["soft_labels"]["hit"] and first["soft_labels"]["uri"].startswith("s3://distill-soft/labels/")
    assert _manifests() == [f"labels/{first['soft_labels']['key']}/manifest.json"]
    import boto3

    manifest = json.loads(boto3.client("s3").get_object(Bucket="distill-soft", Key=_manifests()[0])["Body"].read())
    # the teacher labelled through ONNX Runtime (engine onnxruntime), shards as mapped tasks
    assert manifest["produced_by"]["engine"] == "onnxruntime" and manifest["produced_by"]["task_runner"] == "local"

    # registry: student and edge versions carrying every lineage tag
    student = client.get_model_version("tiny-student", str(first["registered"]["student"]["version"]))
    edge = client.get_model_version("tiny-edge", str(first["registered"]["edge"]["version"]))
    for mv in (student, edge):
        assert set(LINEAGE_TAGS) <= set(mv.tags), set(LINEAGE_TAGS) - set(mv.tags)
        assert mv.tags["teacher.name"] == "tiny-teacher" and mv.tags["teacher.version"] == "1"
        assert mv.tags["config.digest"] == cfg.digest()
        assert mv.tags["soft_labels.key"] == first["soft_labels"]["key"]
    assert edge.tags["parent"] == f"tiny-student/{student.version}"
    assert edge.tags["edge.primary"] == e["primary"] and edge.tags["edge.quantized"] == "true"
    assert edge.tags["quantization.candidate"] in ("static", "static-sym")
    assert first["registered"]["gates_passed"] and edge.tags["gates.passed"] == "true"
    assert client.get_model_version_by_alias("tiny-edge", "champion").version == edge.version

    # the MLflow run finished, with the config digest; each stage logs into its nested run
    run = client.get_run(first["run_id"])
    assert run.info.status == "FINISHED" and run.data.tags["config.digest"] == cfg.digest()
    stages = {r.data.tags["distill.stage"]: r.info.run_id for r in client.search_runs(
        [run.info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{first['run_id']}'")}
    assert "student-int8.test.accuracy" in client.get_run(stages["evaluate"]).data.metrics
    trials = client.get_metric_history(stages["quantize"], "quantize.trial_accuracy")
    assert 1 <= len(trials) <= 2  # tiny.yaml: candidates [static, static-sym], max_trials 2
    local = client.download_artifacts(stages["quantize"], "quantization/edge.json", str(Path(workspace[0])))
    manifest_edge = json.loads(Path(local).read_text())
    assert manifest_edge["primary"] == e["primary"] and manifest_edge["tuning"]["trials"]
    assert {"int8", "onnx", "onnx-int8"} <= set(manifest_edge["artifacts"])

    async def _artifact(flow_run_id):
        from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterKey

        async with get_client() as c:  # this run's: other modules' runs on the session server are named tiny too
            return await c.read_artifacts(artifact_filter=ArtifactFilter(
                key=ArtifactFilterKey(any_=["tiny-gap-report"]),
                flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])))

    import asyncio

    arts = asyncio.run(_artifact(run.data.tags["prefect.flow_run_id"]))
    assert len(arts) == 1 and "student-int8" in arts[0].data

    # the Prefect run says what ran (issue 23): `<config> · <trigger>`, tagged; each task run named by its step
    async def _flow_run(flow_run_id):
        async with get_client() as c:
            return await c.read_flow_run(flow_run_id)

    flow_run = asyncio.run(_flow_run(run.data.tags["prefect.flow_run_id"]))
    steps_run = task_runs(run.data.tags["prefect.flow_run_id"])
    assert flow_run.name == "tiny · test" and {"config:tiny", "trigger:test"} <= set(flow_run.tags)
    names = {t.name for t in steps_run}
    steps = {"validate-data", "load-data", "resolve-teacher", "soft-labels-lookup", "soft-labels-manifest", "distill",
             "quantize", "quantize-int8", "export-onnx", "quantize-onnx-int8", "evaluate", "register", "release-gate",
             "promote"}
    assert {"validate-data", "distill", "evaluate", "register", "attest-distill", "attest-evaluate"} <= names, names
    assert all(n in steps or n.startswith(("attest-", "label-shard-")) for n in names), names  # no random suffix
    assert not [t.name for t in steps_run if t.tags]  # a task run's tag costs a concurrency-slot call to the API

    # second run: same key -> cache hit, teacher not run, a new student version with the same lineage. Its later
    # stages are trimmed (ONNX Runtime INT8 only, no intervals or stress suites): the cache is what is
    # tested, and the soft-label key does not depend on them. It also learns from extra rows, which the teacher
    # labels under a key of their own and verify checks: one edited copy of each training text (distill.augment),
    # and a redistillation's: production rows (as a drift event names them, with their digest) and answers kept by
    # `distill feedback` (a person's answer becomes a hard label)
    production, store = _production_and_feedback(workspace, cfg, first)
    second = distill_pipeline(_config(workspace, *ONNX_INT8_ONLY_OVERRIDES, "evaluate.bootstrap_samples=0",
                                      "evaluate.stress_rows=0",
                                      "distill.augment.copies=1", f"redistill.production={production}",
                                      f"redistill.production_digest={sample_digest(production)}",
                                      "redistill.feedback=true", f"feedback.store={store}",
                                      "scope.region_column=condition"))
    assert second["soft_labels"]["hit"] and second["soft_labels"]["key"] == first["soft_labels"]["key"]
    assert second["registered"]["student"]["version"] == first["registered"]["student"]["version"] + 1
    assert len(_manifests()) == 2  # the training rows' entry, reused, and the augmentation rows' own
    _extra_rows_are_attested_and_verified(cfg, second, production)


def _production_and_feedback(workspace, cfg, first):
    """A production sample (40 real reviews that no split holds) and two answers a person gave to rows the champion
    abstained on, one of them not in the sample."""
    from distill_gap.data.splits import load_splits, read_table
    from distill_gap.monitoring.feedback import append_feedback

    splits = load_splits(cfg.data, cfg.seed)
    used = {t for f in splits.frames.values() for t in f["text"]}
    raw = read_table("builtin:drugreview/test")  # reviews no split holds (data.max_rows leaves most out)
    unseen = raw[~raw["review"].isin(used)].head(40)
    production = workspace[0] / "production.jsonl"
    production.write_text("".join(json.dumps({"text": t, "condition": c}) + "\n"
                                  for t, c in zip(unseen["review"], unseen["condition"].fillna("unknown"))))
    store = f"file://{workspace[0]}/feedback"
    version = first["registered"]["edge"]["version"]
    answers = [{"id": f"a-{i}", "text": t, "answer": a, "answered_by": "nurse.kim", "kind": "human",
                "answered_at": "2026-12-02T10:00:00Z", "edge_version": version}
               for i, (t, a) in enumerate([(unseen["review"].iloc[0], "negative"),
                                           ("the patch fell off after an hour, useless", "negative")])]
    append_feedback(store, answers, ["a line 1", "a line 2"], labels=list(cfg.data.labels),
                    edge_versions=lambda wanted: [])
    return str(production), store


def _extra_rows_are_attested_and_verified(cfg, second, production):
    from distill_gap.governance.lineage import lineage
    from distill_gap.governance.verify import verify

    client = client_for(cfg.tracking)
    stages = {r.data.tags["distill.stage"]: r for r in client.search_runs(
        [client.get_run(second["run_id"]).info.experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{second['run_id']}'")}
    params = stages["soft-labels"].data.params
    rows, key = int(params["extra.rows"]), params["extra.key"]
    assert rows > 60 and key != second["soft_labels"]["key"]  # ~one edited copy per training row, not in a split
    sources = dict(part.rsplit(" ", 1) for part in params["extra.sources"].split(", "))
    # 40 production rows and the answer to a row not among them; one of the two answers is held out:
    assert int(sources["production"]) + int(sources.get("feedback", 0)) == 40, sources
    assert params["extra.answered"] == "1"  # the held-out answer is the production suite,
    # the production suite, reported and gated like a critical slice (1 row: insufficient evidence, never a pass)
    assert second["report"]["suites"]["production"]["teacher"]["n"] == 1
    # a redistillation is also judged against the champion it would replace (v1), beside it on every suite
    champion = f"champion-v{second['registered']['edge']['version'] - 1}"  # the first run's, promoted
    assert second["report"]["champion"]["name"] == champion and champion in second["report"]["suites"]["test"]
    assert {"vs_champion:accuracy", "vs_champion:suite:production"} <= set(second["gates"]), second["gates"].keys()
    assert second["gates"]["vs_champion:accuracy"]["detail"].startswith(f"vs {champion}: ")
    # the scope: its guard's reference includes the production rows; its regions are the training split's, and the
    # production suite's one held-out answer decides no new region (one row is never evidence enough)
    for model, scope in second["report"]["scope"].items():
        if model != "teacher":
            assert "of them production rows" in scope["fitted_on"], scope["fitted_on"]
            regions = scope["regions"]
            assert regions["column"] == "condition" and "Acne" not in regions["trained"] and not regions["added"]
            assert all(r["outcome"] != "pass" and r["n"] == 1 for r in regions["refused"])
    gate = second["gates"]["noninferior:suite:production"]  # decided at the open margins of this run (1.0)
    assert gate["n"] == 1 and gate["threshold"] == 1.0 and "production" in gate["detail"], gate
    from distill_gap.evaluation.noninferiority import check
    at_default = check("suite:production", [True], [True], 0.03, teacher_value=1.0, model_value=1.0, floor=0.5, seed=0)
    assert at_default["outcome"] == "insufficient" and at_default["rows_needed"]  # 1 row decides nothing at 3 points
    assert second["student"]["spec"]["kind"] == "layers"
    result = verify(client, f"models:/tiny-edge/{second['registered']['edge']['version']}",
                    key_dir=cfg.governance.key_dir)
    checks = {c.link: c for c in result.checks}
    assert result.ok, [c for c in result.checks if not c.ok]
    assert checks["extra soft labels manifest"].ok and checks["extra soft labels shards"].ok
    # one changed byte in an augmentation shard is named by verify (and put back)
    import boto3

    s3, shard = boto3.client("s3"), f"labels/{key}/shards/part-00000.parquet"
    body = s3.get_object(Bucket="distill-soft", Key=shard)["Body"].read()
    s3.put_object(Bucket="distill-soft", Key=shard, Body=body[:-1] + bytes([body[-1] ^ 1]))
    try:
        bad = verify(client, f"models:/tiny-edge/{second['registered']['edge']['version']}",
                     key_dir=cfg.governance.key_dir)
    finally:
        s3.put_object(Bucket="distill-soft", Key=shard, Body=body)
    assert [c.link for c in bad.checks if not c.ok] == ["extra soft labels shards"]
    chain = lineage(client, f"models:/tiny-edge/{second['registered']['edge']['version']}")["chain"]
    soft = next(n for n in chain if n["role"] == "soft labels")
    assert soft["extra"] == {"key": key, "digest": params["extra.digest"], "rows": rows,
                             "production": {"uri": production, "sha256": sample_digest(production)}}
    from distill_gap.governance.dossier import dossier_for  # the certifier's record says it too, from the Statement

    mv = client.get_model_version("tiny-edge", str(second["registered"]["edge"]["version"]))
    step = next(s for s in dossier_for(client, mv)["lineage"]["steps"] if s["step"] == "soft-labels")
    assert step["parameters"]["extra_rows"].startswith(f"{rows} (") and "1 with a person's answer" in \
        step["parameters"]["extra_rows"] and step["parameters"]["production_sample"].startswith(production)


def _cli(*args):
    from typer.testing import CliRunner

    from flows.cli import app

    return CliRunner().invoke(app, [str(a) for a in args])


def test_records_lineage_signatures_and_attestations(workspace, first_run):
    """Nested stage runs, datasets as run inputs, signed versions, one signed Statement per step; lineage and
    verify through the command; one changed byte named by verify; a moved teacher alias rewrites no history."""
    import mlflow

    cfg, first = first_run
    client = client_for(cfg.tracking)
    run_id, edge_v = first["run_id"], first["registered"]["edge"]["version"]
    uri = f"models:/tiny-edge/{edge_v}"

    # 1. one parent run, a nested run per stage, the splits as dataset inputs with our sha256
    children = client.search_runs([client.get_run(run_id).info.experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{run_id}'")
    assert {r.data.tags["distill.stage"] for r in children} == {"validate", "soft-labels", "distill", "quantize",
                                                                "evaluate", "register", "release"}
    assert all(r.info.status == "FINISHED" for r in children)
    inputs = {d.dataset.name: {t.key: t.value for t in d.tags} for d in client.get_run(run_id).inputs.dataset_inputs}
    recorded = json.loads(Path(client.download_artifacts(run_id, "lineage/inputs.json", str(workspace[0]))).read_text())
    assert {n: t["distill.sha256"] for n, t in inputs.items()} == recorded["data"]

    # 2. versions: MLflow models with a signature, owner and review tags, signed, gap summary and verdict
    edge = client.get_model_version("tiny-edge", str(edge_v))
    for key in ("owner", "review.due", "signature.uri", "signing.public_key", "signing.keyid", "teacher.license"):
        assert edge.tags.get(key), key
    assert edge.tags["trigger.reason"] == "test: first run" and edge.tags["owner"] == cfg.governance.owner
    # what people read in the MLflow UI (issue 23): the version's markdown, verdict first, links to report and dossier
    exp = client.get_run(run_id).info.experiment_id
    assert edge.description.startswith("**Verdict: every gate passed.**"), edge.description
    assert "\n\nScope: in scope when the mahalanobis+lexical score >= " in edge.description
    stage = {r.data.tags["distill.stage"]: r.info.run_id for r in children}
    # relative to the MLflow UI: they open on whatever port it was started (`distill ui --mlflow-port`)
    assert (f"[Gap report](#/experiments/{exp}/runs/{stage['evaluate']}/artifactPath/evaluation/"
            f"gap_report.html?workflowType=machine_learning) · [Dossier](#/experiments/{exp}/runs/"
            f"{stage['register']}/artifactPath/dossier/dossier.html?workflowType=machine_learning)") in edge.description
    assert "distill promote" in client.get_registered_model("tiny-edge").description
    assert "distill promote" in client.get_registered_model("tiny-student").description
    # the pipeline run: its description and headline metrics; the logged edge model carries the same metrics
    parent = client.get_run(run_id)
    assert parent.data.tags["mlflow.note.content"].startswith("**Verdict: every gate passed.**")
    assert "[Prefect flow run](" in parent.data.tags["mlflow.note.content"]
    assert "[Dossier](" in parent.data.tags["mlflow.note.content"]
    headline = {k: v for k, v in parent.data.metrics.items() if k.startswith("headline.")}
    assert not cfg.data.critical_slices  # tiny.yaml declares none: no worst-critical-slice number is invented
    assert set(headline) == {"headline.edge_test_accuracy", "headline.retention_vs_teacher",
                             "headline.scope_auroc"}, headline
    assert headline["headline.edge_test_accuracy"] == first["report"]["suites"]["test"][first["edge"]["report_name"]][
        "accuracy"]
    logged = client.get_logged_model(edge.source.removeprefix("models:/"))
    assert {m.key for m in logged.metrics or []} >= set(headline)
    info = mlflow.models.get_model_info(f"models:/tiny-edge/{edge_v}")
    assert info.signature is not None and info.signature.inputs.input_names() == ["text"]
    assert client.get_registered_model("tiny-edge").tags["owner"] == cfg.governance.owner

    # 3. lineage: the whole chain down to the data digests, from the command
    out = _cli("lineage", uri, "--tracking-uri", cfg.tracking.uri)
    assert out.exit_code == 0, out.output
    student_v = first["registered"]["student"]["version"]
    for piece in (f"tiny-edge v{edge_v}", f"tiny-student v{student_v}", first["soft_labels"]["key"][:16],
                  "tiny-teacher v1", f"train: sha256 {recorded['data']['train']}", run_id):
        assert piece in out.output, (piece, out.output)

    # 4. verify, as the installed command in a fresh process: every digest and signature holds ...
    import subprocess
    import sys

    proc = subprocess.run([str(Path(sys.executable).parent / "distill"), "verify", uri, "--tracking-uri",
                           cfg.tracking.uri], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "COLUMNS": "200"})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "attestation distill" in proc.stdout and "tiny-teacher v1 signature" in proc.stdout
    # ... and one changed byte in a stored weight file fails it, naming that file
    from distill_gap.edge.guard import read_guard
    from distill_gap.registry.versions import version_folder

    assert edge.source.startswith("models:/m-")  # the logged MLflow model; its `model` artifact is the folder
    stored_root = Path(client.get_logged_model(edge.source.removeprefix("models:/")).artifact_location.removeprefix("file://"))
    src = version_folder(stored_root, edge.source)
    guard = read_guard(src)  # the scope guard shipped inside the signed folder: the default detector, fitted
    assert guard.detector == cfg.scope.detector == "mahalanobis+lexical" and guard.stats["means"].shape[0] == 3
    assert len(guard.stats["lexicon_buckets"]) > 0 and set(guard.standardise) == {"mahalanobis", "lexical"}
    assert guard.info["model"] == {"int8": "student-int8", "onnx-int8": "student-onnx-int8"}[edge.tags["edge.primary"]]
    stored = max((p for p in src.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    rel = stored.relative_to(src)
    original = stored.read_bytes()
    try:
        damaged = bytearray(original)
        damaged[len(damaged) // 2] ^= 0x01
        stored.write_bytes(bytes(damaged))
        out = _cli("verify", uri, "--tracking-uri", cfg.tracking.uri)
        assert out.exit_code == 1
        assert f"{rel}: digest differs" in out.output and "BROKEN" in out.output
    finally:
        stored.write_bytes(original)

    # 5. moving the teacher's alias rewrites no history: the edge version still reports teacher v1
    from distill_gap.registry.versions import fetch_model
    from distill_gap.kd.teacher import import_teacher

    teacher_dir = fetch_model(client, "tiny-teacher", version=1, cache_root=workspace[0] / "models").path
    assert import_teacher(cfg, teacher_dir, license="apache-2.0", pin=True, log=lambda *_: None)["version"] == 2
    out = _cli("lineage", uri, "--tracking-uri", cfg.tracking.uri, "--json")
    chain = {link["role"]: link for link in json.loads(out.stdout)["chain"]}
    assert chain["teacher"]["version"] == 1 and chain["teacher"]["aliases_now"] == {"pinned": 2}
    client.set_registered_model_alias("tiny-teacher", "pinned", "1")  # later tests distill from v1 again
