"""Stage: load and split the data set (train / validation / test + OOD sets), with a digest per split."""

from __future__ import annotations

from prefect.cache_policies import NO_CACHE

from tasks import step

from distill_gap.data.splits import Splits, load_splits
from distill_gap.ops.transient import retry_if_transient


@step("load-data", cache_policy=NO_CACHE, retries=2,
      retry_delay_seconds=[2, 10], retry_condition_fn=retry_if_transient)
def load_data(data, seed: int) -> Splits:
    """Read and split the data set; retried only on transient errors (an S3 endpoint that cannot be reached)."""
    from prefect.logging import get_run_logger

    splits = load_splits(data, seed)
    get_run_logger().info("data: %s (digest %s)", ", ".join(f"{n} {len(df)} rows" for n, df in splits.frames.items()),
                          splits.digest()[:12])
    return splits
