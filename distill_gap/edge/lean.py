"""The lean edge runtime: an edge folder's ONNX artifact on onnxruntime, tokenizers and numpy alone, with its
scope guard and calibration; JSONL rows in, JSONL rows out exactly as `distill predict` writes them.

`distill predict` runs it whenever the chosen artifact's runtime is "onnxruntime"; EdgeModel (serving.py) keeps the
torch runtimes. Imports: stdlib, numpy, onnxruntime, tokenizers, and errors.py, digest.py, edge/guard.py of this
project; never torch, transformers, Prefect, MLflow, scipy, sklearn or pandas. On a device (Python >= 3.10):

    pip install onnxruntime tokenizers numpy
    # these six files of the repository, in their folders: distill_gap/{__init__,errors,digest}.py and
    # distill_gap/edge/{__init__,guard,lean}.py
    python -m distill_gap.edge.lean --folder edge/ --input rows.jsonl --digest <model.digest> > labels.jsonl

--digest: the version's `model.digest` tag (`distill lineage --json`); a folder that differs is refused first.
Rows are read, predicted and written 256 at a time (memory stays flat); a line that cannot be predicted gets an
error record, or stops the run with --strict. Nothing in the folder runs as code."""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import sys
from pathlib import Path
from typing import Iterable, Iterator, Sequence, TextIO

import numpy as np

from distill_gap.digest import model_digest
from distill_gap.edge.guard import SCOPE_FILE, ScopeGuard, read_guard, softmax
from distill_gap.errors import DistillError, read_json_object

EDGE_FILE, EDGE_FORMAT = "edge.json", 1  # the format distill_gap/edge/folder.py writes
RUNTIMES = ("onnxruntime", "torch-pt2", "transformers")  # what edge.json may name (inference/predictor.py)
LEAN_RUNTIME = "onnxruntime"
ONNX_FILE, TOKENIZER_FILE = "model.onnx", "tokenizer.json"
LOGITS_OUTPUT, FEATURES_OUTPUT = "logits", "features"  # graph outputs, read by name (inference/onnx_runtime.py)
OUT_OF_SCOPE = ("abstain", "answer")  # what predictions do with rows the guard puts outside the evaluated scope
CHUNK_ROWS = 256  # rows predicted and written at a time: memory stays flat however long the input is
ROW_EXAMPLE = '{"id": "r1", "text": "the tablets helped"}'
# graph input -> the tokenizers Encoding attribute that feeds it (the names optimum exports)
_ENCODING_FIELDS = {"input_ids": "ids", "attention_mask": "attention_mask", "token_type_ids": "type_ids"}


# ----------------------------------------------------------------------------------------------------------------
# JSONL input rows


def decode_json_line(line: bytes | str) -> tuple[dict | None, str | None]:
    """One JSONL line as an object, or why it is not one (not UTF-8, not JSON, not an object)."""
    try:
        row = json.loads(line.decode("utf-8") if isinstance(line, bytes) else line)
    except UnicodeDecodeError:
        return None, "not UTF-8"
    except json.JSONDecodeError as err:
        return None, f"not valid JSON ({err.msg} at column {err.colno})"
    if not isinstance(row, dict):
        return None, f"expected a JSON object, got {type(row).__name__}"
    return row, None


def _row_problem(row: dict) -> str | None:
    text = row.get("text")
    if not isinstance(text, str) or not text.strip():
        return 'no "text" (a non-empty string)' if "text" not in row else '"text" must be a non-empty string'
    try:  # JSON may escape a lone surrogate (\ud800); no tokenizer can encode one
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        return f'"text" is not valid Unicode (a lone surrogate at character {err.start})'
    if not _plain_id(row.get("id")):
        return '"id" must be a string or an integer'
    return None


def _plain_id(value) -> bool:
    return value is None or (isinstance(value, (str, int)) and not isinstance(value, bool))


def numbered_rows(lines: Iterable[bytes | str]) -> Iterator[dict]:
    """Per non-blank line: {"line", "id", "text", "meta"} (its other string fields), or {"line", "id", "error"} saying why it cannot be predicted."""
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        row, problem = decode_json_line(line)
        problem = problem or _row_problem(row)
        rid = row.get("id") if row is not None and _plain_id(row.get("id")) else None
        meta = {k: v for k, v in (row or {}).items() if k not in ("id", "text") and isinstance(v, str)}  # regions
        yield {"line": number, "id": rid, **({"error": problem} if problem else {"text": row["text"], "meta": meta})}


def strict_rows(rows: Iterable[dict], source: str = "input") -> Iterator[dict]:
    """numbered_rows' rows, stopping with a DistillError naming the first line that cannot be predicted."""
    for row in rows:
        if "error" in row:
            raise DistillError(f"{source} line {row['line']}: {row['error']}",
                               f"write one JSON object per line, like {ROW_EXAMPLE}, or leave out --strict to give "
                               "such a line an error record of its own and go on")
        yield row


def read_rows(path: str | Path, *, strict: bool = False) -> Iterator[dict]:
    """The rows of a JSONL file (or stdin, '-') as numbered_rows gives them, read as they are taken: memory stays
    flat however long the input. `strict`: a file is checked whole first, so a bad line stops the run before
    anything is predicted; stdin stops at its first bad line (earlier chunks are already answered)."""
    stdin = str(path) == "-"
    source = "standard input" if stdin else str(path)
    if not stdin and not Path(path).is_file():
        raise DistillError(f"input file {path} does not exist", "pass a JSONL file, or --input - to read stdin")
    if strict and not stdin:
        with open(path, "rb") as f:
            sum(1 for _ in strict_rows(numbered_rows(f), source))  # raises at the first bad line

    def rows() -> Iterator[dict]:
        with (contextlib.nullcontext(sys.stdin.buffer) if stdin else open(path, "rb")) as f:
            yield from strict_rows(numbered_rows(f), source) if strict else numbered_rows(f)

    return rows()


# ----------------------------------------------------------------------------------------------------------------
# rows out: what every runtime answers (EdgeModel.predict_rows uses these too)


def check_answerable(folder: Path, guard: ScopeGuard | None, primary: bool, out_of_scope: str) -> None:
    """Refuse an unknown out_of_scope, and a primary artifact without its guard unless the caller answers."""
    if out_of_scope not in OUT_OF_SCOPE:
        raise DistillError(f"out_of_scope={out_of_scope!r} is not an option", f"use one of {list(OUT_OF_SCOPE)}")
    if guard is None and out_of_scope == "abstain" and primary:
        raise DistillError(f"{folder} ships no {SCOPE_FILE}: without its scope guard no row can be "
                           "checked against what the model was evaluated on",
                           "run the pipeline again (evaluate writes the guard), or pass --out-of-scope answer "
                           "to label every row without a scope check")


def label_rows(rows: Sequence[dict], logits: np.ndarray, features: np.ndarray | None, *, labels: list[str],
               artifact: str, guard: ScopeGuard | None, out_of_scope: str,
               truncated: Sequence[bool] | None = None) -> list[dict]:
    """One {"id", "label", "probabilities": {label: p}, "artifact", "in_scope", "scope_score", "route"} per row
    from logits (N, C) and features (N, D) or None: calibrated with a guard, out-of-scope rows labelled null and
    routed to "fallback" unless `out_of_scope` is "answer"; without a guard, raw softmax and `in_scope: null`.
    A row whose text was cut to the model's window (`truncated`) also gets `"truncated": true`."""
    probs, scores, inside, regions = softmax(logits), [None] * len(rows), [None] * len(rows), [None] * len(rows)
    if guard is not None:
        probs = guard.probabilities(logits)  # (N, C) float64, calibrated: each row sums to 1 in JSON
        raw = guard.score(logits, features, [str(r.get("text", "")) for r in rows])
        scores, regions = [float(v) for v in raw], guard.outside_regions(rows)  # a region outside: out of scope
        inside = [bool(v) and r is None for v, r in zip(guard.in_scope(raw), regions)]
    out, truncated = [], truncated if truncated is not None else [False] * len(rows)
    for row, p, score, ok, cut, why in zip(rows, probs, scores, inside, truncated, regions):
        answer = ok is not False or out_of_scope == "answer"
        out.append({"id": row.get("id"), "label": labels[int(p.argmax())] if answer else None,
                    "probabilities": {label: float(v) for label, v in zip(labels, p)},
                    "artifact": artifact, "in_scope": ok, "scope_score": score,
                    "route": "model" if answer else "fallback", **({"truncated": True} if cut else {}),
                    **({"scope_reason": why} if why else {})})  # the region named is outside the scope
    return out


def stream_rows(edge, rows: Iterable[dict], out: TextIO, *, batch_size: int = 32, out_of_scope: str = "abstain",
                chunk_rows: int = CHUNK_ROWS) -> dict:
    """Label `rows` with `edge` (anything with EdgeModel's predict_rows) `chunk_rows` at a time, writing each
    chunk's JSONL to `out` as soon as it is done, in input order; a row with an "error" (numbered_rows) is written
    as {"id", "line", "error"}. Returns the counts {"rows", "out_of_scope", "truncated", "errors"}.

    Batches are formed within a chunk: a dynamic-INT8 artifact, whose activation scales depend on its batch,
    answers a long input as it would answer it in chunks of `chunk_rows`.
    """
    counts, rows = {"rows": 0, "out_of_scope": 0, "truncated": 0, "errors": 0}, iter(rows)
    for chunk in iter(lambda: list(itertools.islice(rows, chunk_rows)), []):
        good = [r for r in chunk if "error" not in r]
        answered = iter(edge.predict_rows(good, batch_size=batch_size, out_of_scope=out_of_scope) if good else [])
        results = [{"id": r.get("id"), "line": r.get("line"), "error": r["error"]} if "error" in r
                   else next(answered) for r in chunk]
        out.write("".join(json.dumps(r) + "\n" for r in results))
        out.flush()
        counts["rows"] += len(good)
        counts["errors"] += len(chunk) - len(good)
        counts["out_of_scope"] += sum(r.get("in_scope") is False for r in results)
        counts["truncated"] += sum(bool(r.get("truncated")) for r in results)
    return counts


def summary(counts: dict, edge, out_of_scope: str, source: str = "input") -> str:
    """The one line a run ends with on stderr: rows labelled, out of scope, truncated, error records."""
    if not counts["rows"] and not counts["errors"]:
        raise DistillError(f"{source} has no rows", f"write one JSON object per line, like {ROW_EXAMPLE}")
    guard, parts = edge.guard, [f"{counts['rows']} rows labelled with {edge.artifact} ({edge.runtime})"]
    by = guard and f"the {guard.detector} guard" + " or its regions" * bool(guard.region_column)
    parts.append(f"{counts['out_of_scope']} out of scope by {by} "
                 f"({'routed to fallback' if out_of_scope == 'abstain' else 'answered'})" if guard is not None
                 else "no scope guard for this artifact: in_scope is null")
    parts += [f"{counts['truncated']} longer than the model's {edge.max_length}-token window, cut to it "
              '("truncated": true)'] if counts["truncated"] else []
    parts += [f"{counts['errors']} lines could not be predicted (error records)"] if counts["errors"] else []
    return "; ".join(parts)


# ----------------------------------------------------------------------------------------------------------------
# edge.json (the checks of distill_gap/edge/folder.read_manifest, repeated so that no torch-side module loads)


def read_manifest(folder: str | Path) -> dict:
    """edge.json of `folder`, checked: format, labels, artifacts with a known runtime, primary among them."""
    path = Path(folder) / EDGE_FILE
    fix = "re-run the quantize stage, which writes edge.json next to the artifacts"
    if not path.is_file():
        raise DistillError(f"{path} does not exist: {folder} is not an edge model folder", fix)
    manifest = read_json_object(path, fix)
    problems = []
    if manifest.get("format") != EDGE_FORMAT:
        problems.append(f"format is {manifest.get('format')!r}, this version reads format {EDGE_FORMAT}")
    labels = manifest.get("labels")
    if not (isinstance(labels, list) and len(labels) >= 2 and all(isinstance(l, str) and l for l in labels)):
        problems.append("labels must be a list of at least two label names")
    if not (isinstance(manifest.get("max_length", 128), int) and manifest.get("max_length", 128) >= 2):
        problems.append("max_length must be an integer >= 2")
    artifacts = manifest.get("artifacts")
    if not (isinstance(artifacts, dict) and artifacts):
        problems.append("artifacts must map artifact names to {\"path\": ..., \"runtime\": ...}")
        artifacts = {}
    for name, spec in artifacts.items():
        if not (isinstance(spec, dict) and isinstance(spec.get("path"), str) and spec.get("runtime") in RUNTIMES):
            problems.append(f"artifacts.{name} needs a path and a runtime in {list(RUNTIMES)}")
    if artifacts and manifest.get("primary") not in artifacts:
        problems.append(f"primary {manifest.get('primary')!r} is not one of the artifacts {sorted(artifacts)}")
    if problems:
        raise DistillError(f"{path} is malformed: " + "; ".join(problems), fix)
    return manifest


def chosen_artifact(folder: str | Path, artifact: str | None = None) -> tuple[str, dict, dict]:
    """(name, its edge.json entry, the manifest) of `artifact`, or of the primary one when None."""
    manifest = read_manifest(folder)
    artifacts, name = manifest["artifacts"], artifact or manifest["primary"]
    if name not in artifacts:
        raise DistillError(f"{folder} has no artifact {name!r}",
                           f"choose one of {sorted(artifacts)} (primary: {manifest['primary']})")
    return name, artifacts[name], manifest


def check_servable(folder: str | Path, artifact: str | None = None, allow_failed: bool = False) -> str | None:
    """The artifact served must have passed the quantize stage's checks (edge.json "ok"): one that failed is refused
    unless `allow_failed`, and then a warning comes back for stderr; a note when edge.json records no checks."""
    name, spec, _ = chosen_artifact(folder, artifact)
    if "ok" not in spec:
        return f"note: {folder}/{EDGE_FILE} records no checks for artifact {name!r} (not written by the quantize stage)"
    if spec["ok"] is True:
        return None
    why = f"{spec.get('check') or 'failed its checks against the fp32 student'}"
    if not allow_failed:
        raise DistillError(f"artifact {name!r} of {folder} did not pass its checks: {why}",
                           "serve the primary artifact (leave out --artifact), or pass --allow-failed-artifact to "
                           "serve it anyway, knowingly")
    return f"WARNING: serving artifact {name!r}, which did not pass its checks ({why}): --allow-failed-artifact"


def artifact_dir(folder: Path, name: str, spec: dict) -> Path:
    """The artifact's folder, inside the edge folder and present."""
    path = (folder / spec["path"]).resolve()
    if not path.is_relative_to(folder.resolve()):
        raise DistillError(f"{folder / EDGE_FILE}: artifact {name!r} points outside the edge folder ({spec['path']})",
                           "artifact paths are relative to the edge folder")
    if not path.is_dir():
        raise DistillError(f"artifact {name!r} is listed in {folder / EDGE_FILE} but {path} does not exist",
                           "the edge folder is incomplete; fetch or export it again, or choose another --artifact")
    return path


def verify_digest(folder: str | Path, expected: str) -> str:
    """The folder's model digest (the registry's model.digest tag), or DistillError when it is not `expected`."""
    got = model_digest(folder)
    if got != expected.strip().lower():
        raise DistillError(f"{folder} has digest {got}, not the expected {expected.strip()}: its files were changed "
                           "or damaged, or it is another version",
                           "fetch the registered version again (distill predict --model models:/<name>-edge/<N> "
                           "downloads and verifies it) and copy that folder to the device")
    return got


# ----------------------------------------------------------------------------------------------------------------
# the ONNX artifact


def _json_object(path: Path) -> dict:
    return read_json_object(path, "copy or export the edge folder again") if path.is_file() else {}


def load_tokenizer(path: Path, max_length: int):
    """tokenizer.json as transformers' AutoTokenizer applies it with truncation=True, max_length: the same special
    tokens and type ids, truncated on tokenizer_config's side, no padding (pad_batch pads); plus its pad id."""
    from tokenizers import Tokenizer

    if not (path / TOKENIZER_FILE).is_file():
        raise DistillError(f"no {TOKENIZER_FILE} in {path}: the lean runtime reads fast tokenizers only",
                           "export the edge folder again (the export copies tokenizer.json next to model.onnx)")
    tokenizer = Tokenizer.from_file(str(path / TOKENIZER_FILE))
    config = _json_object(path / "tokenizer_config.json")
    tokenizer.no_padding()
    tokenizer.enable_truncation(max_length, stride=0, strategy="longest_first",
                                direction=config.get("truncation_side", "right"))
    pad_id = None
    for source in (config, _json_object(path / "special_tokens_map.json")):
        pad = source.get("pad_token")
        pad = pad.get("content") if isinstance(pad, dict) else pad
        if isinstance(pad, str) and pad_id is None:
            pad_id = tokenizer.token_to_id(pad)
    return tokenizer, pad_id or 0  # transformers: `tokenizer.pad_token_id or 0`


def length_sorted_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Index batches of similar length, so padding per batch stays small (inference/batching.py's order)."""
    order = np.argsort(np.asarray(lengths), kind="stable")
    return [order[i:i + batch_size].tolist() for i in range(0, len(order), batch_size)]


def pad_batch(encodings: Sequence, idx: Sequence[int], pad_id: int, keys: Sequence[str]) -> dict[str, np.ndarray]:
    """Rows `idx` as right-padded (B, T) int64 arrays per graph input, T = the longest row."""
    width = max(len(encodings[i].ids) for i in idx)
    out = {}
    for key in keys:
        arr = np.full((len(idx), width), pad_id if key == "input_ids" else 0, dtype=np.int64)
        for r, i in enumerate(idx):
            values = getattr(encodings[i], _ENCODING_FIELDS[key])
            arr[r, :len(values)] = values
        out[key] = arr
    return out


class LeanEdge:
    """An edge folder's ONNX artifact on onnxruntime + tokenizers: logits, features and labelled rows, as
    EdgeModel gives them. The guard (and the temperature) apply to the primary artifact only."""

    runtime = LEAN_RUNTIME

    def __init__(self, folder: Path, artifact: str, labels: list[str], max_length: int, primary: bool,
                 path: Path, threads: int | None = None):
        import onnxruntime as ort

        self.folder, self.artifact, self.labels, self.max_length = folder, artifact, labels, max_length
        self.primary = primary
        if not (path / ONNX_FILE).is_file():
            raise DistillError(f"no {ONNX_FILE} in {path}", "run the ONNX export stage first or fix the path")
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in ort.get_available_providers()]
        try:
            self.session = ort.InferenceSession(str(path / ONNX_FILE), options, providers=providers)
        except Exception as err:  # noqa: BLE001 - ONNX Runtime's own types (InvalidProtobuf, ...) for a damaged file
            raise DistillError(f"{path} cannot be loaded with onnxruntime: {type(err).__name__}: {str(err)[:300]}",
                               "the model folder is damaged or incomplete: fetch or export it again") from None
        self.input_names = [i.name for i in self.session.get_inputs()]
        unknown = [n for n in self.input_names if n not in _ENCODING_FIELDS]
        if unknown:
            raise DistillError(f"{path / ONNX_FILE} takes inputs {unknown} that a tokenizer does not give",
                               f"export a graph whose inputs are among {list(_ENCODING_FIELDS)}")
        outputs = {o.name: o for o in self.session.get_outputs()}
        features = outputs.pop(FEATURES_OUTPUT, None)
        logits = outputs[LOGITS_OUTPUT] if LOGITS_OUTPUT in outputs else next(iter(outputs.values()))
        self.output_names = [logits.name] + ([features.name] if features is not None else [])
        self.tokenizer, self.pad_id = load_tokenizer(path, max_length)
        id2label = _json_object(path / "config.json").get("id2label") or {}
        artifact_labels = [str(id2label[k]) for k in sorted(id2label, key=int)] or None
        width = logits.shape[-1] if isinstance(logits.shape[-1], int) else None
        if (artifact_labels is not None and artifact_labels != labels) or (width is not None and width != len(labels)):
            raise DistillError(f"{folder / EDGE_FILE} lists labels {labels} but artifact {artifact!r} predicts "
                               f"{artifact_labels or f'{width} classes'}",
                               "the edge folder was assembled from different models; export it again")
        self.guard = read_guard(folder) if primary else None  # a damaged guard raises

    def predict_outputs(self, texts: Sequence[str], batch_size: int = 32) -> tuple[np.ndarray, np.ndarray | None]:
        """Logits (N, C) float32 and pooled features (N, D) (None when the graph has no "features" output), in
        the order of `texts`, over length-sorted batches."""
        return self._run(self.tokenizer.encode_batch([str(t) for t in texts]), batch_size)

    def _run(self, encodings: Sequence, batch_size: int) -> tuple[np.ndarray, np.ndarray | None]:
        logits = np.zeros((len(encodings), len(self.labels)), dtype=np.float32)  # (N, C)
        features = None
        for idx in length_sorted_batches([len(e.ids) for e in encodings], batch_size):
            out = self.session.run(self.output_names, pad_batch(encodings, idx, self.pad_id, self.input_names))
            logits[idx] = out[0]  # (B, C)
            if len(out) > 1:
                if features is None:
                    features = np.zeros((len(encodings), out[1].shape[-1]), dtype=np.float32)  # (N, D)
                features[idx] = out[1]
        return logits, features

    def predict_rows(self, rows: Sequence[dict], batch_size: int = 32, out_of_scope: str = "abstain") -> list[dict]:
        """What EdgeModel.predict_rows answers (see label_rows); rows need a "text"."""
        check_answerable(self.folder, self.guard, self.primary, out_of_scope)
        encodings = self.tokenizer.encode_batch([str(r["text"]) for r in rows])
        logits, features = self._run(encodings, batch_size)  # (N, C), (N, D)
        return label_rows(rows, logits, features, labels=self.labels, artifact=self.artifact, guard=self.guard,
                          out_of_scope=out_of_scope, truncated=[bool(e.overflowing) for e in encodings])


def load_lean(folder: str | Path, artifact: str | None = None, *, digest: str | None = None,
              threads: int | None = None) -> LeanEdge:
    """The primary artifact of an edge folder (or `artifact`), which must run on onnxruntime; `digest`: the
    folder's expected model digest, checked before anything is loaded; `threads`: ONNX Runtime intra-op threads
    (None: every core)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DistillError(f"edge folder {folder} does not exist", "pass the folder that holds edge.json")
    if digest:
        verify_digest(folder, digest)
    name, spec, manifest = chosen_artifact(folder, artifact)
    if spec["runtime"] != LEAN_RUNTIME:
        raise DistillError(f"artifact {name!r} of {folder} runs on {spec['runtime']}, not {LEAN_RUNTIME}",
                           "choose an ONNX artifact (--artifact onnx-int8 or onnx), or use `distill predict`")
    return LeanEdge(folder, name, list(manifest["labels"]), int(manifest.get("max_length", 128)),
                    primary=name == manifest["primary"], path=artifact_dir(folder, name, spec), threads=threads)


def main(argv: Sequence[str] | None = None) -> int:
    """Label JSONL rows with an edge folder's ONNX artifact: JSONL on stdout, one summary line on stderr."""
    parser = argparse.ArgumentParser(prog="python -m distill_gap.edge.lean", description=main.__doc__)
    parser.add_argument("--folder", required=True, help="the edge folder (the one holding edge.json)")
    parser.add_argument("--input", default="-", help='JSONL rows {"id": ..., "text": ...}; - reads stdin')
    parser.add_argument("--artifact", help="an ONNX artifact other than the primary one (no scope guard then)")
    parser.add_argument("--digest", help="the expected model digest (the registry's model.digest tag)")
    parser.add_argument("--batch-size", type=int, default=32, help="texts per forward pass")
    parser.add_argument("--out-of-scope", choices=OUT_OF_SCOPE, default="abstain",
                        help="rows outside the evaluated scope: abstain (label null, route fallback) or answer")
    parser.add_argument("--threads", type=int, help="ONNX Runtime intra-op threads (default: every core)")
    parser.add_argument("--strict", action="store_true", help="stop at a line that cannot be predicted (default: "
                        'an error record {"id", "line", "error"} for it in the output)')
    parser.add_argument("--allow-failed-artifact", action="store_true",
                        help="serve an artifact that did not pass its checks (edge.json), with a warning")
    args = parser.parse_args(argv)
    try:
        rows = read_rows(args.input, strict=args.strict)  # strict: a bad file prints nothing
        edge = load_lean(args.folder, args.artifact, digest=args.digest, threads=args.threads)
        note = check_servable(args.folder, edge.artifact, args.allow_failed_artifact)
        if note:
            print(note, file=sys.stderr)
        counts = stream_rows(edge, rows, sys.stdout, batch_size=max(1, args.batch_size),
                             out_of_scope=args.out_of_scope)
        print(summary(counts, edge, args.out_of_scope, args.input), file=sys.stderr)
    except DistillError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `... | head`: the reader has what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 0


if __name__ == "__main__":
    sys.exit(main())
