"""The architecture as tests: the import contracts of pyproject.toml (import-linter), module sizes, a thin flow."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MAX_MODULE_LINES = 450
TEMPLATE_EXEMPT = {"distill_gap/evaluation/html_report.py"}  # the HTML report template
MAX_FLOW_BODY_LINES = 50


def test_import_contracts_hold():
    """flows -> tasks -> distill_gap, never upwards, and no cycle between sibling packages or modules at any depth
    (function-local imports included): `lint-imports` reads the contracts from pyproject.toml."""
    lint = Path(sys.executable).parent / "lint-imports"
    result = subprocess.run([str(lint), "--no-cache"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert "Contracts: 2 kept, 0 broken." in result.stdout


def test_the_contract_catches_an_upward_import(tmp_path):
    """The contract is not vacuous: a library module importing a stage breaks it."""
    import shutil

    for name in ("distill_gap", "tasks", "flows"):
        shutil.copytree(ROOT / name, tmp_path / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    (tmp_path / "distill_gap" / "digest.py").write_text(
        (ROOT / "distill_gap" / "digest.py").read_text() + "\n\ndef _upward():\n    import tasks.data  # noqa: F401\n")
    lint = Path(sys.executable).parent / "lint-imports"
    result = subprocess.run([str(lint), "--no-cache"], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                            env={"PYTHONPATH": str(tmp_path), "PATH": str(Path(sys.executable).parent)})
    assert result.returncode != 0
    assert "distill_gap.digest -> tasks.data" in result.stdout


def test_no_module_over_450_lines():
    sizes = {str(p.relative_to(ROOT)): len(p.read_text().splitlines())
             for package in ("distill_gap", "tasks", "flows", "benchmarks", "tests")
             for p in (ROOT / package).rglob("*.py")}
    too_long = {p: n for p, n in sizes.items() if n > MAX_MODULE_LINES and p not in TEMPLATE_EXEMPT}
    assert not too_long, f"split these modules by concern: {too_long}"


def test_tasks_hold_only_stages_and_the_flow_body_fits_on_a_screen():
    stage_modules = sorted(p.stem for p in (ROOT / "tasks").glob("*.py") if p.stem != "__init__")
    assert stage_modules == ["attest", "data", "distill", "evaluate", "promote", "quantize", "register",
                             "soft_labels", "sweep", "teacher", "validate"]
    tree = ast.parse((ROOT / "flows" / "pipeline.py").read_text())
    flow = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "distill_pipeline")
    body_lines = flow.end_lineno - flow.body[0].end_lineno  # after the docstring
    assert body_lines <= MAX_FLOW_BODY_LINES, body_lines
