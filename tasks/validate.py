"""Stage: load and validate every split with the Great Expectations suite; publish the report; stop on failure.
The validated splits are then logged as the pipeline run's dataset inputs, with our digests."""

from __future__ import annotations

from prefect.cache_policies import NO_CACHE

from tasks import step

from distill_gap.data.validation import DataValidationError, _publish, validate_splits
from distill_gap.registry.pyfunc import log_split_inputs
from tasks.data import load_data


def validate(splits, name: str = "") -> dict:
    """Validate every split; publish the report as an artifact (key <name>-data-validation); raise
    DataValidationError on failure."""
    try:
        report = validate_splits(splits.frames, splits.labels, splits.slice_columns)
    except DataValidationError as e:
        _publish(e.report, name)
        raise
    _publish(report, name)
    return report


# Deterministic, so no retries (loading retries transient S3 errors itself); NO_CACHE: validation is cheap and must
# see the frames it is given (hashing DataFrames for a cache key would cost more than validating them).
@step("validate-data", retries=0, cache_policy=NO_CACHE)
def validate_data(run, data_cfg, seed: int):
    """Load the splits (the load-data task) and validate them inside the run's `validate` stage, then log them as
    the run's dataset inputs; returns the splits."""
    with run.stage("validate"):
        splits = load_data(data_cfg, seed)
        validate(splits, run.name)
    log_split_inputs(run.client, run.run_id, splits,
                     sources=data_cfg.model_dump(include={"train", "validation", "test"}))
    return splits
