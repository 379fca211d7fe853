"""S3 clients (distill_gap/ops/s3.py): settings read per client, the service model parsed once per process."""

from __future__ import annotations

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
