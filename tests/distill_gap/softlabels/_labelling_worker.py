"""Subprocess worker for tests/distill_gap/softlabels/test_labelling_faults.py: one ensure_soft_labels call on a store.

    python tests/distill_gap/softlabels/_labelling_worker.py ARGS.json

ARGS.json holds the keyword arguments of ensure_soft_labels plus `store_uri` and `out` (a folder the
worker writes `logits.npy` and `result.json` to). AWS_* settings come from the environment.

Fault injection (test only, via the environment):
  WORKER_GO_FILE           after writing WORKER_READY_FILE (imports done), wait until this file
                           exists before labelling (lines concurrent workers up)
  WORKER_WRITE_BARRIER     a folder: before its first create-only put the worker waits there until
                           WORKER_WRITE_PARTIES workers arrived, so all of them race on every object
  WORKER_HANG_AFTER_SHARDS after this many shard objects were created, write WORKER_HANG_MARKER and
                           sleep (the test SIGKILLs the worker there: a run dying mid-write)
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path


def _wait_for_parties(folder: Path, parties: int) -> None:
    """Arrive at a file barrier and wait until `parties` workers have arrived."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / str(os.getpid())).write_text("here")
    deadline = time.monotonic() + 60
    while len(list(folder.iterdir())) < parties:
        if time.monotonic() > deadline:
            raise RuntimeError(f"only {len(list(folder.iterdir()))} of {parties} workers reached {folder}")
        time.sleep(0.005)


def main(args_path: str) -> int:
    import numpy as np

    from distill_gap.softlabels.backends import S3Backend
    from distill_gap.softlabels.labelling import ensure_soft_labels

    args = json.loads(Path(args_path).read_text())
    out = Path(args.pop("out"))
    store_uri = args.pop("store_uri")

    # Record every create-only put and whether it won (a race shows up as False).
    outcomes = []
    plain_put_new = S3Backend.put_new
    barrier = os.environ.get("WORKER_WRITE_BARRIER")

    def recording_put_new(self, rel, data):
        if barrier and not outcomes:
            _wait_for_parties(Path(barrier), int(os.environ["WORKER_WRITE_PARTIES"]))
        won = plain_put_new(self, rel, data)
        outcomes.append([rel, won])
        return won

    S3Backend.put_new = recording_put_new

    hang_after = int(os.environ.get("WORKER_HANG_AFTER_SHARDS", "0"))
    if hang_after:
        marker = Path(os.environ["WORKER_HANG_MARKER"])
        original = S3Backend.put_new
        created = []

        def put_new(self, rel, data):
            done = original(self, rel, data)
            if "/shards/" in rel:
                created.append(rel)
                if len(created) == hang_after:
                    marker.write_text(json.dumps(created))
                    time.sleep(120)          # killed here by the test
            return done

        S3Backend.put_new = put_new

    go = os.environ.get("WORKER_GO_FILE")
    if go:
        Path(os.environ["WORKER_READY_FILE"]).write_text("ready")
        deadline = time.monotonic() + 60
        while not Path(go).exists():
            if time.monotonic() > deadline:
                print("worker: go file never appeared", file=sys.stderr)
                return 3
            time.sleep(0.01)

    result = ensure_soft_labels(store_uri, progress=False, **args)
    out.mkdir(parents=True, exist_ok=True)
    np.save(out / "logits.npy", result.logits)
    (out / "result.json").write_text(json.dumps({
        "hit": result.hit, "labelled": result.labelled, "key": result.key,
        "reused_shards": result.manifest["produced_by"]["reused_shards"],
        "created_at": result.manifest["created_at"], "put_new": outcomes}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
