"""Serving streams (issue 20): rows are read, predicted and written chunk by chunk; a line that cannot be predicted
gets an error record of its own in place (or, with --strict, stops the run with one line naming it); texts longer
than the model's window are flagged and counted; an artifact that did not pass its checks is served only when asked.
A real tiny ONNX edge folder (tests/distill_gap/edge/conftest.py), `distill predict` and `python -m ...lean`."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from distill_gap.edge import lean
from distill_gap.edge.lean import load_lean, read_rows, stream_rows
from distill_gap.errors import DistillError
from flows.cli import app

from tests.distill_gap.edge.conftest import LEAN_MAX_LENGTH

# good, bad JSON, empty text, a lone surrogate (escaped: valid JSON, no tokenizer encodes it), not an object, no text,
# a boolean id, good
LINES = ['{"id": "a", "text": "the tablets helped"}', '{"id": "b", "text": ', '{"id": "c", "text": "  "}',
         '{"id": "d", "text": "fine \\ud800 then"}', '["e"]', '{"id": "f", "body": "x"}',
         '{"id": true, "text": "odd id"}', '{"id": 8, "text": "made me dizzy"}']
ERRORS = {2: (None, "not valid JSON"), 3: ("c", '"text" must be a non-empty string'),
          4: ("d", '"text" is not valid Unicode (a lone surrogate at character 5)'),
          5: (None, "expected a JSON object, got list"), 6: ("f", 'no "text"'), 7: (None, '"id" must be a string')}


def _write(path: Path, lines) -> Path:
    path.write_text("".join(line + "\n" for line in lines))
    return path


def _predict(*args, **kwargs):
    return CliRunner().invoke(app, ["predict", *map(str, args), "--tracking-uri", "sqlite:///unused.db"], **kwargs)


def _check_error_records(records: list[dict]) -> None:
    assert len(records) == len(LINES)
    for number, record in enumerate(records, start=1):
        if number in ERRORS:
            rid, problem = ERRORS[number]
            assert set(record) == {"id", "line", "error"} and record["line"] == number, record
            assert record["id"] == rid and record["error"].startswith(problem), record
        else:
            assert record["label"] is not None or record["route"] == "fallback", record
    assert [r["id"] for r in records if "error" not in r] == ["a", 8]


def test_each_bad_line_gets_its_error_record_in_place_and_the_others_are_labelled(lean_edge_dir, tmp_path, capsys):
    rows = _write(tmp_path / "rows.jsonl", LINES)
    assert lean.main(["--folder", str(lean_edge_dir), "--input", str(rows)]) == 0
    out = capsys.readouterr()
    _check_error_records([json.loads(line) for line in out.out.splitlines()])
    assert "2 rows labelled with onnx-int8" in out.err and "6 lines could not be predicted" in out.err

    cli = _predict("--model", lean_edge_dir, "--input", rows)  # distill predict answers alike
    assert cli.exit_code == 0, cli.stderr
    assert [json.loads(line) for line in cli.stdout.splitlines()] == [json.loads(line) for line in out.out.splitlines()]
    assert "6 lines could not be predicted (error records)" in cli.stderr and "Traceback" not in cli.output


def test_strict_stops_at_the_first_bad_line_with_one_clear_message(lean_edge_dir, tmp_path):
    rows = _write(tmp_path / "rows.jsonl", LINES)
    out = _predict("--model", lean_edge_dir, "--input", rows, "--strict")
    assert out.exit_code == 2 and out.stdout == ""  # a file is checked whole first: nothing predicted
    assert out.stderr.startswith(f"error: {rows} line 2: not valid JSON") and "Traceback" not in out.output
    assert "leave out --strict" in out.stderr and len(out.stderr.strip().splitlines()) == 2  # problem, fix
    # stdin cannot be read twice: it stops at the bad line (chunks before it would already be answered)
    piped = _predict("--model", lean_edge_dir, "--input", "-", "--strict", input="\n".join(LINES) + "\n")
    assert piped.exit_code == 2 and "error: standard input line 2: not valid JSON" in piped.stderr
    assert piped.stdout == "" and "Traceback" not in piped.output


def test_a_file_of_bad_lines_only_is_answered_with_error_records_and_an_empty_one_is_refused(lean_edge_dir, tmp_path):
    out = _predict("--model", lean_edge_dir, "--input", _write(tmp_path / "bad.jsonl", LINES[1:3]))
    assert out.exit_code == 0 and [json.loads(line)["line"] for line in out.stdout.splitlines()] == [1, 2]
    empty = _predict("--model", lean_edge_dir, "--input", _write(tmp_path / "empty.jsonl", ["", " "]))
    assert empty.exit_code == 2 and "has no rows" in empty.stderr and empty.stdout == ""


def test_texts_longer_than_the_window_are_flagged_and_counted(lean_edge_dir, tmp_path):
    long_text = "the tablets helped " * 2_000  # ~6,000 tokens for a 64-token window
    rows = [{"id": "short", "text": "made me dizzy"}, {"id": "long", "text": long_text},
            {"id": "edge", "text": "x " * (LEAN_MAX_LENGTH - 2)}]  # exactly the window with [CLS] and [SEP]: not cut
    path = _write(tmp_path / "rows.jsonl", [json.dumps(r) for r in rows])
    out = _predict("--model", lean_edge_dir, "--input", path, "--out-of-scope", "answer")
    assert out.exit_code == 0, out.stderr
    got = {r["id"]: r for r in map(json.loads, out.stdout.splitlines())}
    assert got["long"]["truncated"] is True and "truncated" not in got["short"] and "truncated" not in got["edge"]
    assert f"1 longer than the model's {LEAN_MAX_LENGTH}-token window" in out.stderr


def test_rows_are_read_only_as_far_as_the_chunk_being_predicted(lean_edge_dir):
    """Memory flat in the input: when the first chunk is written, no more than one chunk has been read."""
    edge = load_lean(lean_edge_dir)
    taken, at_first_write = [], []

    def source():
        for i in range(50):
            taken.append(i)
            yield {"id": i, "line": i + 1, "text": f"row {i} of a long input"}

    class Sink(io.StringIO):
        def write(self, s):
            at_first_write.append(len(taken)) if not at_first_write else None
            return super().write(s)

    counts = stream_rows(edge, source(), Sink(), chunk_rows=8)
    assert at_first_write == [8] and counts["rows"] == 50


def test_read_rows_reads_a_file_lazily(tmp_path):
    path = _write(tmp_path / "rows.jsonl", ['{"text": "one"}', '{"text": "two"}'])
    rows = read_rows(path)
    path.write_text('{"text": "changed"}\n')  # nothing was read yet: the file as it is when the rows are taken
    assert [r["text"] for r in rows] == ["changed"]
    with pytest.raises(DistillError, match="does not exist"):
        read_rows(tmp_path / "missing.jsonl")


def test_an_artifact_that_failed_its_checks_is_served_only_when_asked(lean_edge_dir, tmp_path):
    folder = tmp_path / "edge"
    shutil.copytree(lean_edge_dir, folder)
    manifest = json.loads((folder / "edge.json").read_text())
    manifest["artifacts"]["onnx"].update(ok=False, check="disagrees with the fp32 student on 9% of validation rows")
    (folder / "edge.json").write_text(json.dumps(manifest))
    rows = _write(tmp_path / "rows.jsonl", LINES[:1])
    out = _predict("--model", folder, "--input", rows, "--artifact", "onnx")
    assert out.exit_code == 2 and out.stdout == ""
    assert "artifact 'onnx' of" in out.stderr and "did not pass its checks: disagrees" in out.stderr
    assert "--allow-failed-artifact" in out.stderr
    forced = _predict("--model", folder, "--input", rows, "--artifact", "onnx", "--allow-failed-artifact")
    assert forced.exit_code == 0 and json.loads(forced.stdout)["artifact"] == "onnx"
    assert "WARNING: serving artifact 'onnx', which did not pass its checks" in forced.stderr
    assert lean.main(["--folder", str(folder), "--input", str(rows), "--artifact", "onnx"]) == 2  # the device too
    manifest["artifacts"]["onnx-int8"].pop("ok")
    (folder / "edge.json").write_text(json.dumps(manifest))
    unrecorded = _predict("--model", folder, "--input", rows)
    assert unrecorded.exit_code == 0 and "records no checks for artifact 'onnx-int8'" in unrecorded.stderr


def test_messages_with_markup_in_paths_print_as_they_are(lean_edge_dir, tmp_path):
    odd = tmp_path / "[bold]x[red]"
    odd.mkdir()
    rows = _write(odd / "rows.jsonl", LINES[1:2])
    out = _predict("--model", lean_edge_dir, "--input", rows, "--strict")
    assert out.exit_code == 2 and f"{rows} line 1: not valid JSON" in out.stderr
