"""One pipeline run as the stages see it: where it records, what it is called, where it works, on which device.

The flow opens it once (`open_pipeline_run`) and hands it to every stage task with that stage's config section:
the run says who and where, the section says how. Each stage records itself as a nested MLflow run
(`PipelineRun.stage`), through the one run lifecycle of distill_gap/registry/tracking.py.
"""

from __future__ import annotations

import contextlib
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from distill_gap.ops.runtime import configure_threads, select_device
from distill_gap.registry.crash_recovery import reap
from distill_gap.registry.tracking import client_for, mlflow_run, pipeline_run

WORK_ROOT = Path(".distill/work")  # per-run scratch space; what is kept is in MLflow and the soft-label store


@dataclass(frozen=True)
class PipelineRun:
    """The pipeline run a stage belongs to: the MLflow client and run, the Prefect flow run, the model names
    (`<name>-teacher`, `-student`, `-edge`), the governance section (signing keys, owner, licences), the scratch
    folder and the device."""

    client: Any
    run_id: str
    flow_run_id: str
    name: str
    config_digest: str
    governance: Any
    trigger_reason: str
    workdir: Path
    device: str
    teacher_model_name: str
    student_model_name: str
    edge_model_name: str
    threads: int | None = None
    mlflow_ui: str = "http://127.0.0.1:5000"  # links from Prefect artifacts into the MLflow UI (tracking.ui_url)
    prefect_ui: str = ""  # links from MLflow into the Prefect UI (its flow run); "" when not known (prefect_ui_url)

    @property
    def context(self) -> dict[str, str]:
        """Where a Statement was made: the MLflow run and the Prefect flow run."""
        return {"mlflow_run_id": self.run_id, "prefect_flow_run_id": self.flow_run_id}

    def links(self, *, evaluate_run: str | None = None, register_run: str | None = None) -> dict[str, str]:
        """Links for descriptions in MLflow: the gap report and the dossier relative to the MLflow UI (they work on
        any `distill ui --mlflow-port`), the flow run in the Prefect UI."""
        from distill_gap.registry.presentation import ui_links

        return ui_links("", self.client.get_run(self.run_id).info.experiment_id, evaluate_run=evaluate_run,
                        register_run=register_run, prefect_ui=self.prefect_ui, flow_run_id=self.flow_run_id)

    def mlflow_url(self, stage_run_id: str, artifact: str) -> str:
        """An artifact's page in the MLflow UI at tracking.ui_url: for links from outside MLflow (Prefect
        artifacts), which cannot be relative to it."""
        from distill_gap.registry.presentation import mlflow_page

        return mlflow_page(self.mlflow_ui, self.client.get_run(stage_run_id).info.experiment_id, stage_run_id,
                           artifact)

    def stage(self, stage: str) -> contextlib.AbstractContextManager[str]:
        """The stage's nested MLflow run `<name>-<stage>` (tag distill.stage); yields its run id."""
        return mlflow_run(self.client, parent_run_id=self.run_id, run_name=f"{self.name}-{stage}",
                          tags={"distill.stage": stage})


def prefect_ui_url() -> str:
    """The Prefect UI of the API runs report to, where it is known when a link is written: PREFECT_UI_URL as set,
    or inferred from a server's PREFECT_API_URL. "" on the embedded default: `distill ui` serves that history
    (.distill/prefect) on whichever --prefect-port its reader picks (presentation.prefect_link says so in the link)."""
    from prefect.settings import PREFECT_UI_URL

    return (PREFECT_UI_URL.value() or "").rstrip("/")


@contextlib.contextmanager
def open_pipeline_run(cfg, *, trigger_reason: str, flow_run_id: str | None,
                      work_root: Path = WORK_ROOT) -> Iterator[PipelineRun]:
    """Threads and device set, runs of killed processes reaped, the pipeline's MLflow run started (FINISHED on
    return, FAILED on any exception), its scratch folder removed at the end whatever happens."""
    configure_threads(cfg.runtime.threads)
    device = select_device(cfg.runtime.device)
    client = client_for(cfg.tracking)
    reap(client, cfg.tracking)  # runs whose process was killed (SIGKILL) are marked KILLED/Crashed, not left RUNNING
    with pipeline_run(client, cfg, trigger_reason=trigger_reason, flow_run_id=flow_run_id) as run_id:
        workdir = work_root / run_id
        try:
            yield PipelineRun(client=client, run_id=run_id, flow_run_id=str(flow_run_id), name=cfg.name,
                              config_digest=cfg.digest(), governance=cfg.governance, trigger_reason=trigger_reason,
                              workdir=workdir, device=device, teacher_model_name=cfg.teacher_model_name,
                              student_model_name=cfg.student_model_name, edge_model_name=cfg.edge_model_name,
                              threads=cfg.runtime.threads, mlflow_ui=cfg.tracking.ui_url.rstrip("/"),
                              prefect_ui=prefect_ui_url())
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
