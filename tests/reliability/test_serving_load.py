"""Issue 20: `distill predict` under load and faults, through the installed command in real processes.

- 8 predicts started at once on an empty model cache all succeed (each download in a folder of its own, renamed
  into place whole; before, two shared one `.partial` folder and one crashed in 3 of 7 trials);
- memory stays flat in the number of rows (rows read, predicted and written 256 at a time);
- a tracking server that goes away (a real `mlflow server` behind a TCP proxy that is taken down) is named as such
  after a bounded wait, and a pinned version is served from the local verified cache meanwhile;
- an alias moved by hand (no signed promote Statement, gates not passed) is refused before anything is fetched.
A real tiny ONNX edge folder with its kNN guard, signed with a real key pair and registered like the pipeline does.
"""

from __future__ import annotations

import json
import os
import subprocess
import threading
import time
from pathlib import Path

import pytest

from tests.conftest import LABELS
from tests.helpers import add_scope_guard, fresh_mlflow_db, log_model_dir, wait_http
from tests.reliability._tcp_proxy import TcpProxy, _free_port_below_ephemeral

pytestmark = [pytest.mark.reliability, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
DISTILL = ROOT / ".venv" / "bin" / "distill"
CONCURRENT = 8


@pytest.fixture(scope="module")
def onnx_edge(tiny_model_dir, review_frame, tmp_path_factory) -> Path:
    """An ONNX edge folder (primary onnx, checks passed) with its kNN guard, as quantize + evaluate write it."""
    from distill_gap.edge.onnx_export import export_onnx

    reviews = review_frame["text"].tolist()
    edge = tmp_path_factory.mktemp("serving-edge") / "edge"
    export_onnx(tiny_model_dir, edge / "onnx", heldout_texts=reviews[:8], max_length=64)
    (edge / "edge.json").write_text(json.dumps({
        "format": 1, "primary": "onnx", "labels": LABELS, "max_length": 64, "quantized": False,
        "artifacts": {"onnx": {"path": "onnx", "runtime": "onnxruntime", "ok": True}}}))
    add_scope_guard(edge, reviews[:80])
    return edge


def _register(tracking, edge: Path, key_dir: Path, name: str = "load-edge") -> None:
    """`edge` registered as `name` v1 @champion on `tracking`, signed with the key pair in `key_dir`."""
    from flows.config import GovernanceConfig
    from distill_gap.digest import model_digest
    from distill_gap.registry.tracking import client_for, experiment_id
    from distill_gap.registry.versions import create_version, sign_and_log

    client = client_for(tracking)
    run_id = client.create_run(experiment_id(client, tracking)).info.run_id
    source = log_model_dir(client, run_id, edge, "edge")
    signed = sign_and_log(client, run_id, edge, "edge", GovernanceConfig(key_dir=str(key_dir)))
    mv = create_version(client, name, source=source, run_id=run_id, governance=GovernanceConfig(),
                        tags={"model.digest": model_digest(edge), **signed})
    client.set_registered_model_alias(name, "champion", mv.version)


def _rows(path: Path, n: int) -> Path:
    words = "the tablets helped my pain but made me dizzy and tired so I stopped".split()
    with open(path, "w") as f:
        for i in range(n):
            f.write(json.dumps({"id": i, "text": " ".join(words[i % 5:i % 5 + 4 + i % 9])}) + "\n")
    return path


def _distill(args: list[str], cwd: Path, timeout: float = 300, **kwargs) -> tuple[subprocess.CompletedProcess, float]:
    """The installed command in a process of its own: (the finished process, its peak RSS in MB)."""
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    proc = subprocess.Popen([str(DISTILL), *map(str, args)], cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kwargs)
    timer = threading.Timer(timeout, proc.kill)
    timer.start()
    out, err = proc.stdout.read(), proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)
    timer.cancel()
    proc.returncode = os.waitstatus_to_exitcode(status)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err), usage.ru_maxrss / 1024


@pytest.fixture(scope="module")
def sqlite_registry(onnx_edge, tmp_path_factory, mlflow_db_template):
    from flows.config import TrackingConfig

    root = tmp_path_factory.mktemp("serving-registry")
    tracking = TrackingConfig(uri=fresh_mlflow_db(mlflow_db_template, root), artifact_location=str(root / "art"))
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        _register(tracking, onnx_edge, root / "keys")
    return tracking.uri, root / "keys" / "signing-key.pub.pem"


@pytest.mark.timeout(900)
def test_concurrent_predicts_on_an_empty_cache_all_succeed(sqlite_registry, tmp_path):
    uri, key = sqlite_registry
    rows = _rows(tmp_path / "rows.jsonl", 5)
    args = ["predict", "--model", "models:/load-edge/1", "--input", rows, "--tracking-uri", uri, "--public-key", key]
    results = [None] * CONCURRENT

    def one(i):
        results[i] = _distill(args, tmp_path)[0]  # one working folder: one empty .distill/models for all

    threads = [threading.Thread(target=one, args=(i,)) for i in range(CONCURRENT)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    failed = [(r.returncode, r.stderr[-800:]) for r in results if r.returncode != 0]
    assert not failed, failed
    assert all([json.loads(line)["id"] for line in r.stdout.splitlines()] == list(range(5)) for r in results)
    cache = tmp_path / ".distill" / "models"
    assert len([p for p in cache.iterdir() if p.is_dir()]) == 1  # one folder, no download folder left behind
    assert not [p.name for p in cache.iterdir() if p.name.startswith(".")]


def test_memory_stays_flat_in_the_number_of_rows(onnx_edge, tmp_path):
    """The edge folder itself (the registry is the other tests' subject: each predict from it imports MLflow, ~5 s):
    the rows are streamed the same way whatever the model came from."""
    peaks = {}
    for n in (500, 30_000):
        rows = _rows(tmp_path / f"rows{n}.jsonl", n)
        proc, peaks[n] = _distill(["predict", "--model", onnx_edge, "--input", rows, "--out-of-scope", "answer"],
                                  tmp_path)
        assert proc.returncode == 0, proc.stderr
        assert len(proc.stdout.splitlines()) == n
    assert peaks[30_000] - peaks[500] < 40, peaks  # 60x the rows; before, every row's tokens were held at once


@pytest.fixture()
def served_registry(onnx_edge, tmp_path):
    """A real `mlflow server` (SQLite, proxied artifacts) behind a TCP proxy that can be taken down; load-edge v1
    registered through it, signed. Yields (proxy, public key path)."""
    from flows.config import TrackingConfig

    port = _free_port_below_ephemeral()
    log = tmp_path / "mlflow-server.log"
    env = {**{k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"},
           "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    with open(log, "w") as out:
        server = subprocess.Popen([str(ROOT / ".venv/bin/mlflow"), "server", "--backend-store-uri",
                                   f"sqlite:///{tmp_path}/server.db", "--artifacts-destination", str(tmp_path / "art"),
                                   "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
                                  stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    proxy = TcpProxy(("127.0.0.1", port))
    try:
        wait_http(f"http://127.0.0.1:{port}/health", server, log, timeout=120)
        proxy.up()
        with pytest.MonkeyPatch.context() as mp:
            mp.delenv("MLFLOW_TRACKING_URI", raising=False)
            _register(TrackingConfig(uri=proxy.url), onnx_edge, tmp_path / "keys")
        yield proxy, tmp_path / "keys" / "signing-key.pub.pem"
    finally:
        proxy.stop()
        os.killpg(server.pid, 15)
        server.wait(timeout=30)


@pytest.mark.timeout(600)
def test_a_registry_outage_is_named_and_a_pinned_version_is_served_from_the_verified_cache(served_registry, tmp_path):
    proxy, key = served_registry
    rows = _rows(tmp_path / "rows.jsonl", 3)
    base = ["predict", "--input", rows, "--tracking-uri", proxy.url, "--public-key", key, "--registry-timeout", "2"]
    first, _ = _distill([*base, "--model", "models:/load-edge/1"], tmp_path)  # fetched and verified while up
    assert first.returncode == 0, first.stderr
    assert "signature and digest" in first.stderr and "verified" in first.stderr

    proxy.down()
    started = time.monotonic()
    alias, _ = _distill([*base, "--model", "models:/load-edge@champion"], tmp_path)
    assert time.monotonic() - started < 60  # bounded: the server's absence, not MLflow's 250 s of retries
    assert alias.returncode == 2 and alias.stdout == ""
    assert f"error: cannot reach the tracking server at {proxy.url}" in alias.stderr, alias.stderr
    assert "no alias" not in alias.stderr and "Traceback" not in alias.stderr

    pinned, _ = _distill([*base, "--model", "models:/load-edge/1"], tmp_path)
    assert pinned.returncode == 0, pinned.stderr
    assert [json.loads(line)["id"] for line in pinned.stdout.splitlines()] == [0, 1, 2]
    assert f"note: cannot reach the tracking server at {proxy.url}" in pinned.stderr
    assert "serving load-edge v1 from the local verified cache" in pinned.stderr

    other, _ = _distill([*base, "--model", "models:/load-edge/2"], tmp_path)  # never fetched: nothing to serve
    assert other.returncode == 2 and "no verified copy of load-edge v2" in other.stderr


def test_an_alias_moved_by_hand_is_refused_before_anything_is_fetched(chain, tmp_path):
    """tests/chain.py's x-edge v1 (insufficient evidence, no waiver) made @champion by hand, as in MLflow's UI."""
    client, keys = chain["client"], chain["keys"]
    client.set_registered_model_alias("x-edge", "champion", 1)
    rows = _rows(tmp_path / "rows.jsonl", 2)
    args = ["predict", "--model", "models:/x-edge@champion", "--input", rows, "--tracking-uri",
            client._tracking_client.tracking_uri, "--public-key", keys / "signing-key.pub.pem"]
    refused, _ = _distill(args, tmp_path)
    assert refused.returncode == 2 and refused.stdout == ""
    assert "error: x-edge v1 is @champion with insufficient evidence and no waiver: the alias was moved by hand" \
        in refused.stderr and "--allow-untrusted-alias" in refused.stderr
    assert not (tmp_path / ".distill" / "models").exists()  # refused before the download
    forced, _ = _distill([*args, "--allow-untrusted-alias"], tmp_path)
    assert "WARNING: x-edge v1 is @champion with insufficient evidence" in forced.stderr
