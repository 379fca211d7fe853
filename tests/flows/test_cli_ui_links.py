"""Issue 23, `distill ui` and the links people click: its ports default to where those links point
(tracking.ui_url for links from Prefect into MLflow, PREFECT_UI_URL or 4200 for links from MLflow into the embedded
Prefect), and another port gets a note saying how to start it on the matching one. No server is started here
(tests/flows/test_cli_ui.py starts the real command)."""

from __future__ import annotations

from pathlib import Path

from prefect.settings import PREFECT_API_URL, PREFECT_UI_URL, temporary_settings
from typer.testing import CliRunner

from flows.cli_common import app
from flows.cli_ui import _link_notes, _link_targets, _local_port
from flows.config import TrackingConfig, load_config

ROOT = Path(__file__).resolve().parents[2]


def test_local_port():
    assert _local_port("http://127.0.0.1:5011/") == 5011 and _local_port("http://localhost") == 80
    assert _local_port("https://mlflow.example:5000") is None and _local_port("not a url") is None


def test_ports_default_to_where_the_links_point():
    tracking = load_config(ROOT / "configs" / "demo.yaml", ["tracking.ui_url=http://127.0.0.1:5011/"]).tracking
    with temporary_settings(restore_defaults={PREFECT_API_URL, PREFECT_UI_URL}):
        assert _link_targets(tracking) == ("http://127.0.0.1:5011", "http://127.0.0.1:4200")
    with temporary_settings(restore_defaults={PREFECT_API_URL}, updates={PREFECT_UI_URL: "http://127.0.0.1:4311"}):
        assert _link_targets(TrackingConfig()) == ("http://127.0.0.1:5000", "http://127.0.0.1:4311")
    # runs sent to a Prefect server link to that server's UI: nothing for `distill ui`'s own Prefect to match
    with temporary_settings(updates={PREFECT_API_URL: "http://prefect.example:4200/api"}):
        assert _link_targets(TrackingConfig())[1] is None


def test_another_port_says_how_to_start_on_the_one_the_links_use():
    assert _link_notes(4200, 5000, "http://127.0.0.1:5000", "http://127.0.0.1:4200") == []
    assert _link_notes(4311, 5011, "https://mlflow.example", None) == []  # not served here: nothing to match
    mlflow_note, prefect_note = _link_notes(4311, 5011, "http://127.0.0.1:5000", "http://127.0.0.1:4200")
    assert "point to the MLflow UI at http://127.0.0.1:5000 (tracking.ui_url)" in mlflow_note
    assert "start `distill ui --mlflow-port 5000`" in mlflow_note
    assert "set tracking.ui_url to http://127.0.0.1:5011" in mlflow_note
    assert "start `distill ui --prefect-port 4200`" in prefect_note
    assert "PREFECT_UI_URL=http://127.0.0.1:4311" in prefect_note


def test_a_missing_config_is_one_error_line():
    result = CliRunner().invoke(app, ["ui", "--config", "no-such.yaml"])
    assert result.exit_code == 2 and "config file not found: no-such.yaml" in result.output
