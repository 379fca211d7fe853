"""Failpoints: named places where a crash drill holds the pipeline so it can be killed exactly there.

Off unless DISTILL_FAILPOINTS names them (comma-separated). At a named point the process writes
`$DISTILL_FAILPOINT_DIR/<name>` (its pid inside) and waits to be signalled; the reliability tests
(tests/reliability/test_crash.py) then send SIGKILL or SIGTERM, remove the file (which releases a hold in a
worker thread, so that a SIGTERMed process can finish the shard in hand and exit, as it would without the
hold) and run the pipeline again.
`<name>@N` holds at the N-th time the point is reached (default 1).

Points: soft-labels.shard-written (after a shard is stored), distill.epoch-end (after a training epoch),
register.student-registered (between the student and the edge version).
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

from distill_gap.errors import DistillError

_hits: dict[str, int] = {}
_lock = threading.Lock()


def _armed() -> dict[str, int]:
    out = {}
    for item in filter(None, (s.strip() for s in os.environ.get("DISTILL_FAILPOINTS", "").split(","))):
        name, _, nth = item.partition("@")
        out[name] = int(nth or 1)
    return out


def failpoint(name: str, hold_seconds: float = 600.0) -> None:
    """Hold here when DISTILL_FAILPOINTS names this point (a no-op otherwise)."""
    armed = _armed()
    if name not in armed:
        return
    with _lock:
        _hits[name] = _hits.get(name, 0) + 1
        if _hits[name] != armed[name]:
            return
    marker = Path(os.environ.get("DISTILL_FAILPOINT_DIR", ".")) / name
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(str(os.getpid()))
    deadline = time.monotonic() + hold_seconds
    while time.monotonic() < deadline:
        if not marker.exists():  # released: the drill removed the marker (after its signal), carry on
            return
        time.sleep(0.05)
    raise DistillError(f"failpoint {name} held {hold_seconds:.0f} s and nobody stopped the process",
                       "unset DISTILL_FAILPOINTS (it is for crash drills only)")
