"""Edge folders of a tiny real BERT (ONNX, INC INT8, fp32) served by load_edge and `distill predict`,
from a folder and from a real MLflow SQLite registry (digest-verified)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from flows.cli import app
from distill_gap.edge.folder import EDGE_FILE
from distill_gap.edge.serving import load_edge, parse_rows
from distill_gap.errors import DistillError
from distill_gap.inference.inc_int8 import load_int8
from distill_gap.inference.onnx_runtime import onnx_predict_logits
from distill_gap.edge.inc_quantization import autotune_int8
from distill_gap.edge.onnx_export import export_onnx

from tests.conftest import LABELS
from tests.helpers import add_scope_guard

REPO = Path(__file__).resolve().parents[3]
MAX_LENGTH = 64


@pytest.fixture(scope="module")
def texts(review_frame):
    return review_frame["text"].tolist()[:48]


@pytest.fixture(scope="module")
def spread_model_dir(tiny_model_dir, texts, tmp_path_factory):
    """The tiny model with larger random weights and a centred head, so logits (and labels) vary by text."""
    from tests.helpers import spread_classifier

    return spread_classifier(tiny_model_dir, texts, tmp_path_factory.mktemp("spread-model"), max_length=MAX_LENGTH)


def _manifest(primary="onnx", **artifacts) -> dict:
    return {"format": 1, "primary": primary, "labels": LABELS, "max_length": MAX_LENGTH, "quantized": True,
            "artifacts": artifacts or {"onnx": {"path": "onnx", "runtime": "onnxruntime"},
                                       "int8": {"path": "int8", "runtime": "torch-pt2"},
                                       "fp32": {"path": "fp32", "runtime": "transformers"}}}


@pytest.fixture(scope="module")
def edge_dir(spread_model_dir, texts, tmp_path_factory):
    """An edge folder laid out as the quantize stage writes it: fp32 ONNX (primary), INC INT8 and fp32 HF."""
    edge = tmp_path_factory.mktemp("edge") / "edge"
    export_onnx(spread_model_dir, edge / "onnx", heldout_texts=texts[:8], max_length=MAX_LENGTH)
    autotune_int8(spread_model_dir, texts[:16], texts[:8], np.zeros(8, dtype=int), texts[:8], edge / "int8",
                  tolerable_loss=0.99, max_trials=1, candidates=["dynamic"], max_length=MAX_LENGTH)
    shutil.copytree(spread_model_dir, edge / "fp32")
    (edge / EDGE_FILE).write_text(json.dumps(_manifest(), indent=2))
    add_scope_guard(edge, texts)
    return edge


def _register(edge: Path, root: Path, name: str) -> tuple[str, str]:
    """Log `edge` as a run artifact on the SQLite store under `root`, sign it with the key pair in `root`/keys (as the
    pipeline signs every version), register it with its digest, alias champion.

    Returns (tracking URI, version source).
    """
    from flows.config import GovernanceConfig, TrackingConfig
    from distill_gap.digest import model_digest
    from distill_gap.registry.tracking import client_for, experiment_id
    from distill_gap.registry.versions import create_version, sign_and_log
    from tests.helpers import log_model_dir

    tracking = TrackingConfig(uri=f"sqlite:///{root}/mlflow.db", artifact_location=str(root / "mlartifacts"))
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        client = client_for(tracking)
        run_id = client.create_run(experiment_id(client, tracking)).info.run_id
        source = log_model_dir(client, run_id, edge, "edge")
        signed = sign_and_log(client, run_id, edge, "edge", GovernanceConfig(key_dir=str(root / "keys")))
        mv = create_version(client, name, source=source, run_id=run_id,
                            tags={"model.digest": model_digest(edge), **signed}, governance=GovernanceConfig())
        client.set_registered_model_alias(name, "champion", mv.version)
    return tracking.uri, source


@pytest.fixture(scope="module")
def registry_root(tmp_path_factory):
    return tmp_path_factory.mktemp("registry")


@pytest.fixture(scope="module")
def registry(edge_dir, registry_root):
    """Tracking URI of a SQLite store holding x-edge v1 @champion (the edge folder above)."""
    return _register(edge_dir, registry_root, "x-edge")[0]


@pytest.fixture()
def rows_file(texts, tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps({"id": f"r{i}", "text": t}) + "\n" for i, t in enumerate(texts[:6])))
    return path


@pytest.fixture()
def in_tmp(tmp_path, monkeypatch, registry_root):
    """Run from tmp_path, so the CLI's .distill/models cache starts empty and stays in the test's folder; the key
    pair that signed the registered versions is the operator's (DISTILL_KEY_DIR)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("DISTILL_KEY_DIR", str(registry_root / "keys"))
    return tmp_path


def _predict(*args):
    return CliRunner().invoke(app, ["predict", *map(str, args)])


def _jsonl(stdout: str) -> list[dict]:
    return [json.loads(line) for line in stdout.splitlines()]


# ----------------------------------------------------------------------------------------------------------------
# load_edge


def test_each_artifact_gives_the_logits_of_its_own_runtime(edge_dir, texts):
    from distill_gap.inference.batching import predict_logits
    from distill_gap.models.loading import load_classifier

    onnx = load_edge(edge_dir)
    assert (onnx.artifact, onnx.runtime, onnx.labels) == ("onnx", "onnxruntime", LABELS)
    reference = onnx_predict_logits(edge_dir / "onnx", texts, max_length=MAX_LENGTH)
    np.testing.assert_allclose(onnx.predict_logits(texts, batch_size=7), reference, atol=1e-5)
    assert np.bincount(reference.argmax(-1), minlength=3).min() > 0, "labels must vary for the checks to mean anything"

    int8 = load_edge(edge_dir, "int8").predict_logits(texts)
    np.testing.assert_allclose(int8, load_int8(edge_dir / "int8").predict_logits(texts), atol=1e-5)
    assert np.abs(int8 - reference).max() > 0  # a different artifact really ran
    model, tokenizer = load_classifier(edge_dir / "fp32")
    np.testing.assert_allclose(load_edge(edge_dir, "fp32").predict_logits(texts),
                               predict_logits(model, tokenizer, texts, max_length=MAX_LENGTH), atol=1e-5)


def test_predict_rows_gives_softmax_probabilities_and_echoes_ids(edge_dir, texts):
    from scipy.special import softmax

    edge = load_edge(edge_dir)
    rows = [{"id": "a", "text": texts[0]}, {"id": 7, "text": texts[1]}, {"id": None, "text": texts[2]}]
    out = edge.predict_rows(rows, out_of_scope="answer")  # this test is about probabilities (T = 1 here), not scope
    expected = softmax(onnx_predict_logits(edge_dir / "onnx", texts[:3], max_length=MAX_LENGTH).astype(np.float64), -1)
    assert [r["id"] for r in out] == ["a", 7, None] and {r["artifact"] for r in out} == {"onnx"}
    for r, p in zip(out, expected):
        assert list(r["probabilities"]) == LABELS
        np.testing.assert_allclose(list(r["probabilities"].values()), p, atol=1e-6)
        assert r["label"] == LABELS[int(p.argmax())]


def test_unknown_artifact_and_broken_manifests_are_refused(edge_dir, tmp_path):
    with pytest.raises(DistillError, match=r"(?s)no artifact 'onnx-int8'.*\['fp32', 'int8', 'onnx'\]"):
        load_edge(edge_dir, "onnx-int8")
    bad = tmp_path / "bad"
    bad.mkdir()
    with pytest.raises(DistillError, match=r"edge\.json does not exist.*\n  fix: re-run the quantize stage"):
        load_edge(bad)
    (bad / EDGE_FILE).write_text('{"format": 1, "primary": ')
    with pytest.raises(DistillError, match=r"edge\.json is not valid JSON"):
        load_edge(bad)
    (bad / EDGE_FILE).write_text(json.dumps(_manifest(primary="onnx-int8")))
    with pytest.raises(DistillError, match=r"primary 'onnx-int8' is not one of the artifacts"):
        load_edge(bad)
    (bad / EDGE_FILE).write_text(json.dumps(_manifest(onnx={"path": "onnx", "runtime": "tflite"})))
    with pytest.raises(DistillError, match=r"artifacts\.onnx needs a path and a runtime"):
        load_edge(bad)
    (bad / EDGE_FILE).write_text(json.dumps(_manifest(onnx={"path": "onnx", "runtime": "onnxruntime"})))
    with pytest.raises(DistillError, match=r"artifact 'onnx' is listed .* does not exist"):
        load_edge(bad)
    shutil.copytree(edge_dir / "onnx", bad / "onnx")
    manifest = _manifest(onnx={"path": "onnx", "runtime": "onnxruntime"})
    manifest["labels"] = ["neg", "neu", "pos"]
    (bad / EDGE_FILE).write_text(json.dumps(manifest))
    with pytest.raises(DistillError, match=r"lists labels \['neg', 'neu', 'pos'\] but artifact 'onnx' predicts"):
        load_edge(bad)


# ----------------------------------------------------------------------------------------------------------------
# input rows (model URIs: tests/distill_gap/registry/test_model_uri.py)


def test_parse_rows_checks_every_line_and_names_the_bad_ones():
    rows = parse_rows(['{"id": "a", "text": "fine"}\n', "\n", '{"text": "no id"}\n'])
    assert rows == [{"id": "a", "text": "fine"}, {"id": None, "text": "no id"}]
    with pytest.raises(DistillError, match=r"2 bad lines: line 2: not valid JSON .*; line 4: no \"text\""):
        parse_rows(['{"text": "ok"}', '{"text": "cut', '{"text": "ok"}', '{"id": 1}'], "rows.jsonl")
    with pytest.raises(DistillError, match=r"line 1: \"text\" must be a non-empty string"):
        parse_rows(['{"text": "  "}'])
    with pytest.raises(DistillError, match=r"line 1: expected a JSON object, got list"):
        parse_rows(['["text"]'])
    with pytest.raises(DistillError, match=r"line 1: \"id\" must be a string or an integer"):
        parse_rows(['{"id": {"a": 1}, "text": "x"}'])
    with pytest.raises(DistillError, match=r"input has no rows"):
        parse_rows(["", "  \n"])


# ----------------------------------------------------------------------------------------------------------------
# `distill predict`


def test_the_installed_command_predicts_stdin_rows_with_the_champion(registry, registry_root, texts, tmp_path):
    """Through the real console script and a pipe: rows on stdin, only JSONL on stdout, messages on stderr."""
    rows = "".join(json.dumps({"id": f"r{i}", "text": t}) + "\n" for i, t in enumerate(texts[:5]))
    env = {**{k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"},
           "DISTILL_KEY_DIR": str(registry_root / "keys")}
    # the alias was set by hand here (no signed promote Statement): served only when asked, with a warning
    proc = subprocess.run([str(REPO / ".venv/bin/distill"), "predict", "--model", "models:/x-edge@champion",
                           "--input", "-", "--tracking-uri", registry, "--allow-untrusted-alias"], input=rows,
                          capture_output=True, text=True, cwd=tmp_path, env=env, timeout=180)
    assert proc.returncode == 0, proc.stderr
    out = _jsonl(proc.stdout)
    assert [r["id"] for r in out] == [f"r{i}" for i in range(5)] and {r["artifact"] for r in out} == {"onnx"}
    assert all(abs(sum(r["probabilities"].values()) - 1) < 1e-6 for r in out)
    # in scope: labelled; outside the guard fitted on these texts' neighbours: abstains (the default)
    assert all(r["label"] in LABELS if r["in_scope"] else (r["label"], r["route"]) == (None, "fallback") for r in out)
    assert "x-edge v1 (@champion)" in proc.stderr and "verified" in proc.stderr
    assert "WARNING: x-edge v1 is @champion although its gates failed" in proc.stderr
    assert (tmp_path / ".distill" / "models").is_dir()  # fetched into the cache of the working folder


def test_predict_by_version_with_another_artifact_and_from_a_folder(registry, edge_dir, rows_file, in_tmp):
    out = _predict("--model", "models:/x-edge/1", "--input", rows_file, "--tracking-uri", registry,
                   "--artifact", "int8", "--batch-size", "4")
    assert out.exit_code == 0, out.stderr
    int8 = _jsonl(out.stdout)
    assert [r["id"] for r in int8] == [f"r{i}" for i in range(6)] and {r["artifact"] for r in int8} == {"int8"}
    # same batch size: dynamic INT8 takes its activation scales from each batch, so batches change the numbers
    out = _predict("--model", edge_dir, "--input", rows_file, "--artifact", "int8", "--batch-size", "4",
                   "--tracking-uri", "sqlite:///no.db")
    assert out.exit_code == 0, out.stderr
    assert _jsonl(out.stdout) == int8  # the folder offline and its registered copy answer alike


def test_predict_errors_exit_non_zero_with_nothing_on_stdout(registry, edge_dir, rows_file, in_tmp):
    bad_json = in_tmp / "bad.jsonl"
    bad_json.write_text('{"id": 1, "text": "fine"}\n{"id": 2, "text": \n')
    no_text = in_tmp / "no_text.jsonl"
    no_text.write_text('{"id": 1, "text": "fine"}\n{"id": 2, "body": "x"}\n')
    empty = in_tmp / "empty.jsonl"
    empty.write_text("\n")
    champion = "models:/x-edge/1"  # the input's problems, on a version that is served
    cases = [
        (["--model", "models:/x-edge@champion", "--input", rows_file], "the alias was moved by hand"),
        (["--model", "models:/x-edge", "--input", rows_file], "not a registry model URI"),
        (["--model", "models:/x-edge@staging", "--input", rows_file], "has no alias '@staging'"),
        (["--model", "models:/x-edge/9", "--input", rows_file], "has no version 9"),
        (["--model", champion, "--input", bad_json, "--strict"], "line 2: not valid JSON"),
        (["--model", champion, "--input", no_text, "--strict"], 'line 2: no "text"'),
        (["--model", champion, "--input", empty], "has no rows"),
        (["--model", champion, "--input", in_tmp / "missing.jsonl"], "does not exist"),
        (["--model", edge_dir, "--input", rows_file, "--artifact", "onnx-int8"], "no artifact 'onnx-int8'"),
        (["--model", champion, "--input", rows_file, "--tracking-uri", f"sqlite:///{in_tmp}/none.db"],
         "no MLflow store"),
    ]
    for args, message in cases:
        if "--tracking-uri" not in args:
            args = [*args, "--tracking-uri", registry]
        out = _predict(*args)
        assert out.exit_code == 2 and out.stdout == "", (args, out.stdout)
        assert message in out.stderr and "fix:" in out.stderr, (args, out.stderr)


def test_a_changed_byte_in_the_registered_artifact_is_refused(edge_dir, registry_root, rows_file, in_tmp):
    from urllib.parse import urlparse

    uri, source = _register(edge_dir, registry_root, "y-edge")
    stored = Path(urlparse(source).path) / "onnx" / "model.onnx"
    data = bytearray(stored.read_bytes())
    data[len(data) // 2] ^= 0x01
    stored.write_bytes(bytes(data))
    assert not (in_tmp / ".distill" / "models").exists()  # nothing cached: the download is what gets checked
    out = _predict("--model", "models:/y-edge/1", "--input", rows_file, "--tracking-uri", uri)
    assert out.exit_code == 2 and out.stdout == ""
    assert "y-edge version 1: downloaded files have digest" in out.stderr and "changed or damaged" in out.stderr
    assert not list((in_tmp / ".distill" / "models").iterdir())  # nothing damaged left in the cache


def test_scope_adds_in_scope_and_abstain_routes_out_of_scope_rows(edge_dir, rows_file, tmp_path, in_tmp):
    """The guard scope.json ships: calibrated probabilities, in_scope and scope_score on every row, abstention by
    default, --out-of-scope answer to label anyway; another artifact than the primary carries no guard."""
    from scipy.special import softmax

    from distill_gap.edge.guard import ScopeGuard

    folder = tmp_path / "scoped"
    shutil.copytree(edge_dir, folder)
    texts = [json.loads(x)["text"] for x in Path(rows_file).read_text().splitlines()]
    plain = load_edge(folder).predict_logits(texts).astype(np.float64)
    msp = softmax(plain, axis=-1).max(-1)
    threshold = float(np.median(msp))  # about half of the rows fall below it
    ScopeGuard("msp", threshold=threshold, tpr=0.95, temperature=2.0).write(folder)
    out = _predict("--model", folder, "--input", rows_file, "--tracking-uri", "sqlite:///no.db")
    assert out.exit_code == 0, out.stderr
    rows = _jsonl(out.stdout)
    assert [r["in_scope"] for r in rows] == [bool(m >= threshold) for m in msp]
    np.testing.assert_allclose([r["scope_score"] for r in rows], msp, rtol=1e-5)
    np.testing.assert_allclose([list(r["probabilities"].values()) for r in rows], softmax(plain / 2.0, axis=-1),
                               rtol=1e-5)  # calibrated: the temperature fitted on validation
    routed = [r for r in rows if not r["in_scope"]]
    assert routed and all(r["label"] is None and r["route"] == "fallback" for r in routed)  # abstains by default
    assert "out of scope by the msp guard (routed to fallback)" in out.stderr
    out = _predict("--model", folder, "--input", rows_file, "--tracking-uri", "sqlite:///no.db",
                   "--out-of-scope", "answer")
    answered = _jsonl(out.stdout)
    assert all(r["label"] in LABELS and r["route"] == "model" for r in answered)
    assert [r["in_scope"] for r in answered] == [r["in_scope"] for r in rows]
    # another artifact than the primary carries no guard: in_scope null rather than a wrong one
    out = _predict("--model", folder, "--input", rows_file, "--tracking-uri", "sqlite:///no.db", "--artifact", "int8")
    assert all(r["in_scope"] is None and r["label"] in LABELS for r in _jsonl(out.stdout))


def test_an_edge_folder_without_its_guard_refuses_to_abstain_silently(edge_dir, rows_file, tmp_path, in_tmp):
    folder = tmp_path / "unscoped"
    shutil.copytree(edge_dir, folder)
    (folder / "scope.json").unlink()
    out = _predict("--model", folder, "--input", rows_file, "--tracking-uri", "sqlite:///no.db")
    assert out.exit_code != 0 and "ships no scope.json" in out.stderr and "--out-of-scope answer" in out.stderr
    assert out.stdout == ""
    out = _predict("--model", folder, "--input", rows_file, "--tracking-uri", "sqlite:///no.db",
                   "--out-of-scope", "answer")
    assert out.exit_code == 0 and all(r["in_scope"] is None for r in _jsonl(out.stdout))


def test_a_row_naming_a_region_outside_the_scope_abstains_whatever_its_score(edge_dir, rows_file, tmp_path):
    """scope.json `regions`: a row that names a region the model never trained on (and no redistillation proved)
    is out of scope with the reason; a row naming a trained or added region, or none, is judged by its score."""
    from distill_gap.edge.guard import ScopeGuard

    folder = tmp_path / "regions"
    shutil.copytree(edge_dir, folder)
    regions = {"column": "condition", "trained": ["Pain"], "refused": [],
               "added": [{"region": "Acne", "outcome": "pass", "n": 80}]}
    ScopeGuard("msp", threshold=0.0, tpr=0.95, temperature=1.0, info={"regions": regions}).write(folder)
    text = json.loads(Path(rows_file).read_text().splitlines()[0])["text"]
    rows = tmp_path / "named.jsonl"
    rows.write_text("".join(json.dumps({"id": i, "text": text, **({"condition": c} if c else {})}) + "\n"
                            for i, c in enumerate(["Pain", "Acne", "Migraine", None])))
    out = _predict("--model", folder, "--input", rows, "--tracking-uri", "sqlite:///no.db")
    assert out.exit_code == 0, out.stderr
    got = _jsonl(out.stdout)
    assert [r["in_scope"] for r in got] == [True, True, False, True]  # every score passes threshold 0
    assert got[2]["label"] is None and got[2]["route"] == "fallback"
    assert got[2]["scope_reason"] == "condition 'Migraine' is not in the scope this model was proven on"
    assert all("scope_reason" not in r for r in got[:2] + got[3:])
    assert "1 out of scope by the msp guard or its regions (routed to fallback)" in out.stderr
    # a damaged regions record is an error, never a guard that lets every region in
    record = json.loads((folder / "scope.json").read_text())
    record["regions"] = {"column": "condition", "trained": "Pain", "added": []}
    (folder / "scope.json").write_text(json.dumps(record))
    out = _predict("--model", folder, "--input", rows, "--tracking-uri", "sqlite:///no.db")
    assert out.exit_code != 0 and "malformed regions record" in out.stderr
