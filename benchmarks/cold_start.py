"""Cold-start benchmark (issue 10, item 9): 20 cold starts in a row, each with an empty PREFECT_HOME and MLflow store.

    .venv/bin/python benchmarks/cold_start.py

One start = a new process (benchmarks.cold_start_probe.probe) that starts the real ephemeral Prefect API (a uvicorn
subprocess on a new SQLite database: its migrations), creates a flow run that reads itself back as Running, creates
a new SQLite MLflow store (its migrations) and starts the pipeline's MLflow run in it (distill_gap.registry.tracking
client_for + pipeline_run), then exits; loopback only. Watched from outside: seconds from the spawn to the API's first 200
from /api/health, to the flow run Running, to the MLflow run (`startup_seconds_*`), to the exit (`total_seconds_*`);
after each exit, nothing left running for that PREFECT_HOME, no lock or temporary file left.

`timeout_seconds` is PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS as the `distill` CLI sets it
(distill_gap.ops.runtime.EMBEDDED_ENV); a start fails if the API is not ready within it, or on any problem above.
Writes benchmarks/results/cold_start.json (flat) and benchmarks/results/cold_start_details.json (per start).
The load average beside each start is recorded: other processes on a 2-core machine stretch every number.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.chdir(ROOT)

from benchmarks.cold_start_probe import run_cold_starts, summary, table  # noqa: E402

COLD_STARTS = 20
OUT = ROOT / "benchmarks" / "results" / "cold_start.json"
DETAILS = ROOT / "benchmarks" / "results" / "cold_start_details.json"


def log(msg: str) -> None:
    print(f"[cold-start] {msg}", file=sys.stderr, flush=True)


def main() -> int:
    t0 = time.perf_counter()
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="distill-cold-start-") as root:
        records = run_cold_starts(COLD_STARTS, Path(root), log=log)
    wall = time.perf_counter() - t0
    loads = [r["load_average_1min"] for r in records]
    result = {
        **summary(records),
        "wall_seconds": round(wall, 1),
        "ok": all(r["ok"] for r in records),
        "load_average_1min_before": round(load_before, 2),
        "load_average_1min_min": round(min(loads), 2),
        "load_average_1min_max": round(max(loads), 2),
        "cpu_count": os.cpu_count(),
        "startup": "spawn -> flow run Running and the pipeline's MLflow run started (new Prefect DB, new MLflow DB)",
        "problems": " | ".join(f"start {r['index'] + 1}: {'; '.join(r['problems'])}" for r in records if not r["ok"]),
    }
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(result, indent=2))
    DETAILS.write_text(json.dumps([{k: v for k, v in r.items() if k not in ("log", "output_tail")} for r in records],
                                  indent=2))
    print(table(records))
    print()
    for k, v in result.items():
        print(f"{k:<34} {v:.3f}" if isinstance(v, float) else f"{k:<34} {v}")
    print(f"\nwritten: {OUT.relative_to(ROOT)}, {DETAILS.relative_to(ROOT)}")
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
