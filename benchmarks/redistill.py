"""Redistillation benchmark (issue 22): the closed loop on the demo data, through the real automation.

    .venv/bin/python benchmarks/redistill.py

The scenario, in its own workspace (.distill/bench/redistill: SQLite registry, soft-label store, keys, feedback
store, a Prefect server on 127.0.0.1 with its own database):
1. A champion trained without some groups: the demo config on the demo data with every review of GROUPS (the demo's
   held-out conditions: Acne, Obesity, ADHD, "Diabetes, Type 2", Migraine) removed from train and test, the scope's
   regions on `condition`. `distill teacher bootstrap` and `distill run`; a version whose gates are only
   insufficient (never failed) is made @champion by the approver's signed waiver (`distill approve --waive`), as
   the README's demo does. Reused on the next run of the script when the workspace already holds a champion.
2. `distill deploy` (the deployments of prefect.yaml and the automations of deployments/) and a `distill worker`.
3. Production traffic: the GROUPS' reviews (with their condition) through `distill predict` on the champion; the
   abstained rows go to a fallback that answers half of them (seeded) with their true labels, stored with
   `distill feedback add`. The drift-monitor deployment runs on the rows through the worker, then once more in this
   process (a burst: one event redelivered); the automation starts the distill-pipeline run, which learns from the
   rows (redistill.production / production_digest from the event, redistill.feedback) and is evaluated beside the
   champion it would replace.
4. The figures: `drift_detected`, `runs_started`, `scope_coverage_new_before/after` (share of the groups' rows in
   scope for `distill predict` on the champion, then on the new version), the same by the guard's score alone
   (`*_by_score`: rows that do not name their condition), `new_groups_accuracy_after` with its interval beside the
   teacher's on the held-out answered rows (the production suite), `old_suites_non_inferior` (no vs_champion gate of
   an old suite failed), the regions added and refused, `loop_minutes` (first production row to the new version's
   registration and promotion). RUNS loops (REDISTILL_BENCH_RUNS, default 3), each in a fresh process with a
   fresh Prefect server; medians (runs_started: the worst). Writes benchmarks/results/redistill.json (flat) and
   prints a table.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.chdir(ROOT)

WORK = ROOT / ".distill" / "bench" / "redistill"
OUT = ROOT / "benchmarks" / "results" / "redistill.json"
BIN = Path(sys.executable).parent
GROUPS = ["Acne", "Obesity", "ADHD", "Diabetes, Type 2", "Migraine"]
ANSWERED = 0.5  # share of the abstained rows the fallback answers with their true label
APPROVER = "demo-reviewer"
RUN_TIMEOUT_S = 3600
RUNS = int(os.environ.get("REDISTILL_BENCH_RUNS", 3))  # loops, each in a fresh process and Prefect server


def log(msg: str) -> None:
    print(f"[redistill] {msg}", file=sys.stderr, flush=True)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def environment(port: int) -> dict:
    return {**os.environ, "PREFECT_HOME": str(WORK / "prefect-home"),
            "PREFECT_API_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{WORK}/prefect.db",
            "PREFECT_API_URL": f"http://127.0.0.1:{port}/api", "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PREFECT_LOGGING_LEVEL": "WARNING", "MLFLOW_TRACKING_URI": f"sqlite:///{WORK}/mlflow.db",
            "DISTILL_KEY_DIR": str(WORK / "keys"), "DISTILL_PROGRESS": "0", "PREFECT_WORKER_QUERY_SECONDS": "2",
            "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
            "MLFLOW_DISABLE_TELEMETRY": "true", "GX_ANALYTICS_ENABLED": "false"}


def distill(env: dict, *args: str, timeout: float = RUN_TIMEOUT_S, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(BIN / "distill"), *args], env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)
    if check and proc.returncode != 0:
        raise SystemExit(f"distill {' '.join(args[:2])} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc


# ----------------------------------------------------------------------------------------------------------------
# 1. the workspace: data without the groups, the config, the champion


def prepare() -> tuple[Path, "object"]:
    """The config file and the groups' rows (canonical: id, text, label, condition)."""
    import pandas as pd

    from distill_gap.data.splits import read_table

    data = WORK / "data"
    data.mkdir(parents=True, exist_ok=True)
    new = []
    for part in ("train", "test"):
        raw = read_table(f"builtin:drugreview/{part}")
        held = raw["condition"].isin(GROUPS)
        raw[~held].to_csv(data / f"{part}.csv", index=False)
        new.append(raw[held])
    new = pd.concat(new, ignore_index=True)
    new = pd.DataFrame({"id": new["review_id"].astype(str), "text": new["review"], "label": new["rating"],
                        "condition": new["condition"]})
    raw_cfg = yaml.safe_load((ROOT / "configs" / "demo.yaml").read_text())
    raw_cfg["data"].update(train=str(data / "train.csv"), test=str(data / "test.csv"))
    raw_cfg["data"].pop("holdout", None)  # the groups are not an OOD split: they arrive as production traffic
    raw_cfg["soft_labels"]["store"] = f"file://{WORK}/soft-labels"
    raw_cfg["tracking"] = {"uri": f"sqlite:///{WORK}/mlflow.db", "artifact_location": str(WORK / "mlartifacts")}
    raw_cfg["governance"]["key_dir"] = str(WORK / "keys")
    raw_cfg["approval"]["approvers"] = [{"name": APPROVER, "public_key": str(
        WORK / "keys" / "approvers" / APPROVER / "signing-key.pub.pem")}]
    raw_cfg["feedback"] = {"store": f"file://{WORK}/feedback"}
    raw_cfg["redistill"] = {"feedback": True}  # the triggered run also learns from the fallback's answers
    config = WORK / "demo.yaml"
    config.write_text(yaml.safe_dump(raw_cfg, sort_keys=False))
    return config, new


def champion_version(cfg):
    from distill_gap.registry.tracking import client_for

    client = client_for(cfg.tracking)
    try:
        return client, client.get_model_version_by_alias(cfg.edge_model_name, "champion")
    except Exception:
        return client, None


def ensure_champion(env: dict, config: Path, cfg) -> tuple[object, dict]:
    """The starting champion (made here, or the one a previous run of this script left); the seconds each step took."""
    client, mv = champion_version(cfg)
    seconds: dict = {}
    if mv is not None:
        log(f"reusing the champion {cfg.edge_model_name} v{mv.version} in {WORK}")
        return mv, seconds
    try:
        client.get_model_version_by_alias(cfg.teacher_model_name, cfg.teacher.alias)
    except Exception:  # no pinned teacher yet
        t = time.perf_counter()
        log("distill teacher bootstrap (fine-tunes the demo teacher on the data without the groups)")
        distill(env, "teacher", "bootstrap", "--config", str(config))
        seconds["teacher_bootstrap"] = time.perf_counter() - t
    if not client.search_model_versions(f"name='{cfg.edge_model_name}'"):
        t = time.perf_counter()
        log("distill run (the champion to be)")
        distill(env, "run", "--config", str(config), check=False)
        seconds["base_run"] = time.perf_counter() - t
        client, mv = champion_version(cfg)
        if mv is not None:
            return mv, seconds
    versions = client.search_model_versions(f"name='{cfg.edge_model_name}'")
    if not versions:
        raise SystemExit(f"the base run registered no {cfg.edge_model_name} version: see the output of `distill run`")
    latest = max(versions, key=lambda v: int(v.version))
    outcome, waive = latest.tags.get("gates.outcome"), latest.tags.get("gates.insufficient", "")
    if outcome != "insufficient" or not waive:
        raise SystemExit(f"{cfg.edge_model_name} v{latest.version} has gates outcome {outcome!r}: a failed gate can "
                         "not be waived, so the scenario has no champion to start from")
    distill(env, "approver-key", APPROVER, "--config", str(config))
    distill(env, "approve", f"models:/{cfg.edge_model_name}/{latest.version}", "--approver", APPROVER,
            "--waive", waive, "--config", str(config),
            "--reason", "benchmark start: the demo's evidence per slice is too thin to decide (insufficient gates)")
    client, mv = champion_version(cfg)
    log(f"champion: {cfg.edge_model_name} v{mv.version} (insufficient gates waived by {APPROVER}: {waive})")
    return mv, seconds


# ----------------------------------------------------------------------------------------------------------------
# 2. the stack


def start_stack(env: dict, port: int) -> list:
    from tests.helpers import wait_http

    logs = WORK / "logs"
    logs.mkdir(exist_ok=True)
    procs = [subprocess.Popen([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                              env=env, stdout=open(logs / "server.log", "w"), stderr=subprocess.STDOUT,
                              start_new_session=True)]
    wait_http(f"http://127.0.0.1:{port}/api/health", procs[0], logs / "server.log", 180)
    distill(env, "deploy", timeout=300)
    procs.append(subprocess.Popen([str(BIN / "distill"), "worker"], env=env, cwd=ROOT,
                                  stdout=open(logs / "worker.log", "w"), stderr=subprocess.STDOUT,
                                  start_new_session=True))
    return procs


def stop_stack(procs: list) -> None:
    for p in reversed(procs):
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGTERM)
    for p in procs:
        try:
            p.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)


def pipeline_runs() -> list:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterName

    with get_client(sync_client=True) as c:
        return c.read_flow_runs(deployment_filter=DeploymentFilter(name=DeploymentFilterName(any_=["distill-pipeline"])))


# ----------------------------------------------------------------------------------------------------------------
# 3. traffic, fallback, feedback


def predict(env: dict, cfg, model: str, rows: Path) -> list[dict]:
    out = distill(env, "predict", "--model", model, "--input", str(rows), "--tracking-uri", cfg.tracking.uri,
                  "--key-dir", str(WORK / "keys"))
    return [json.loads(line) for line in out.stdout.splitlines() if line.strip()]


def write_rows(path: Path, new, *, with_region: bool) -> Path:
    with path.open("w") as f:
        for i, r in enumerate(new.itertuples()):
            f.write(json.dumps({"id": r.id, "text": r.text, **({"condition": r.condition} if with_region else {}),
                                "timestamp": 1_796_000_000 + i}) + "\n")
    return path


def fallback_answers(env: dict, config: Path, new, answered: list[dict], version: str) -> int:
    """Half of the abstained rows (seeded) answered with their true label by a person; stored as feedback."""
    import numpy as np

    by_id = new.set_index("id")
    ids = [r["id"] for r in answered if r["route"] == "fallback"]
    pick = sorted(np.random.default_rng(13).choice(len(ids), size=int(round(ANSWERED * len(ids))), replace=False))
    path = WORK / "feedback.jsonl"
    with path.open("w") as f:
        for k in pick:
            rid = ids[k]
            f.write(json.dumps({"id": rid, "text": by_id.loc[rid, "text"], "answer": by_id.loc[rid, "label"],
                                "answered_by": "fallback-nurse", "kind": "human",
                                "answered_at": "2026-12-02T12:00:00Z", "edge_version": int(version),
                                "condition": by_id.loc[rid, "condition"]}) + "\n")
    distill(env, "feedback", "add", str(path), "--config", str(config))
    return len(pick)


# ----------------------------------------------------------------------------------------------------------------
# 4. the figures


def gap_report(client, mv) -> dict:
    from distill_gap.registry.presentation import stage_run_id

    pipeline_run = client.get_run(mv.run_id).data.tags["mlflow.parentRunId"]
    path = client.download_artifacts(stage_run_id(client, pipeline_run, "evaluate"), "evaluation/gap_report.json",
                                     str(WORK / "downloads"))
    return json.loads(Path(path).read_text())


def coverage(rows: list[dict]) -> float:
    return sum(bool(r.get("in_scope")) for r in rows) / max(len(rows), 1)


def main() -> int:
    """RUNS loops, each in a fresh process with a fresh Prefect server (an automation fires once per cooldown);
    the figures of every run are kept beside the aggregate (medians; the worst for runs_started)."""
    if os.environ.get("REDISTILL_BENCH_ONE"):
        return once(Path(os.environ["REDISTILL_BENCH_ONE"]))
    runs = []
    for i in range(RUNS):
        path = WORK / f"run-{i + 1}.json"
        path.unlink(missing_ok=True)
        log(f"loop {i + 1} of {RUNS}")
        if subprocess.run([sys.executable, __file__], env={**os.environ, "REDISTILL_BENCH_ONE": str(path)}).returncode:
            return 1
        runs.append(json.loads(path.read_text()))
    figures = dict(runs[-1])
    for key, value in runs[-1].items():
        values = [r[key] for r in runs if key in r]
        if isinstance(value, bool):
            figures[key] = all(values)
        elif isinstance(value, (int, float)) and key not in ("new_version",):
            figures[key] = statistics.median(values)
    figures.update(runs=len(runs), runs_started=max(r["runs_started"] for r in runs),
                   loop_minutes_max=max(r["loop_minutes"] for r in runs))
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(figures, indent=2))
    width = max(map(len, figures))
    print(f"{'figure (median of ' + str(len(runs)) + ' loops)':<{width}}  value")
    for k, v in figures.items():
        print(f"{k:<{width}}  {round(v, 3) if isinstance(v, float) else v}")
    print(f"wrote {OUT.relative_to(ROOT)}")
    return 0


def once(out: Path) -> int:
    """One loop: a fresh Prefect server and stores of its own; the champion made once and reused."""
    from flows.config import load_config

    WORK.mkdir(parents=True, exist_ok=True)
    for stale in ("prefect.db", "prefect-home", "feedback", "downloads"):  # every run starts a fresh loop
        target = WORK / stale
        shutil.rmtree(target, ignore_errors=True) if target.is_dir() else target.unlink(missing_ok=True)
    port = _free_port()
    env = environment(port)
    config, new = prepare()
    cfg = load_config(config)
    os.environ.update({k: env[k] for k in ("PREFECT_HOME", "PREFECT_API_DATABASE_CONNECTION_URL", "PREFECT_API_URL",
                                          "MLFLOW_TRACKING_URI", "DISTILL_KEY_DIR", "DISTILL_PROGRESS")})
    procs = start_stack(env, port)  # first: every run below, the champion's included, reports to this server
    try:
        old, seconds = ensure_champion(env, config, cfg)
        out.write_text(json.dumps(loop(env, config, cfg, new, old, seconds), indent=2))
        return 0
    finally:
        stop_stack(procs)


def loop(env: dict, config: Path, cfg, new, old, seconds: dict) -> dict:
    from prefect.deployments import run_deployment

    from flows.monitor import drift_monitor
    from distill_gap.registry.tracking import client_for

    client = client_for(cfg.tracking)
    named, plain = write_rows(WORK / "production.jsonl", new, with_region=True), \
        write_rows(WORK / "production-no-region.jsonl", new, with_region=False)
    start = time.perf_counter()  # the first production row
    before = predict(env, cfg, f"models:/{cfg.edge_model_name}@champion", named)
    before_by_score = predict(env, cfg, f"models:/{cfg.edge_model_name}@champion", plain)
    n_answered = fallback_answers(env, config, new, before, old.version)
    log(f"{len(new)} production rows; {sum(r['route'] == 'fallback' for r in before)} abstained, {n_answered} "
        "answered by the fallback")
    monitor = {"config_path": str(config), "overrides": [], "production": str(named)}
    first = run_deployment("drift-monitor/drift-monitor", parameters=monitor, timeout=900)
    again = drift_monitor(**monitor)  # the burst: the same rows once more, in this process
    log(f"drift monitor: worker run {first.state.name}; again here: drifted={again['drifted']} {again['reasons']}")
    # no drift: no run should start (wait two minutes to see none does); drift: wait for the run it starts
    deadline = time.monotonic() + (RUN_TIMEOUT_S if again["drifted"] else 120)
    while time.monotonic() < deadline:
        runs = pipeline_runs()
        if runs and all(r.state.is_final() for r in runs):
            break
        time.sleep(5)
    loop_s = time.perf_counter() - start
    time.sleep(10)
    runs = pipeline_runs()
    log(f"pipeline runs started by the automation: {[(r.name, r.state.name) for r in runs]}")
    versions = [v for v in client.search_model_versions(f"name='{cfg.edge_model_name}'")
                if int(v.version) > int(old.version)]
    if not versions:
        raise SystemExit("the triggered run registered no new edge version: see .distill/bench/redistill/logs")
    mv = max(versions, key=lambda v: int(v.version))
    alias = "champion" if "champion" in (client.get_model_version(mv.name, mv.version).aliases or []) else "challenger"
    after = predict(env, cfg, f"models:/{cfg.edge_model_name}@{alias}", named)
    after_by_score = predict(env, cfg, f"models:/{cfg.edge_model_name}@{alias}", plain)
    report = gap_report(client, mv)
    edge = f"student-{mv.tags.get('edge.primary')}"
    edge = edge if edge in report["scope"] else next(m for m in report["scope"] if m != "teacher")
    prod = report["suites"].get("production", {})
    regions = report["scope"][edge].get("regions") or {}
    old_gates = {k: g for k, g in report["gates"].items()
                 if k.startswith("vs_champion:") and k != "vs_champion:suite:production"}

    def acc(model: str, key: str = "accuracy"):
        m = prod.get(model) or {}
        ci = (m.get("ci") or {}).get(key) or {}
        return m.get(key), ci.get("low"), ci.get("high")

    figures = {
        "drift_detected": bool(again["drifted"]),
        "runs_started": len(runs),
        "production_rows": len(new), "abstained_before": sum(r["route"] == "fallback" for r in before),
        "answered_by_fallback": n_answered,
        "scope_coverage_new_before": coverage(before), "scope_coverage_new_after": coverage(after),
        "scope_coverage_new_before_by_score": coverage(before_by_score),
        "scope_coverage_new_after_by_score": coverage(after_by_score),
        "regions_added": ", ".join(r["region"] for r in regions.get("added", [])),
        "regions_refused": "; ".join(f"{r['region']} ({r['outcome']}, n={r['n']}, rows needed {r.get('rows_needed')})"
                                     for r in regions.get("refused", [])),
        "production_suite_rows": (prod.get("teacher") or {}).get("n"),
        "new_groups_accuracy_after": acc(edge)[0], "new_groups_accuracy_after_low": acc(edge)[1],
        "new_groups_accuracy_after_high": acc(edge)[2], "new_groups_teacher_accuracy": acc("teacher")[0],
        "new_groups_teacher_accuracy_low": acc("teacher")[1], "new_groups_teacher_accuracy_high": acc("teacher")[2],
        "old_suites_non_inferior": bool(old_gates) and not any(g.get("outcome") == "fail" for g in old_gates.values()),
        "old_suites_gates": ", ".join(f"{k.removeprefix('vs_champion:')} {g.get('outcome')}"
                                      for k, g in old_gates.items()),
        "new_version": int(mv.version), "new_version_alias": alias, "new_version_gates": mv.tags.get("gates.outcome"),
        "loop_minutes": loop_s / 60,
        **{f"{k}_seconds": round(v, 1) for k, v in seconds.items()},
    }
    log(f"loop: {figures['loop_minutes']:.1f} min, new version v{mv.version} @{alias}")
    return figures


if __name__ == "__main__":
    sys.exit(main())
