"""S3 clients (distill_gap/ops/s3.py): settings read per client, the service model parsed once per process."""

from __future__ import annotations

import pytest

from distill_gap.ops.s3 import s3_client


def test_each_client_reads_the_environment_and_all_share_one_parsed_service_model(s3_bucket, s3_endpoint, monkeypatch):
    first = s3_client(connect_timeout=5)
    first.put_object(Bucket=s3_bucket, Key="a", Body=b"1")
    assert first.meta.endpoint_url == s3_endpoint and first.meta.region_name == "us-east-1"

    monkeypatch.setenv("AWS_DEFAULT_REGION", "eu-west-1")  # moved between two clients: the next one sees it
    second = s3_client()
    assert second.meta.region_name == "eu-west-1"
    assert second.get_object(Bucket=s3_bucket, Key="a")["Body"].read() == b"1"
    # what makes a client cheap: the S3 model botocore parsed for the first client is the second's too
    assert second.meta.service_model._service_description is first.meta.service_model._service_description


def test_what_a_user_can_fix_is_named_for_data_and_production_samples_alike(s3_bucket, monkeypatch, tmp_path):
    """Data splits and production samples on s3:// get the soft-label store's messages (one translation): a missing
    bucket, a missing key and missing credentials each say what is wrong and where, with botocore's error kept as the
    cause. Before, missing credentials read "cannot reach S3 ... check AWS_ENDPOINT_URL and network access"."""
    from distill_gap.data.splits import read_table
    from distill_gap.errors import DistillError
    from distill_gap.monitoring.drift import read_production_rows

    with pytest.raises(DistillError, match="bucket 'nope-bucket' does not exist at http://127.0.0.1") as err:
        read_table("s3://nope-bucket/train.csv")
    assert "data: URIs in the config" in str(err.value) and err.value.__cause__ is not None
    with pytest.raises(DistillError, match=f"cannot read s3://{s3_bucket}/missing.csv: NoSuchKey"):
        read_table(f"s3://{s3_bucket}/missing.csv")

    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    for read in (lambda: read_table(f"s3://{s3_bucket}/train.csv"), lambda: read_production_rows(f"s3://{s3_bucket}/p")):
        with pytest.raises(DistillError, match="no usable AWS credentials") as err:
            read()
        assert "AWS_ACCESS_KEY_ID" in str(err.value)
