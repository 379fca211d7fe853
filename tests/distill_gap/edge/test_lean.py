"""The lean edge runtime (onnxruntime + tokenizers + numpy) against the full one, on a real tiny ONNX edge folder
(fp32 ONNX and ONNX Runtime INT8 of a tiny BERT, the INT8 one primary as in the demo) with a real kNN guard:
tokens, logits, features and rows alike; nothing of the training stack imported; digest and guard refusals."""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from distill_gap.edge import lean
from distill_gap.edge.lean import load_lean, read_rows, stream_rows
from distill_gap.errors import DistillError
from distill_gap.evaluation.junk import JUNK_ROWS

from tests.conftest import LABELS

from tests.distill_gap.edge.conftest import LEAN_MAX_LENGTH as MAX_LENGTH

REPO = Path(__file__).resolve().parents[3]
HEAVY = ("torch", "transformers", "prefect", "mlflow", "sklearn", "scipy", "pandas")
# what a device copies: the lean module and the project modules it imports, nothing else of the project
DEVICE_MODULES = {"distill_gap", "distill_gap.errors", "distill_gap.digest", "distill_gap.edge",
                  "distill_gap.edge.guard", "distill_gap.edge.lean"}


@pytest.fixture(scope="module")
def texts(review_frame):
    """Reviews, and junk no review model was evaluated on (code, emoji, zero-width, 5 MB of one letter...)."""
    junk = [t for k, t in JUNK_ROWS.items() if k != "one letter, 5 MB"] + ["a" * 20_000]
    return review_frame["text"].tolist()[:40] + junk


def _rows(texts):
    return [{"id": f"r{i}", "text": t} for i, t in enumerate(texts)]


def _write_rows(path: Path, texts) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in _rows(texts)))
    return path


# ----------------------------------------------------------------------------------------------------------------
# parity with transformers' tokenizer, OnnxPredictor and EdgeModel


def test_tokens_are_those_of_transformers_autotokenizer(lean_edge_dir, texts):
    from transformers import AutoTokenizer

    path = lean_edge_dir / "onnx-int8"
    reference = AutoTokenizer.from_pretrained(path)
    tokenizer, pad_id = lean.load_tokenizer(path, MAX_LENGTH)
    expected = reference(texts, truncation=True, max_length=MAX_LENGTH)
    got = tokenizer.encode_batch(texts)
    assert [e.ids for e in got] == expected["input_ids"]
    assert [e.type_ids for e in got] == expected["token_type_ids"]
    assert [e.attention_mask for e in got] == expected["attention_mask"]
    assert max(len(e.ids) for e in got) == MAX_LENGTH  # the long texts were truncated, [SEP] kept last
    assert pad_id == reference.pad_token_id


@pytest.mark.parametrize("artifact", ["onnx-int8", "onnx"])
def test_logits_and_features_match_onnx_predictor(lean_edge_dir, texts, artifact):
    from distill_gap.inference.onnx_runtime import OnnxPredictor

    reference = OnnxPredictor(lean_edge_dir / artifact, max_length=MAX_LENGTH)
    want_logits, want_features = reference.predict_outputs(texts, batch_size=7)
    logits, features = load_lean(lean_edge_dir, artifact).predict_outputs(texts, batch_size=7)
    assert logits.shape == (len(texts), 3) and features.shape == want_features.shape
    np.testing.assert_allclose(logits, want_logits, atol=1e-5, rtol=0)
    np.testing.assert_allclose(features, want_features, atol=1e-5, rtol=0)
    assert len(set(logits.argmax(-1))) > 1, "labels must vary for the comparison to mean anything"


@pytest.mark.parametrize("out_of_scope", ["abstain", "answer"])
def test_rows_are_those_of_edge_model(lean_edge_dir, texts, out_of_scope):
    from distill_gap.edge.serving import load_edge

    rows = _rows(texts)
    edge = load_lean(lean_edge_dir)
    assert (edge.artifact, edge.runtime, edge.guard.detector) == ("onnx-int8", "onnxruntime", "knn")
    got = edge.predict_rows(rows, batch_size=8, out_of_scope=out_of_scope)
    assert got == load_edge(lean_edge_dir).predict_rows(rows, batch_size=8, out_of_scope=out_of_scope)
    outside = [r for r in got if r["in_scope"] is False]
    assert outside and len(outside) < len(rows), "the guard must put some rows out of scope, not all"
    assert all((r["label"] is None) == (out_of_scope == "abstain") for r in outside)
    # another artifact answers without a guard, as EdgeModel does
    other = load_lean(lean_edge_dir, "onnx").predict_rows(rows[:5])
    assert other == load_edge(lean_edge_dir, "onnx").predict_rows(rows[:5])
    assert all(r["in_scope"] is None and r["label"] in LABELS for r in other)


def test_rows_stream_out_chunk_by_chunk(lean_edge_dir, texts):
    edge = load_lean(lean_edge_dir)
    rows = _rows(texts[:10])
    writes = []

    class Sink(io.StringIO):
        def write(self, s):
            writes.append(s)
            return super().write(s)

    out = Sink()
    counts = stream_rows(edge, iter(rows), out, batch_size=3, chunk_rows=4)
    assert len(writes) == 3  # 4 + 4 + 2 rows, each chunk written when done
    expected = [r for i in range(0, 10, 4) for r in edge.predict_rows(rows[i:i + 4], batch_size=3)]
    assert [json.loads(line) for line in out.getvalue().splitlines()] == expected
    assert counts == {"rows": 10, "out_of_scope": sum(r["in_scope"] is False for r in expected),
                      "truncated": sum("truncated" in r for r in expected), "errors": 0}

    def failing():  # a source that fails after the first chunk: what was done is already out
        yield from rows[:4]
        raise DistillError("the input broke")

    out = io.StringIO()
    with pytest.raises(DistillError, match="the input broke"):
        stream_rows(edge, failing(), out, chunk_rows=4)
    assert len(out.getvalue().splitlines()) == 4


# ----------------------------------------------------------------------------------------------------------------
# what it imports


def test_the_lean_module_runs_without_the_training_stack(lean_edge_dir, texts, tmp_path):
    """`python -m distill_gap.edge.lean`'s main in a fresh interpreter: the rows EdgeModel gives, and not one of
    torch, transformers, Prefect, MLflow, sklearn, scipy or pandas loaded; of the project only the device files."""
    from distill_gap.digest import model_digest
    from distill_gap.edge.serving import load_edge

    rows_file = _write_rows(tmp_path / "rows.jsonl", texts)
    code = ("import json, sys\nimport distill_gap.edge.lean as lean\n"
            f"code = lean.main(['--folder', {str(lean_edge_dir)!r}, '--input', {str(rows_file)!r}, "
            f"'--digest', {model_digest(lean_edge_dir)!r}])\n"
            "print('MODULES', json.dumps(sorted(sys.modules)), file=sys.stderr)\nsys.exit(code)\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    modules = json.loads(proc.stderr.split("MODULES ", 1)[1])
    assert not [m for m in modules if m.split(".")[0] in HEAVY]
    assert {m for m in modules if m.startswith("distill_gap")} == DEVICE_MODULES
    expected = load_edge(lean_edge_dir).predict_rows(_rows(texts))
    assert [json.loads(line) for line in proc.stdout.splitlines()] == expected
    assert f"{len(texts)} rows labelled with onnx-int8 (onnxruntime)" in proc.stderr


def test_distill_predict_on_a_local_onnx_folder_imports_nothing_heavy(lean_edge_dir, texts, tmp_path):
    rows_file = _write_rows(tmp_path / "rows.jsonl", texts[:3])
    code = ("import json, sys\nfrom flows.cli import app\n"
            f"try:\n    app(['predict', '--model', {str(lean_edge_dir)!r}, '--input', {str(rows_file)!r}, "
            "'--tracking-uri', 'sqlite:///no.db'])\nexcept SystemExit as e:\n    assert not e.code, e.code\n"
            "print('MODULES', json.dumps(sorted(sys.modules)), file=sys.stderr)\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    modules = json.loads(proc.stderr.split("MODULES ", 1)[1])
    assert not [m for m in modules if m.split(".")[0] in HEAVY]
    assert [r["id"] for r in map(json.loads, proc.stdout.splitlines())] == ["r0", "r1", "r2"]


# ----------------------------------------------------------------------------------------------------------------
# refusals


def test_a_folder_whose_digest_differs_is_refused(lean_edge_dir, tmp_path, capsys):
    from distill_gap.digest import model_digest

    digest = model_digest(lean_edge_dir)
    assert load_lean(lean_edge_dir, digest=digest.upper()).artifact == "onnx-int8"
    folder = tmp_path / "changed"
    shutil.copytree(lean_edge_dir, folder)
    onnx = folder / "onnx-int8" / "model.onnx"
    data = bytearray(onnx.read_bytes())
    data[len(data) // 2] ^= 0x01
    onnx.write_bytes(bytes(data))
    with pytest.raises(DistillError, match=rf"has digest {model_digest(folder)}, not the expected {digest}"):
        load_lean(folder, digest=digest)
    rows_file = _write_rows(tmp_path / "rows.jsonl", ["fine"])
    assert lean.main(["--folder", str(folder), "--input", str(rows_file), "--digest", digest]) == 2
    out = capsys.readouterr()
    assert out.out == "" and "not the expected" in out.err and "fix: fetch the registered version again" in out.err


def test_a_primary_without_its_guard_is_refused_unless_answering(lean_edge_dir, tmp_path, capsys):
    folder = tmp_path / "unscoped"
    shutil.copytree(lean_edge_dir, folder)
    (folder / "scope.json").unlink()
    rows = _rows(["the tablets helped", "no change at all"])
    with pytest.raises(DistillError, match=r"ships no scope\.json(?s:.*)--out-of-scope answer"):
        load_lean(folder).predict_rows(rows)
    answered = load_lean(folder).predict_rows(rows, out_of_scope="answer")
    assert all(r["in_scope"] is None and r["scope_score"] is None and r["label"] in LABELS for r in answered)
    rows_file = _write_rows(tmp_path / "rows.jsonl", ["the tablets helped"])
    assert lean.main(["--folder", str(folder), "--input", str(rows_file)]) == 2
    out = capsys.readouterr()
    assert out.out == "" and "ships no scope.json" in out.err
    assert lean.main(["--folder", str(folder), "--input", str(rows_file), "--out-of-scope", "answer"]) == 0
    assert json.loads(capsys.readouterr().out)["in_scope"] is None


def test_strict_input_is_refused_whole_before_anything_is_predicted(lean_edge_dir, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": 1, "text": "fine"}\n{"id": 2, "text": \n{"id": 3, "text": "a\\ud800b"}\n')
    assert lean.main(["--folder", str(lean_edge_dir), "--input", str(bad), "--strict"]) == 2
    out = capsys.readouterr()
    assert out.out == ""
    assert f"error: {bad} line 2: not valid JSON" in out.err and "leave out --strict" in out.err
    assert len(out.err.strip().splitlines()) == 2  # the problem and the fix, no traceback
    with pytest.raises(DistillError, match="does not exist"):
        read_rows(tmp_path / "missing.jsonl")
    good = _write_rows(tmp_path / "good.jsonl", ["one", "two"])
    rows = read_rows(good, strict=True)  # checked now, read again as rows are taken
    good.write_text('{"text": "one"}\n{"text": \n')
    with pytest.raises(DistillError, match="good.jsonl line 2: not valid JSON"):
        list(rows)


def test_non_onnx_artifacts_and_broken_manifests_are_refused_as_load_edge_refuses_them(lean_edge_dir, tmp_path):
    from distill_gap.edge import folder as edge_folder
    from distill_gap.inference.predictor import RUNTIMES

    assert lean.RUNTIMES == RUNTIMES and (lean.EDGE_FILE, lean.EDGE_FORMAT) == (edge_folder.EDGE_FILE,
                                                                              edge_folder.EDGE_FORMAT)
    bad = tmp_path / "bad"
    bad.mkdir()
    good = json.loads((lean_edge_dir / "edge.json").read_text())
    manifests = ['{"format": 1, "primary": ', "[1]", json.dumps({**good, "format": 2, "labels": ["x"]}),
                 json.dumps({**good, "primary": "int8"}), json.dumps({**good, "max_length": 1}),
                 json.dumps({**good, "artifacts": {"onnx": {"path": "onnx", "runtime": "tflite"}}})]
    for text in manifests:
        (bad / "edge.json").write_text(text)
        with pytest.raises(DistillError) as want:
            edge_folder.read_manifest(bad)
        with pytest.raises(DistillError) as got:
            lean.read_manifest(bad)
        assert str(got.value) == str(want.value)
    artifacts = {**good["artifacts"], "int8": {"path": "int8", "runtime": "torch-pt2"}}
    (bad / "edge.json").write_text(json.dumps({**good, "artifacts": artifacts}))
    with pytest.raises(DistillError, match=r"artifact 'int8' of .* runs on torch-pt2, not onnxruntime"):
        load_lean(bad, "int8")
    with pytest.raises(DistillError, match=r"no artifact 'fp32'(?s:.*)choose one of \['int8', 'onnx', 'onnx-int8'\]"):
        load_lean(bad, "fp32")
    with pytest.raises(DistillError, match=r"artifact 'onnx-int8' is listed .* does not exist"):
        load_lean(bad)
