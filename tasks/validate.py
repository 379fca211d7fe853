"""Stage: validate every split with the Great Expectations suite; publish the report; stop on failure."""

from __future__ import annotations

import pandas as pd
from prefect import task
from prefect.cache_policies import NO_CACHE

from distill_gap.data.validation import DataValidationError, _publish, validate_splits


# Deterministic, so no retries; NO_CACHE: validation is cheap and must see the frames it is given
# (hashing DataFrames for a cache key would cost more than validating them).
@task(name="validate-data", retries=0, cache_policy=NO_CACHE)
def validate_data(splits: dict[str, pd.DataFrame], labels: list[str], slice_columns: list[str]) -> dict:
    """Validate every split; publish the report as an artifact; raise DataValidationError on failure."""
    try:
        report = validate_splits(splits, labels, slice_columns)
    except DataValidationError as e:
        _publish(e.report)
        raise
    _publish(report)
    return report
