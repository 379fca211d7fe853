"""Whether the process that started a run is still alive: its host, pid and start time, recorded as run tags.

The pid alone is not enough (pids are reused), so the process's start time is compared too; a run started on
another host cannot be judged from here.
"""

from __future__ import annotations

import os
import socket

HOST, PID, STARTED = "distill.host", "distill.pid", "distill.pid_started"


def process_tags() -> dict[str, str]:
    """The tags that let a later run tell whether this process is still alive."""
    import psutil

    return {HOST: socket.gethostname(), PID: str(os.getpid()), STARTED: f"{psutil.Process().create_time():.3f}"}


def process_alive(tags: dict) -> bool | None:
    """True/False for a run started on this host; None when it was started elsewhere (cannot tell)."""
    import psutil

    if tags.get(HOST) != socket.gethostname() or PID not in tags:
        return None
    try:
        proc = psutil.Process(int(tags[PID]))
        if proc.status() == psutil.STATUS_ZOMBIE:
            return False
        return abs(proc.create_time() - float(tags.get(STARTED, 0))) < 1.0  # else the pid was reused
    except (psutil.NoSuchProcess, ValueError):
        return False
