"""Issue 10, item 7: a malicious or damaged model folder is refused with a clear message, and no code runs.

Every entry point that takes a model folder from a user is tried with folders built from the tiny real BERT:
`distill teacher import DIR`, `distill teacher bootstrap` with `teacher.base: DIR`, a pretrained student
(`distill.student.kind: pretrained`, `distill.student.path: DIR`) and `distill predict --model EDGE_FOLDER`
(its transformers, torch.export and ONNX Runtime artifacts). Each payload writes a marker file when it runs;
test_the_payloads_are_live shows that each one does run when loaded the unsafe way, so "no marker" means
"no code ran". Registry: a fresh MLflow SQLite store, which must stay empty.
"""

from __future__ import annotations

import json
import pickle
import shutil
import zipfile
from pathlib import Path

import pytest
from typer.testing import CliRunner

from flows.cli import app
from distill_gap.errors import DistillError
from tests.conftest import LABELS

pytestmark = pytest.mark.reliability
ROOT = Path(__file__).resolve().parents[2]


class _RunsCode:
    """Unpickling this writes the marker: a stand-in for whatever an attacker would run."""

    def __init__(self, marker: Path):
        self.code = f"open({str(marker)!r}, 'w').write('code ran')"

    def __reduce__(self):
        return exec, (self.code,)


def _copy(tiny_model_dir: Path, root: Path, name: str) -> Path:
    folder = root / name
    shutil.copytree(tiny_model_dir, folder)
    return folder


def _edit_json(path: Path, **changes) -> None:
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def _build(tiny: Path, root: Path, marker: Path) -> dict[str, Path]:
    """One folder per kind of malicious or damaged model (all from the tiny BERT)."""
    code = f"open({str(marker)!r}, 'w').write('code ran')\n"
    d = {}
    # (a) pickles: next to the safetensors weights, in their place, and in a subfolder
    d["pickle weights"] = _copy(tiny, root, "pickle-weights")
    (d["pickle weights"] / "pytorch_model.bin").write_bytes(pickle.dumps(_RunsCode(marker)))
    d["pickle named safetensors"] = _copy(tiny, root, "pickle-named-safetensors")
    (d["pickle named safetensors"] / "model.safetensors").write_bytes(pickle.dumps(_RunsCode(marker)))
    d["nested pickle"] = _copy(tiny, root, "nested-pickle")
    (d["nested pickle"] / "checkpoint").mkdir()
    (d["nested pickle"] / "checkpoint" / "optimizer.pt").write_bytes(pickle.dumps(_RunsCode(marker)))
    # (b) remote code: an architecture that exists only in the folder's Python, and a tokenizer likewise
    d["remote model code"] = _copy(tiny, root, "remote-model-code")
    _edit_json(d["remote model code"] / "config.json", model_type="evil-bert", trust_remote_code=True,
               auto_map={"AutoConfig": "configuration_evil.EvilConfig",
                         "AutoModelForSequenceClassification": "modeling_evil.EvilForSequenceClassification"})
    (d["remote model code"] / "configuration_evil.py").write_text(code)
    (d["remote model code"] / "modeling_evil.py").write_text(code)
    d["remote tokenizer code"] = _copy(tiny, root, "remote-tokenizer-code")
    _edit_json(d["remote tokenizer code"] / "tokenizer_config.json", tokenizer_class="EvilTokenizer",
               auto_map={"AutoTokenizer": ["tokenization_evil.EvilTokenizer", None]})
    (d["remote tokenizer code"] / "tokenization_evil.py").write_text(code)
    # (c) config.json that disagrees with the weights
    d["hidden size"] = _copy(tiny, root, "hidden-size")
    _edit_json(d["hidden size"] / "config.json", hidden_size=64, intermediate_size=128)
    d["layer count"] = _copy(tiny, root, "layer-count")  # a third layer the file does not hold
    _edit_json(d["layer count"] / "config.json", num_hidden_layers=3)
    d["label count"] = _copy(tiny, root, "label-count")
    five = [f"class{i}" for i in range(5)]
    _edit_json(d["label count"] / "config.json", id2label=dict(enumerate(five)),
               label2id={l: i for i, l in enumerate(five)})
    # (d) damaged files
    d["truncated weights"] = _copy(tiny, root, "truncated-weights")
    weights = d["truncated weights"] / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    d["damaged config"] = _copy(tiny, root, "damaged-config")
    config = d["damaged config"] / "config.json"
    config.write_bytes(config.read_bytes()[:200])
    return d


# what the one error line must say, per folder
EXPECTED = {
    "pickle weights": "pickle-based weight files ['pytorch_model.bin']",
    "pickle named safetensors": "model.safetensors is not a readable safetensors file",
    "nested pickle": "pickle-based weight files ['checkpoint/optimizer.pt']",
    "remote model code": "config.json asks for remote code (auto_map, trust_remote_code); the folder ships Python "
                         "files ['configuration_evil.py', 'modeling_evil.py']",
    "remote tokenizer code": "tokenizer_config.json asks for remote code (auto_map); the folder ships Python files "
                             "['tokenization_evil.py']",
    "hidden size": "config.json does not match the weights",
    "layer count": "weight(s) of the model are not in the file (e.g. ['bert.encoder.layer.2.",
    "label count": "have another shape than config.json gives them (e.g. ['classifier.",
    "truncated weights": "model.safetensors is not a readable safetensors file (Error while deserializing header",
    "damaged config": "config.json is not valid JSON",
}
ALL = list(EXPECTED)
# A base model or a pretrained student gets a fresh head for data.labels: another label count is allowed there.
NEW_HEAD = [c for c in ALL if c != "label count"]


@pytest.fixture(scope="module")
def evil(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("malicious")
    marker = root / "CODE-RAN"
    return _build(Path(tiny_model_dir), root, marker), marker


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """Overrides pointing the config at an empty MLflow SQLite store."""
    tmp = tmp_path_factory.mktemp("malicious-registry")
    return [f"tracking.uri=sqlite:///{tmp}/mlflow.db", f"tracking.artifact_location={tmp}/artifacts"]


@pytest.fixture()
def in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return tmp_path


def _cli(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def _refused(result, expected: str) -> None:
    """Exit 2, one error line with the reason and a fix, no traceback."""
    assert result.exit_code == 2, (result.exit_code, result.output)
    assert expected in result.stderr, result.stderr
    assert result.stderr.count("error:") == 1 and "fix:" in result.stderr
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)  # not an escaped error


def _registry_untouched(store) -> None:
    """Nothing registered, no run left RUNNING."""
    from mlflow import MlflowClient

    uri = store[0].split("=", 1)[1]
    if not Path(uri.removeprefix("sqlite:///")).exists():
        return  # never even opened
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    assert client.search_registered_models() == []
    exps = [e.experiment_id for e in client.search_experiments()]
    assert not client.search_runs(exps, filter_string="attributes.status = 'RUNNING'")


def test_the_payloads_are_live(evil, tmp_path):
    """Control: loaded the unsafe way, each payload does write the marker (so its absence below means something)."""
    import runpy

    folders, marker = evil
    for load in (lambda: pickle.loads((folders["pickle weights"] / "pytorch_model.bin").read_bytes()),
                 lambda: runpy.run_path(str(folders["remote model code"] / "modeling_evil.py")),
                 lambda: runpy.run_path(str(folders["remote tokenizer code"] / "tokenization_evil.py"))):
        load()
        assert marker.exists()
        marker.unlink()


# ------------------------------------------------------------------------------------------------ the teacher


@pytest.mark.parametrize("case", ALL)
def test_teacher_import_refuses(evil, store, in_tmp, case):
    folders, marker = evil
    result = _cli("teacher", "import", folders[case], "--config", ROOT / "configs/tiny.yaml", "--license", "mit",
                  *[a for o in store for a in ("--set", o)])
    _refused(result, EXPECTED[case])
    assert not marker.exists(), "code from the model folder ran"
    _registry_untouched(store)


@pytest.mark.parametrize("case", NEW_HEAD)
def test_teacher_bootstrap_from_a_local_base_refuses(evil, store, in_tmp, case):
    folders, marker = evil
    result = _cli("teacher", "bootstrap", "--config", ROOT / "configs/tiny.yaml",
                  *[a for o in [*store, f"teacher.base={folders[case]}"] for a in ("--set", o)])
    _refused(result, EXPECTED[case])
    assert not marker.exists(), "code from the model folder ran"
    _registry_untouched(store)


# ------------------------------------------------------------------------------------------------ the student


@pytest.mark.parametrize("case", NEW_HEAD)
def test_pretrained_student_folder_refuses(evil, tiny_model_dir, case):
    from flows.config import load_config
    from tasks.distill import student_spec
    from distill_gap.models.loading import load_classifier
    from distill_gap.kd.students import build_student

    folders, marker = evil
    cfg = load_config(ROOT / "configs/tiny.yaml", ["distill.student.kind=pretrained",
                                                   f"distill.student.path={folders[case]}"])
    teacher, tokenizer = load_classifier(tiny_model_dir)
    with pytest.raises(DistillError) as err:
        build_student(teacher, tokenizer, student_spec(cfg.distill), labels=LABELS)
    assert EXPECTED[case] in str(err.value) and "\n  fix: " in str(err.value)
    assert not marker.exists(), "code from the model folder ran"


# ------------------------------------------------------------------------------------------------ distill predict


def _edge(folder: Path, artifact: Path, runtime: str) -> Path:
    """An edge folder whose one (primary) artifact is `artifact`."""
    name = {"transformers": "fp32", "torch-pt2": "int8", "onnxruntime": "onnx"}[runtime]
    shutil.copytree(artifact, folder / name)
    (folder / "edge.json").write_text(json.dumps({
        "format": 1, "primary": name, "labels": LABELS, "max_length": 64, "quantized": runtime != "transformers",
        "artifacts": {name: {"path": name, "runtime": runtime}}}))
    return folder


@pytest.fixture()
def rows(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text('{"id": "r1", "text": "the tablets helped"}\n{"id": "r2", "text": "made me dizzy"}\n')
    return path


def _predict(edge: Path, rows: Path):
    # these folders carry no scope guard (the tests are about what loading refuses): answer without one
    return _cli("predict", "--model", edge, "--input", rows, "--tracking-uri", "sqlite:///unused.db",
                "--out-of-scope", "answer")


def test_predict_serves_a_clean_edge_folder(tiny_model_dir, rows, in_tmp):
    """Control for the cases below: the same layout with the untouched model labels every row."""
    out = _predict(_edge(in_tmp / "clean", Path(tiny_model_dir), "transformers"), rows)
    assert out.exit_code == 0, out.output
    assert [json.loads(line)["id"] for line in out.stdout.splitlines()] == ["r1", "r2"]


@pytest.mark.parametrize("case", ALL)
def test_predict_refuses_a_malicious_transformers_artifact(evil, rows, in_tmp, case):
    folders, marker = evil
    out = _predict(_edge(in_tmp / "edge", folders[case], "transformers"), rows)
    _refused(out, EXPECTED[case])
    assert out.stdout == "" and not marker.exists()


@pytest.fixture(scope="module")
def torch_archives(tiny_model_dir, tmp_path_factory):
    """torch.export archives (model.pt2) of a real exported module: clean, and with a payload in each pickle path
    torch.export.load takes (the sample inputs, retried with plain pickle; an "opaque" constant, plain pickle)."""
    import io

    import torch

    root = tmp_path_factory.mktemp("pt2")
    marker = root / "CODE-RAN"
    clean = root / "clean.pt2"
    torch.export.save(torch.export.export(torch.nn.Linear(4, 3), (torch.randn(1, 4),)), clean)
    payload = io.BytesIO()
    torch.save({"inputs": _RunsCode(marker)}, payload)

    def rewrite(name: str, replace: dict, add: dict | None = None) -> Path:
        out = root / name
        with zipfile.ZipFile(clean) as src, zipfile.ZipFile(out, "w") as dst:
            for info in src.infolist():
                key = next((k for k in replace if info.filename.endswith(k)), None)
                dst.writestr(info, replace[key] if key else src.read(info.filename))
            prefix = src.namelist()[0].split("/")[0]
            for member, data in (add or {}).items():
                dst.writestr(f"{prefix}/{member}", data)
        return out

    archives = {
        "pickled sample inputs": (rewrite("inputs.pt2", {"sample_inputs/model.pt": payload.getvalue()}),
                                  "member", "holds pickled objects other than tensors (it references exec)"),
        "opaque constant": (rewrite("opaque.pt2", {"model_constants_config.json": json.dumps({"config": {"evil": {
            "path_name": "opaque_obj_0", "is_param": False, "use_pickle": True, "tensor_meta": None}}}).encode()},
            {"data/constants/opaque_obj_0": pickle.dumps(_RunsCode(marker))}),
                            "stores ['evil'] as pickled objects", "unpickling them could run code"),
    }
    truncated = root / "truncated.pt2"
    truncated.write_bytes(clean.read_bytes()[: clean.stat().st_size // 2])
    archives["truncated"] = (truncated, "is not a readable torch.export archive", "truncated or damaged")
    return archives, marker


def test_the_torch_archive_payloads_are_live(torch_archives):
    """Control: torch.export.load itself runs both payloads (it falls back to plain pickle)."""
    import torch

    archives, marker = torch_archives
    for case in ("pickled sample inputs", "opaque constant"):
        try:
            torch.export.load(archives[case][0])
        except Exception:  # noqa: BLE001 - the payload ran before the load failed on what it returned
            pass
        assert marker.exists(), case
        marker.unlink()


@pytest.mark.parametrize("case", ["pickled sample inputs", "opaque constant", "truncated"])
def test_predict_refuses_a_malicious_torch_export_artifact(torch_archives, tiny_model_dir, rows, in_tmp, case):
    archives, marker = torch_archives
    path, *expected = archives[case]
    int8 = in_tmp / "int8-src"
    shutil.copytree(tiny_model_dir, int8, ignore=shutil.ignore_patterns("*.safetensors"))
    shutil.copy2(path, int8 / "model.pt2")
    (int8 / "int8_meta.json").write_text(json.dumps({"labels": LABELS, "max_length": 64}))
    out = _predict(_edge(in_tmp / "edge", int8, "torch-pt2"), rows)
    for fragment in expected:
        assert fragment in out.stderr, out.stderr
    _refused(out, "model.pt2")
    assert out.stdout == "" and not marker.exists()


def test_predict_refuses_a_truncated_onnx_artifact_and_a_pickle_anywhere(tiny_model_dir, rows, in_tmp):
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 3])])
    data = helper.make_model(graph).SerializeToString()
    onnx_dir = in_tmp / "onnx-src"
    shutil.copytree(tiny_model_dir, onnx_dir, ignore=shutil.ignore_patterns("*.safetensors"))
    (onnx_dir / "model.onnx").write_bytes(data[: len(data) // 2])
    out = _predict(_edge(in_tmp / "edge", onnx_dir, "onnxruntime"), rows)
    _refused(out, "cannot be loaded with onnxruntime: InvalidProtobuf")
    assert out.stdout == ""

    # a pickle file anywhere in an edge folder is refused, even one no runtime would read
    edge = _edge(in_tmp / "edge2", Path(tiny_model_dir), "transformers")
    (edge / "reference.pkl").write_bytes(pickle.dumps({"not": "loaded"}))
    _refused(_predict(edge, rows), "pickle-based weight files ['reference.pkl']")
