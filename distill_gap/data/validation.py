"""Data validation: one Great Expectations suite per split, a JSON-able report, one readable error.

Runs before anything is written (DESIGN.md, data flow): a split with missing columns, missing or
blank texts, a text column of numbers only, duplicated ids (within a split, or across train,
validation and test) or labels outside `data.labels` stops the pipeline here, with every problem
listed at once rather than the first one found, each under its split and the file it came from.

An OOD split ("ood:<name>") may have rows without a label: its classes may be ones the model never learned
(the loader turns those into None, distill_gap.data.splits.canonicalize) or the set may have no labels at
all. The labels it does have must still be in `data.labels`: a held-out slice's rows come from the training
files, where an unknown label is the same error as in train.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import re
import threading
from typing import Any

import pandas as pd

from distill_gap.errors import DistillError

CANONICAL_COLUMNS = ("id", "text", "label")  # every split has them, all strings
REQUIRED_SPLITS = ("train", "validation", "test")  # the loader always produces these; "ood:<name>" optional
MAX_EXAMPLES = 5  # offending ids / values kept per failed expectation

# Fix hints, one per kind of failure; the error message lists those that apply.
_FIX_COLUMNS = "point data.id_column / data.text_column / data.label_column / data.slice_columns at the file's columns"
_FIX_LABELS = "add the missing labels to data.labels, or fix or drop those rows"
_FIX_ROWS = "fix or drop the offending rows in the data"
_FIX_TYPES = "id, text and label must hold strings: check that data.*_column names the right column"
_FIX_SPLITS = "check data.train / data.validation / data.test / data.ood (a file may be empty)"
_FIX_IDS = "an id names one row in all splits: drop the repeated rows or give them distinct ids"
_NUMBER = re.compile(r"^\s*[-+]?(\d+(\.\d*)?|\.\d+)([eE][-+]?\d+)?\s*$")

_gx_lock = threading.Lock()  # the cached GX context is shared; validate one split at a time


class DataValidationError(DistillError):
    """Data failed the validation suite; `.report` holds the full report (see validate_splits)."""

    def __init__(self, report: dict):
        self.report = report
        lines, hints = [], []
        for name, split in report["splits"].items():
            source = f" ({split['source']})" if split.get("source") else ""
            for failure in split["failed"]:
                lines.append(f"  split '{name}'{source}: {failure['detail']}")
                hint = _fix_hint(failure["expectation"])
                if hint not in hints:
                    hints.append(hint)
        bad = sum(not s["passed"] for s in report["splits"].values())
        problem = f"data validation failed ({len(lines)} problem(s) in {bad} split(s)):\n" + "\n".join(lines)
        super().__init__(problem, "; ".join(hints))

    def __reduce__(self):  # Prefect may pickle a failed task's exception; rebuild it from the report
        return type(self), (self.report,)


def validate_splits(
    splits: dict[str, pd.DataFrame],
    labels: list[str],
    slice_columns: list[str] = (),
    *,
    max_text_chars: int = 100_000,
) -> dict:
    """Run a Great Expectations suite per split; return a JSON-able report; raise DataValidationError on any failure.

    Report: {"passed": bool, "splits": {name: {"rows": int, "passed": bool, "failed": [
        {"expectation": str, "column": str | None, "detail": str, "examples": [up to 5 ids or values]}]}}}
    """
    if not labels:
        raise DistillError("the label set is empty", "list the classes in data.labels")
    columns = list(dict.fromkeys([*CANONICAL_COLUMNS, *slice_columns]))
    batch_definition = _gx_batch_definition()

    report: dict[str, Any] = {"passed": True, "splits": {}}
    for name in REQUIRED_SPLITS:
        if name not in splits:
            report["splits"][name] = {"rows": 0, "passed": False, "failed": [_missing_split(name, splits)]}
    seen: dict[str, str] = {}  # id -> the first split that holds it
    for name, frame in splits.items():
        assert isinstance(frame, pd.DataFrame), f"split {name!r} is a {type(frame).__name__}, not a DataFrame"
        failed = _validate_frame(batch_definition, frame, list(labels), columns, max_text_chars,
                                 labels_optional=name.startswith("ood:"))
        if name in REQUIRED_SPLITS:  # an OOD set may come from elsewhere and reuse ids of the training data
            failed += _ids_in_earlier_splits(frame, name, seen)
        report["splits"][name] = {"rows": int(len(frame)), "passed": not failed, "failed": failed}
        source = frame.attrs.get("source")  # set by tasks.data: the file the rows were read from
        if isinstance(source, str):
            report["splits"][name]["source"] = source
    report["passed"] = all(s["passed"] for s in report["splits"].values())
    if not report["passed"]:
        raise DataValidationError(report)
    return report


def validate_extra_rows(name: str, frame: pd.DataFrame, labels: list[str], *, max_text_chars: int = 100_000) -> dict:
    """The same suite for rows that join training from elsewhere (production rows, feedback answers): id, text and
    label columns, a label optional (None or "" = the teacher's logits are the only label) but one of `labels` when
    given. Raises DataValidationError (split `name`) on any failure: nothing unvalidated is trained on."""
    data = frame[list(CANONICAL_COLUMNS)].copy()
    data["label"] = data["label"].map(lambda v: None if v is None or v == "" else v)
    failed = _validate_frame(_gx_batch_definition(), data, list(labels), list(CANONICAL_COLUMNS), max_text_chars,
                             labels_optional=True)
    report = {"passed": not failed, "splits": {name: {"rows": int(len(frame)), "passed": not failed, "failed": failed}}}
    if failed:
        raise DataValidationError(report)
    return report


# ---------------------------------------------------------------------------------------------
# the suite


def _expectations(frame: pd.DataFrame, labels: list[str], columns: list[str], max_text_chars: int,
                  labels_optional: bool = False) -> list:
    """The suite for one split; expectations on a missing (or non-string) column are left out, not crashed on.

    `labels_optional` (an OOD split): a missing label is no failure, and a label column with no value at all
    (an unlabelled set) has no type to check; labels present must still be in the set (GX skips nulls there).
    """
    import great_expectations.expectations as gxe

    present = [c for c in columns if c in frame.columns]
    suite = [gxe.ExpectColumnToExist(column=c) for c in columns]
    suite.append(gxe.ExpectTableRowCountToBeBetween(min_value=1))
    for c in (c for c in CANONICAL_COLUMNS if c in present):
        if c == "label" and labels_optional:
            if frame["label"].notna().any():
                suite.append(gxe.ExpectColumnValuesToBeInTypeList(column=c, type_list=["str"]))
            continue
        suite += [
            gxe.ExpectColumnValuesToNotBeNull(column=c),
            gxe.ExpectColumnValuesToBeInTypeList(column=c, type_list=["str"]),
        ]
    if "id" in present:
        suite.append(gxe.ExpectColumnValuesToBeUnique(column="id"))
    if "text" in present and _holds_strings(frame["text"]):
        # `\S` = non-empty after stripping whitespace, the lower bound; the length check the upper.
        suite += [
            gxe.ExpectColumnValuesToMatchRegex(column="text", regex=r"\S"),
            gxe.ExpectColumnValueLengthsToBeBetween(column="text", max_value=max_text_chars),
        ]
    if "label" in present:
        suite.append(gxe.ExpectColumnValuesToBeInSet(column="label", value_set=labels))
    return suite


def _validate_frame(
    batch_definition, frame: pd.DataFrame, labels: list[str], columns: list[str], max_text_chars: int,
    labels_optional: bool = False,
) -> list[dict]:
    """Validate one split; return its failures (empty when it passes)."""
    import great_expectations as gx

    failed = []
    duplicated = sorted({str(c) for c in frame.columns[frame.columns.duplicated()]})
    if duplicated:
        failed.append(_failure("unique_column_names", None, f"columns appear more than once: {duplicated}", []))
        frame = frame.loc[:, ~frame.columns.duplicated()]

    data = _gx_view(frame, columns)
    expectations = _expectations(data, labels, columns, max_text_chars, labels_optional)
    suite = gx.ExpectationSuite(name="distill-data", expectations=expectations)
    with _gx_lock:
        batch = batch_definition.get_batch(batch_parameters={"dataframe": data})
        result = batch.validate(suite, result_format="SUMMARY")
    for r in result.results:
        if not r.success:
            failed.append(_describe(r, data, labels, max_text_chars))
    return failed + _numbers_as_text(data)


def _numbers_as_text(data: pd.DataFrame) -> list[dict]:
    """A text column of numbers only: read as strings (CSV), it passes every type check, yet it is not text."""
    if "text" not in data.columns or not _holds_strings(data["text"]):
        return []
    values = data["text"].dropna()
    values = values[values.map(lambda v: isinstance(v, str))]
    if values.empty or not values.map(lambda v: bool(_NUMBER.match(v))).all():
        return []
    ids = _ids_at(data, list(range(min(len(data), MAX_EXAMPLES))))
    detail = (f"column 'text' holds only numbers: {_short(list(dict.fromkeys(values)))} "
              f"{_rows(len(values), 'id', ids)}; a numeric column is named as the text column")
    return [_failure("text_is_not_only_numbers", "text", detail, ids)]


def _ids_in_earlier_splits(frame: pd.DataFrame, name: str, seen: dict[str, str]) -> list[dict]:
    """Ids of `frame` that an earlier split holds (one row twice, or two rows under one id); `seen` grows."""
    if "id" not in frame.columns:
        return []
    ids = [v for v in frame["id"].tolist() if isinstance(v, str)]
    repeated = [i for i in dict.fromkeys(ids) if i in seen]
    for i in ids:
        seen.setdefault(i, name)
    if not repeated:
        return []
    where = sorted({seen[i] for i in repeated})
    detail = (f"column 'id' has values also in split {', '.join(repr(w) for w in where)}: {_short(repeated)} "
              f"{_rows(len(repeated), 'id', repeated[:MAX_EXAMPLES])}")
    return [_failure("ids_unique_across_splits", "id", detail, repeated[:MAX_EXAMPLES])]


def _gx_view(frame: pd.DataFrame, columns: list[str]) -> pd.DataFrame:
    """The frame as GX should see it: row positions as index, string columns as object dtype.

    GX 1.24 compares a column's dtype against numpy/native types only, so pandas 3's default
    `str` dtype (StringDtype(na_value=nan)) fails ExpectColumnValuesToBeInTypeList(["str"])
    with observed 'str'. As object dtype, GX checks each value with isinstance(v, str) instead,
    which also names the offending rows of a mixed column.
    """
    data = frame.reset_index(drop=True)
    to_object = {
        c: object
        for c in columns
        if c in data.columns and pd.api.types.is_string_dtype(data[c].dtype) and data[c].dtype != object
    }
    return data.astype(to_object) if to_object else data


def _holds_strings(column: pd.Series) -> bool:
    return column.dtype == object or pd.api.types.is_string_dtype(column.dtype)


@functools.cache
def _gx_batch_definition():
    """One ephemeral GX context for the process (building it per call costs more than validating)."""
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig

    # GX pins one module logger at INFO ("Created temporary directory ... for ephemeral docs site").
    logging.getLogger("great_expectations.data_context.types.base").setLevel(logging.WARNING)

    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = ProgressBarsConfig(globally=False, metric_calculations=False)
    asset = context.data_sources.add_pandas("distill-splits").add_dataframe_asset("split")
    return asset.add_batch_definition_whole_dataframe("whole-split")


# ---------------------------------------------------------------------------------------------
# turning GX results into report entries


def _describe(r, data: pd.DataFrame, labels: list[str], max_text_chars: int) -> dict:
    """One failed expectation result -> {"expectation", "column", "detail", "examples"}."""
    kind = r.expectation_config.type
    column = r.expectation_config.kwargs.get("column")
    res = r.result or {}
    where = f"column '{column}'" if column else "the table"
    if r.exception_info and r.exception_info.get("raised_exception"):
        message = str(r.exception_info.get("exception_message") or "").splitlines()[:1]
        return _failure(kind, column, f"{where}: Great Expectations could not evaluate {kind}: {' '.join(message)}", [])

    if kind == "expect_column_to_exist":
        present = [str(c) for c in data.columns]
        return _failure(kind, column, f"{where} is missing (columns present: {present})", [])
    if kind == "expect_table_row_count_to_be_between":
        return _failure(kind, None, "has no rows", [])
    if kind == "expect_column_values_to_be_in_type_list" and "observed_value" in res:
        return _failure(kind, column, f"{where} must hold strings but has dtype {res['observed_value']}", [])

    count = int(res.get("unexpected_count") or 0)
    positions = [int(i) for i in res.get("partial_unexpected_index_list") or []][:MAX_EXAMPLES]
    values = _distinct_values(res)
    if column == "id":  # the ids themselves are at fault: point at rows, show the values
        examples = positions if kind == "expect_column_values_to_not_be_null" else values[:MAX_EXAMPLES]
        rows = _rows(count, "row", positions)
    else:
        examples = _ids_at(data, positions)
        rows = _rows(count, "id", examples)

    if kind == "expect_column_values_to_not_be_null":
        detail = f"{where} has missing values {rows}"
    elif kind == "expect_column_values_to_be_unique":
        detail = f"{where} has duplicated values: {_short(values)} {rows}"
    elif kind == "expect_column_values_to_be_in_type_list":
        detail = f"{where} has non-string values: {_short(values)} {rows}"
    elif kind == "expect_column_values_to_match_regex":
        detail = f"{where} has empty or whitespace-only values {rows}"
    elif kind == "expect_column_value_lengths_to_be_between":
        detail = f"{where} has values longer than {max_text_chars} characters {rows}"
    elif kind == "expect_column_values_to_be_in_set":
        detail = f"{where} has values outside the label set {labels}: {_short(values)} {rows}"
    else:
        detail = f"{where} failed {kind} {rows}"
    return _failure(kind, column, detail, examples)


def _failure(expectation: str, column: str | None, detail: str, examples: list) -> dict:
    return {"expectation": expectation, "column": column, "detail": detail, "examples": [_plain(v) for v in examples]}


def _missing_split(name: str, splits: dict) -> dict:
    return _failure("split_exists", None, f"is missing (splits present: {sorted(splits)})", [])


def _fix_hint(expectation: str) -> str:
    if expectation in ("expect_column_to_exist", "unique_column_names"):
        return _FIX_COLUMNS
    if expectation == "expect_column_values_to_be_in_set":
        return _FIX_LABELS
    if expectation in ("expect_table_row_count_to_be_between", "split_exists"):
        return _FIX_SPLITS
    if expectation in ("expect_column_values_to_be_in_type_list", "text_is_not_only_numbers"):
        return _FIX_TYPES
    if expectation == "ids_unique_across_splits":
        return _FIX_IDS
    return _FIX_ROWS


def _distinct_values(res: dict) -> list:
    """Offending values, most frequent first (GX counts them over the whole column)."""
    counts = res.get("partial_unexpected_counts")
    if counts:
        return [_plain(c["value"]) for c in counts]
    return list(dict.fromkeys(_plain(v) for v in res.get("partial_unexpected_list") or []))


def _ids_at(data: pd.DataFrame, positions: list[int]) -> list:
    if "id" not in data.columns:
        return positions
    return [_plain(v) for v in data["id"].iloc[positions]]


def _plain(value: Any) -> Any:
    """A JSON-able scalar: numpy scalars unwrapped, NaN/NA as None, anything else as its str."""
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):
        try:
            value = value.item()
        except (ValueError, TypeError):
            pass
    if value is None or value is pd.NA or (isinstance(value, float) and math.isnan(value)):
        return None
    if isinstance(value, (str, int, float, bool)):
        return value
    return str(value)


def _short(values: list, limit: int = 10, chars: int = 60) -> str:
    """A list for a one-line message: at most `limit` values, long strings cut."""
    shown = [v[:chars] + "..." if isinstance(v, str) and len(v) > chars else v for v in values[:limit]]
    return repr(shown)[:-1] + (", ...]" if len(values) > limit else "]")


def _rows(count: int, noun: str, examples: list) -> str:
    """'(1 row, id 4)', '(2 rows, ids 4, 9)', '(30 rows, e.g. ids 4, 9, 11, 12, 17)'."""
    shown = ", ".join(str(v) for v in examples)
    if count == 1:
        return f"(1 row, {noun} {shown})"
    return f"({count} rows, {'e.g. ' if count > len(examples) else ''}{noun}s {shown})"


# ---------------------------------------------------------------------------------------------
# Prefect


def validation_markdown(report: dict) -> str:
    """The report as a markdown table: split, rows, passed, failures."""
    verdict = "passed" if report["passed"] else "FAILED"
    lines = [f"# Data validation: {verdict}", "", "| split | rows | passed | failures |", "| --- | --- | --- | --- |"]
    for name, split in report["splits"].items():
        failures = "<br>".join(f["detail"].replace("|", "\\|") for f in split["failed"]) or "-"
        lines.append(f"| {name} | {split['rows']} | {'yes' if split['passed'] else 'no'} | {failures} |")
    return "\n".join(lines) + "\n"


def _publish(report: dict, name: str = "") -> None:
    """Markdown artifact "<name>-data-validation" (one history per config), only inside a Prefect run (plain calls
    have no API)."""
    from prefect.artifacts import create_markdown_artifact
    from prefect.context import get_run_context
    from prefect.exceptions import MissingContextError

    try:
        get_run_context()
    except MissingContextError:
        return
    create_markdown_artifact(
        markdown=validation_markdown(report),
        key=f"{name}-data-validation" if name else "data-validation",
        description="Great Expectations suite per split (id, text, label, slice columns)",
    )
