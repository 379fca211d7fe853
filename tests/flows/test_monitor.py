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
