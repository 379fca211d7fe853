"""The validate stage: its plain step validates every split and publishes nothing outside a Prefect run."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from distill_gap.data.validation import DataValidationError
from tasks.validate import validate
from tests.conftest import LABELS


@pytest.fixture()
def splits(review_frame):
    frame = review_frame.copy()
    return SimpleNamespace(frames={"train": frame.iloc[:160], "validation": frame.iloc[160:200],
                                   "test": frame.iloc[200:240]}, labels=LABELS, slice_columns=["condition"])


def test_stage_step_runs_outside_a_flow_without_publishing(splits):
    report = validate(splits)  # no run context: the artifact is skipped

    assert report["passed"] is True
    assert set(report["splits"]) == {"train", "validation", "test"}


def test_stage_step_raises_with_the_report_on_bad_rows(splits):
    splits.frames["test"] = splits.frames["test"].assign(label="not-a-label")

    with pytest.raises(DataValidationError) as err:
        validate(splits)
    assert err.value.report["passed"] is False
