"""Data validation on real review rows: clean splits pass; each kind of bad data is named in the error."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pandas as pd
import pytest

from distill_gap.data.validation import DataValidationError, validate_splits, validation_markdown
from tests.conftest import LABELS

SLICES = ["condition"]


@pytest.fixture()
def splits(review_frame):
    """train 160 / validation 40 / test 40 rows (copies: the fixture is session-wide).

    No OOD set unless a test adds one: each split costs ~0.3 s of GX bookkeeping.
    """
    df = review_frame
    return {"train": df.iloc[:160].copy(), "validation": df.iloc[160:200].copy(), "test": df.iloc[200:].copy()}


def _error(splits, **kwargs) -> DataValidationError:
    with pytest.raises(DataValidationError) as info:
        validate_splits(splits, LABELS, SLICES, **kwargs)
    json.dumps(info.value.report)  # the report stays JSON-able when it describes bad data
    return info.value


def _failures(error: DataValidationError, split: str) -> list[dict]:
    return error.report["splits"][split]["failed"]


@pytest.mark.parametrize("dtype", ["str", object, pd.StringDtype("python", na_value=pd.NA)])
def test_clean_splits_pass_and_count_rows(splits, dtype):
    # pandas 3 reads text as `str`; GX 1.24 alone would call that dtype "not a string" (see _gx_view).
    splits["ood:forum"] = splits["train"].iloc[:30]
    splits = {n: df.astype({"id": dtype, "text": dtype, "label": dtype}) for n, df in splits.items()}
    report = validate_splits(splits, LABELS, SLICES)

    assert report["passed"] is True
    rows = {n: s["rows"] for n, s in report["splits"].items()}
    assert rows == {"train": 160, "validation": 40, "test": 40, "ood:forum": 30}
    assert all(s["passed"] and s["failed"] == [] for s in report["splits"].values())
    assert json.loads(json.dumps(report)) == report


@pytest.mark.parametrize("column", ["text", "condition"])
def test_missing_column_names_it_and_the_columns_present(splits, column):
    splits["validation"] = splits["validation"].drop(columns=[column])
    error = _error(splits)

    message = str(error)
    assert f"split 'validation': column '{column}' is missing" in message
    present = [c for c in ("id", "text", "label", "condition") if c != column]
    assert f"columns present: {present}" in message
    assert "data.slice_columns" in message  # the fix points at the config keys
    assert [f["expectation"] for f in _failures(error, "validation")] == ["expect_column_to_exist"]
    assert error.report["splits"]["train"]["passed"] is True


def test_nan_text_is_reported_with_the_row_id(splits):
    train = splits["train"]
    train.loc[train.index[3], "text"] = np.nan
    error = _error(splits)

    bad_id = train["id"].iloc[3]
    assert f"split 'train': column 'text' has missing values (1 row, id {bad_id})" in str(error)
    (failure,) = _failures(error, "train")
    assert failure == {
        "expectation": "expect_column_values_to_not_be_null",
        "column": "text",
        "detail": f"column 'text' has missing values (1 row, id {bad_id})",
        "examples": [bad_id],
    }


def test_empty_and_blank_text_are_reported(splits):
    test = splits["test"]
    test.loc[test.index[[0, 5]], "text"] = ["", "  \n "]
    error = _error(splits)

    ids = test["id"].iloc[[0, 5]].tolist()
    expected = f"split 'test': column 'text' has empty or whitespace-only values (2 rows, ids {ids[0]}, {ids[1]})"
    assert expected in str(error)
    assert _failures(error, "test")[0]["examples"] == ids


def test_text_longer_than_the_limit_is_reported(splits):
    train = splits["train"]
    train.loc[train.index[1], "text"] = "word " * 2000
    error = _error(splits, max_text_chars=5000)

    bad_id = train["id"].iloc[1]
    assert f"split 'train': column 'text' has values longer than 5000 characters (1 row, id {bad_id})" in str(error)


@pytest.mark.parametrize("missing", [None, np.nan])
def test_ood_split_may_lack_labels_where_train_may_not(splits, missing):
    # an OOD file of unseen classes (the loader made them None) and one with no labels at all pass;
    # every other check still applies to them
    splits["ood:forum"] = splits["train"].iloc[:30].copy().astype({"label": object})
    splits["ood:forum"].loc[splits["ood:forum"].index[:20], "label"] = missing
    splits["ood:code"] = splits["train"].iloc[30:40].assign(label=missing)  # all-NaN: float64, no type to check
    assert validate_splits(splits, LABELS, SLICES)["passed"]

    splits["ood:code"].loc[splits["ood:code"].index[2], "text"] = " "
    splits["train"] = splits["train"].astype({"label": object})
    splits["train"].loc[splits["train"].index[5], "label"] = missing
    error = _error(splits)
    assert [n for n, s in error.report["splits"].items() if not s["passed"]] == ["train", "ood:code"]
    assert f"split 'train': column 'label' has missing values (1 row, id {splits['train']['id'].iloc[5]})" in str(error)
    assert "split 'ood:code': column 'text' has empty or whitespace-only values" in str(error)


def test_label_outside_the_set_is_reported_on_ood_splits_too(splits):
    # the labels an OOD split has must be known: a held-out slice's rows come from the training files (an OOD file's
    # unseen classes are None by then, see test_splits.py)
    ood = splits["ood:forum"] = splits["train"].iloc[:30].copy()
    ood.loc[ood.index[[2, 7]], "label"] = "great"
    error = _error(splits)

    ids = ood["id"].iloc[[2, 7]].tolist()
    assert (
        f"split 'ood:forum': column 'label' has values outside the label set {LABELS}: ['great'] "
        f"(2 rows, ids {ids[0]}, {ids[1]})"
    ) in str(error)
    assert "fix: add the missing labels to data.labels" in str(error)
    assert [n for n, s in error.report["splits"].items() if not s["passed"]] == ["ood:forum"]


def test_duplicated_ids_are_reported(splits):
    test = splits["test"]
    dup = test["id"].iloc[0]
    test.loc[test.index[9], "id"] = dup
    error = _error(splits)

    assert f"split 'test': column 'id' has duplicated values: ['{dup}'] (2 rows, rows 0, 9)" in str(error)
    assert _failures(error, "test")[0]["examples"] == [dup]


def test_empty_split_is_reported(splits):
    splits["validation"] = splits["validation"].iloc[:0]
    error = _error(splits)

    assert "split 'validation': has no rows" in str(error)
    assert error.report["splits"]["validation"]["rows"] == 0


def test_numeric_text_column_is_reported(splits):
    splits["train"]["text"] = np.arange(160)
    error = _error(splits)

    assert "split 'train': column 'text' must hold strings but has dtype int64" in str(error)
    assert "fix: id, text and label must hold strings" in str(error)


def test_mixed_text_column_names_the_non_string_rows(splits):
    train = splits["train"].astype({"text": object})
    train.loc[train.index[4], "text"] = 3.5
    splits["train"] = train
    error = _error(splits)

    assert f"split 'train': column 'text' has non-string values: [3.5] (1 row, id {train['id'].iloc[4]})" in str(error)


def test_missing_split_and_every_problem_are_reported_at_once(splits):
    del splits["test"]
    splits["ood:forum"] = splits["train"].iloc[:30].assign(label="great")
    error = _error(splits)

    lines = str(error).splitlines()
    assert lines[0] == "data validation failed (2 problem(s) in 2 split(s)):"
    assert lines[1] == "  split 'test': is missing (splits present: ['ood:forum', 'train', 'validation'])"
    assert lines[2].startswith("  split 'ood:forum': column 'label' has values outside the label set")
    assert "(30 rows, e.g. ids" in lines[2]
    assert lines[3].startswith("  fix: ")


def test_error_survives_pickling_with_its_report(splits):
    splits["validation"] = splits["validation"].iloc[:0]
    error = _error(splits)

    copy = pickle.loads(pickle.dumps(error))  # Prefect persists a failed task's exception
    assert copy.report == error.report and str(copy) == str(error)


def test_report_renders_as_a_markdown_table(splits):
    splits["validation"] = splits["validation"].iloc[:0]
    error = _error(splits)

    markdown = validation_markdown(error.report)
    assert "| split | rows | passed | failures |" in markdown
    assert "| validation | 0 | no | has no rows |" in markdown
    assert "| train | 160 | yes | - |" in markdown
