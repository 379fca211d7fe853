"""Issue 10, item 8: the promotion request delivered twice (at-least-once delivery: two deliveries at the same
time, and a late one after a newer version was promoted) changes the registry once. Real promote-edge flow
runs on a real Prefect API (test harness) with its global concurrency limit, MLflow on SQLite."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from flows.config import load_config

pytestmark = [pytest.mark.reliability, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def registry(tmp_path_factory, tiny_model_dir, prefect_api, mlflow_db_template):
    """dup-edge v1, v2, v3, all with passed gates; signing keys in a temporary folder."""
    from distill_gap.digest import model_digest
    from distill_gap.registry.tracking import client_for, experiment_id, mlflow_run
    from distill_gap.registry.versions import create_version
    from tests.helpers import fresh_mlflow_db, log_model_dir

    tmp = tmp_path_factory.mktemp("promotion-event")
    cfg = load_config(ROOT / "configs/tiny.yaml", [
        "name=dup", f"tracking.uri={fresh_mlflow_db(mlflow_db_template, tmp)}", f"tracking.artifact_location={tmp}/artifacts",
        f"governance.key_dir={tmp}/keys"])
    client = client_for(cfg.tracking)
    with mlflow_run(client, experiment_id=experiment_id(client, cfg.tracking), run_name="register") as run_id:
        source = log_model_dir(client, run_id, tiny_model_dir, "edge")
        for _ in range(3):
            create_version(client, cfg.edge_model_name, source=source, run_id=run_id, governance=cfg.governance,
                           tags={"gates.passed": "true", "model.digest": model_digest(tiny_model_dir)},
                           description="test accuracy 0.7; Verdict: all gates passed")
    return cfg, client


def _state(client, name: str) -> dict:
    """Everything a promotion changes: aliases, every version's tags and update time."""
    model = client.get_registered_model(name)
    return {"aliases": dict(model.aliases),
            "versions": {str(v.version): (dict(v.tags), v.last_updated_timestamp)
                         for v in client.search_model_versions(f"name='{name}'")}}


def _deliver(cfg, version: int, event_id: str, n: int) -> list[dict]:
    """`n` deliveries of one promotion request at the same moment, each its own promote-edge flow run."""
    from flows.promote import promote_edge

    results, errors, start = [None] * n, [], threading.Barrier(n)

    def one(i):
        try:
            start.wait()
            results[i] = promote_edge(cfg, version=version, reason=f"event {event_id}", request_id=event_id)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors, errors
    return results


def test_a_promotion_request_delivered_twice_changes_the_registry_once(registry):
    cfg, client = registry
    name = cfg.edge_model_name

    # two deliveries of event evt-1 (promote v2) at once: one acts, the other sees its result
    results = _deliver(cfg, 2, "evt-1", 2)
    assert sorted(r["changed"] for r in results) == [False, True], results
    assert [r["reason"] for r in results if not r["changed"]] == ["request already handled"]
    after_first = _state(client, name)
    assert after_first["aliases"] == {"challenger": 2, "champion": 2}
    assert after_first["versions"]["2"][0]["promotion.request_id"] == "evt-1"

    # a newer version is promoted by another event; then evt-1 arrives once more, late
    assert _deliver(cfg, 3, "evt-2", 1)[0]["changed"]
    after_second = _state(client, name)
    assert after_second["aliases"]["champion"] == 3
    late = _deliver(cfg, 2, "evt-1", 1)[0]
    assert not late["changed"] and late["reason"] == "request already handled"
    assert _state(client, name) == after_second  # the late duplicate did not bring v2 back

    # one promotion statement per request carried out, not per delivery
    runs = client.search_runs([client.get_experiment_by_name(cfg.tracking.experiment).experiment_id],
                              filter_string="tags.`distill.stage` = 'promote'")
    statements = [a.path for r in runs for a in client.list_artifacts(r.info.run_id, "attestations")]
    assert len(runs) == 4 and len(statements) == 2, statements
