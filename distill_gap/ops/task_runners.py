"""The Prefect task runner of a stage that fans out (soft-label shards, size-sweep candidates): one task at a time
in this process, or on Dask (a LocalCluster of worker processes on 127.0.0.1, or a running scheduler)."""

from __future__ import annotations

import logging

from distill_gap.errors import DistillError


def task_runner(kind: str = "local", *, dask_address: str | None = None, dask_workers: int = 2,
                setting: str = "soft_labels.task_runner"):
    """A Prefect task runner: `local` runs the tasks one at a time here (torch already uses every thread it was
    given), `dask` on the scheduler at `dask_address` or a LocalCluster of `dask_workers` processes. `setting`
    names the config key in the error of an unknown kind."""
    if kind == "local":
        from prefect.task_runners import ThreadPoolTaskRunner

        return ThreadPoolTaskRunner(max_workers=1)
    if kind != "dask":
        raise DistillError(f"{setting} {kind!r} is not local or dask", f"set {setting} to local or dask")
    try:
        from prefect_dask import DaskTaskRunner
    except ImportError as err:  # pragma: no cover - a dependency of this project
        raise DistillError(f"{setting} is dask but prefect-dask is not installed",
                           "pip install prefect-dask (it is in pyproject.toml)") from err
    if dask_address:
        return DaskTaskRunner(address=dask_address)
    logging.getLogger("distributed").setLevel(logging.WARNING)
    return DaskTaskRunner(cluster_kwargs={"n_workers": dask_workers, "threads_per_worker": 1, "processes": True,
                                          "host": "127.0.0.1", "dashboard_address": "127.0.0.1:0"})
