"""drift-monitor and teacher-watch on bad input, through the real flows (Prefect test harness, MLflow on SQLite):
a clear message in the flow run and in the report artifact, no event, no retry."""

from __future__ import annotations

from pathlib import Path

import pytest

from flows.config import load_config
from distill_gap.errors import DistillError
from tests.helpers import fresh_mlflow_db

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]


def _artifact(key: str) -> str:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    with get_client(sync_client=True) as c:
        found = c.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])))
    return max(found, key=lambda a: a.created).data if found else ""


@pytest.fixture()
def config_path(tmp_path, mlflow_db_template):
    path = tmp_path / "tiny.yaml"
    text = (ROOT / "configs/tiny.yaml").read_text()
    uri = fresh_mlflow_db(mlflow_db_template, tmp_path)  # an empty store per test, without ~5 s of migrations
    path.write_text(text + f"\ntracking:\n  uri: {uri}\n  artifact_location: {tmp_path}/art\n")
    return str(path)


CASES = {
    "malformed": ('{"text": "fine"}\n{"text": \n', "line 2"),
    "rows without text": ('{"text": "fine"}\n{"label": "positive"}\n{"text": ""}\n', 'line 2: no "text"'),
    "empty": ("", "no rows"),
    "no champion yet": ("".join(f'{{"text": "review {i}"}}\n' for i in range(60)), "has no @champion yet"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_drift_monitor_bad_input_says_why_and_emits_nothing(prefect_api, config_path, tmp_path, case):
    from flows.monitor import drift_monitor

    body, message = CASES[case]
    sample = tmp_path / "production.jsonl"
    sample.write_text(body)
    with pytest.raises(DistillError) as err:
        drift_monitor(config_path=config_path, production=str(sample))
    assert message in str(err.value), str(err.value)
    report = _artifact("tiny-drift-report")
    assert report.startswith("**Drift not evaluated.**") and message in report


def test_teacher_watch_without_teacher_or_champion(prefect_api, config_path):
    from flows.monitor import teacher_watch

    with pytest.raises(DistillError, match="tiny-teacher has no @pinned version"):
        teacher_watch(config_path=config_path)


def test_review_check_emits_one_event_per_champion_past_its_review_date(prefect_api, tmp_path, tiny_model_dir,
                                                                         mlflow_db_template):
    """Issue 19: a scheduled check that acts. A champion whose review.due has passed (or that has none) gets a
    distill.review.due event naming its owner; one still within its review period gets none."""
    from datetime import date, timedelta

    from prefect.client.orchestration import get_client

    from flows.monitor import review_check
    from distill_gap.registry.tracking import client_for, experiment_id, mlflow_run
    from distill_gap.registry.versions import create_version
    from tests.helpers import fresh_mlflow_db, log_model_dir

    overrides = ["name=rv", f"tracking.uri={fresh_mlflow_db(mlflow_db_template, tmp_path)}",
                 f"tracking.artifact_location={tmp_path}/artifacts", f"governance.key_dir={tmp_path}/keys"]
    cfg = load_config(ROOT / "configs/tiny.yaml", overrides)
    client = client_for(cfg.tracking)
    with mlflow_run(client, experiment_id=experiment_id(client, cfg.tracking), run_name="register") as run_id:
        source = log_model_dir(client, run_id, tiny_model_dir, "m")
        for name in (cfg.edge_model_name, cfg.student_model_name):
            create_version(client, name, source=source, run_id=run_id, governance=cfg.governance, tags={})
            client.set_registered_model_alias(name, "champion", 1)
    assert review_check(config_path=str(ROOT / "configs/tiny.yaml"), overrides=overrides) == []  # due in 90 days
    overdue = (date.today() - timedelta(days=3)).isoformat()
    client.set_model_version_tag(cfg.edge_model_name, "1", "review.due", overdue)
    state = review_check(config_path=str(ROOT / "configs/tiny.yaml"), overrides=overrides, return_state=True)
    due = state.result()
    with get_client(sync_client=True) as prefect:  # the run says what it is in the Prefect UI's lists
        assert prefect.read_flow_run(state.state_details.flow_run_id).name == "tiny · review check"
    assert [(d["name"], d["version"], d["due"], d["days"], d["owner"]) for d in due] == \
        [(cfg.edge_model_name, 1, overdue, 3, cfg.governance.owner)]
    assert due[0]["event_id"] is not None
