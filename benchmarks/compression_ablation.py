"""Which compression lever gives what, over seeds (issue 21's ablation table). Run with no arguments:

    .venv/bin/python benchmarks/compression_ablation.py

In the compression benchmark's workspace (.distill/bench/compression: the demo teacher, its soft labels and splits;
bootstrapped as benchmarks/compression.py does when missing), one `distill run --set sweep.enabled=true` whose
ladder is the demo's (configs/demo.yaml `sweep.candidates`) once per student seed in SEEDS (`distill.seed`: the
splits, soft labels and calibration rows stay the run's seed 13; the student's initialisation, batch order and
dropout change). Every candidate is trained, quantized as the quantize stage does it and judged by every release
gate, as in any sweep; the run then carries the smallest candidate that holds on to registration in that workspace
(or stops when none holds: the candidates' MLflow runs keep the evidence either way).

Per lever (a rung of the ladder), medians over the seeds: the shipped artifact's MB and test accuracy, the negative
class's recall drop against the teacher and the OOD AUROC drop on each OOD set (the gates' own values), and how
often each outcome and each failed gate occurred. Prints a table and writes
benchmarks/results/compression_ablation.json (flat): `<lever>_size_mb`, `<lever>_accuracy`,
`<lever>_recall_negative_drop`, `<lever>_ood_drop_<set>`, `<lever>_outcomes` ("fail=2,insufficient=1"),
`<lever>_failed_gates`, plus teacher_accuracy, seeds, candidates, sweep_minutes, run_minutes, chosen, rc.
ABLATION_SEEDS (default "13,14,15") picks the seeds.
"""

from __future__ import annotations

import collections
import json
import os
import statistics
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.chdir(ROOT)

from benchmarks.compression import (WORK, distill, ensure_teacher, environment, log, prepare,  # noqa: E402
                                    sweep_record)

OUT = ROOT / "benchmarks" / "results" / "compression_ablation.json"
SEEDS = [int(s) for s in os.environ.get("ABLATION_SEEDS", "13,14,15").split(",")]
RECALL_GATE = "noninferior:recall:negative"
OOD_GATE = "ood_auroc_vs_teacher:"


def ladder() -> list[dict]:
    """The demo's ladder, each rung once per seed (its quantize changes too), named `<rung>.s<seed>`."""
    rungs = yaml.safe_load((ROOT / "configs" / "demo.yaml").read_text())["sweep"]["candidates"]
    return [{"name": f"{r['name']}.s{seed}", "distill": {**r.get("distill", {}), "seed": seed},
             "quantize": r.get("quantize", {})} for r in rungs for seed in SEEDS]


def with_gates(client, rows: list[dict]) -> list[dict]:
    """The sweep's candidate rows (sweep/candidates.json), each with its gates (sweep/gates.json of its run; none
    for a candidate that failed before it was judged)."""
    for row in rows:
        try:
            row["gates"] = json.loads(Path(client.download_artifacts(
                row["run_id"], "sweep/gates.json", str(WORK / "tmp" / row["run_id"]))).read_text())
        except Exception:  # noqa: BLE001 - no gates: the row's error says why
            row["gates"] = {}
    return rows


def summarize(rows: list[dict]) -> dict:
    """Per lever: medians over seeds and the outcome / failed-gate counts."""
    by_lever = collections.defaultdict(list)
    for row in rows:
        by_lever[row["name"].rsplit(".s", 1)[0]].append(row)
    out = {}
    for lever, rs in by_lever.items():
        def median(values):
            values = [v for v in values if v is not None]
            return round(statistics.median(values), 6) if values else None

        out[f"{lever}_size_mb"] = median([r["size_mb"] for r in rs])
        out[f"{lever}_accuracy"] = median([r["accuracy"] for r in rs])
        out[f"{lever}_recall_negative_drop"] = median([(r["gates"].get(RECALL_GATE) or {}).get("value") for r in rs])
        for key in sorted({k for r in rs for k in r["gates"] if k.startswith(OOD_GATE)}):
            out[f"{lever}_ood_drop_{key.removeprefix(OOD_GATE)}"] = median(
                [(r["gates"].get(key) or {}).get("value") for r in rs])
        outcomes = collections.Counter(r["outcome"] or "error" for r in rs)
        out[f"{lever}_outcomes"] = ",".join(f"{k}={v}" for k, v in sorted(outcomes.items()))
        failed = collections.Counter(k for r in rs for k, g in r["gates"].items() if g.get("outcome") == "fail")
        out[f"{lever}_failed_gates"] = ",".join(f"{k}={v}" for k, v in sorted(failed.items())) or "none"
        out[f"{lever}_seeds"] = len(rs)
    return out


def table(summary: dict, levers: list[str]) -> str:
    lines = ["| lever | MB (median) | test accuracy | recall:negative drop | OOD AUROC drop, not_drug_reviews | "
             "outcomes | gates failed (times) |", "|---|---|---|---|---|---|---|"]
    for lever in levers:
        def cell(key, fmt="{:.3f}"):
            v = summary.get(f"{lever}_{key}")
            return "-" if v is None else fmt.format(v) if isinstance(v, float) else str(v)

        lines.append(f"| {lever} | {cell('size_mb', '{:.1f}')} | {cell('accuracy')} | "
                     f"{cell('recall_negative_drop', '{:+.3f}')} | {cell('ood_drop_not_drug_reviews', '{:+.3f}')} | "
                     f"{cell('outcomes')} | {cell('failed_gates')} |")
    return "\n".join(lines)


def main() -> int:
    from flows.config import load_config
    from distill_gap.registry.tracking import client_for

    env = environment()
    config = prepare()
    cfg = load_config(config)
    client = client_for(cfg.tracking)
    ensure_teacher(env, config, cfg, client)
    candidates = ladder()
    start = time.perf_counter()
    proc = distill(env, "run", "--config", str(config), "--reason", "ablation over seeds", "--set",
                   "sweep.enabled=true", "--set", f"sweep.candidates={json.dumps(candidates)}")
    minutes = (time.perf_counter() - start) / 60
    log(f"sweep run: rc {proc.returncode}, {minutes:.1f} min")
    record = sweep_record(client, cfg)
    rows = with_gates(client, record["rows"])
    if sorted(r["name"] for r in rows) != sorted(c["name"] for c in candidates):
        raise SystemExit(f"the newest sweep does not hold this ladder (rc {proc.returncode}):\n{proc.stderr[-3000:]}")
    summary = summarize(rows)
    levers = list(dict.fromkeys(c["name"].rsplit(".s", 1)[0] for c in candidates))
    teacher_accuracy = next((r["teacher_accuracy"] for r in rows if r.get("teacher_accuracy") is not None), None)
    result = {"teacher_accuracy": teacher_accuracy, "seeds": ",".join(map(str, SEEDS)), "candidates": len(candidates),
              "sweep_minutes": record["minutes"], "run_minutes": round(minutes, 1), "chosen": record["chosen"],
              "rc": proc.returncode, **summary}
    print(table(summary, levers))
    print(f"\nteacher {teacher_accuracy:.3f} on the test rows; seeds {SEEDS}, {len(candidates)} candidates, sweep "
          f"{record['minutes'] or 0:.1f} min, whole run {minutes:.1f} min (rc {proc.returncode}), "
          f"chosen {record['chosen']}")
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {OUT.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
