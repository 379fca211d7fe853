"""S3 for the soft-label store, data splits and production samples on s3://: one maker of clients, and one
translation of the errors a user can fix into DistillError (`s3_errors`).

Each client comes from a new botocore session, so credentials, region and AWS_ENDPOINT_URL are read when the client is
made (a rotated key or a moved endpoint reaches the next client; boto3's default session would keep the first ones),
while every session of the process shares one botocore data loader: the S3 service model and endpoint rules (JSON,
parsed by botocore) are read once per process instead of once per client, 62 ms -> 10 ms of CPU per client on the
2-core machine. A soft-label run opens one store per shard task, so this is paid per shard. (What the loader itself
reads, AWS_DATA_PATH, is read once per process.)
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from distill_gap.errors import DistillError

# ClientError codes that mean "these credentials may not do this"
ACCESS_DENIED = frozenset({"AccessDenied", "403", "InvalidAccessKeyId", "SignatureDoesNotMatch", "AllAccessDisabled"})


@functools.cache
def _shared_loader():
    import botocore.loaders
    import botocore.session

    # as botocore's own sessions make theirs: extra model folders from AWS_DATA_PATH / the config file's data_path
    return botocore.loaders.create_loader(botocore.session.Session().get_config_variable("data_path"))


def s3_client(**config):
    """A boto3 S3 client; `config` goes to botocore's Config (timeouts, retries)."""
    import boto3
    import botocore.session
    from botocore.config import Config

    session = botocore.session.Session()
    session.register_component("data_loader", _shared_loader())
    return boto3.session.Session(botocore_session=session).client("s3", config=Config(**config) if config else None)


@contextmanager
def s3_errors(uri: str, action: str, *, setting: str, endpoint: Callable[[], str | None] = lambda: None,
              others: bool = False) -> Iterator[None]:
    """Turn the S3 errors a user can fix (credentials, endpoint, bucket, permissions) into DistillError naming `uri`,
    `action` and the fix; `setting` is the config key that names the location, `endpoint` says (when asked, after the
    error) which endpoint the client talked to. The botocore error stays the cause, so the retry policy
    (distill_gap/ops/transient.py) still sees connection trouble and throttling. Other S3 errors (a missing key,
    throttling) go to the caller unchanged, or with `others` become a DistillError too (callers that only read)."""
    from botocore.exceptions import (BotoCoreError, ClientError, ConnectionError, HTTPClientError,
                                     NoCredentialsError, PartialCredentialsError)

    bucket = uri.removeprefix("s3://").partition("/")[0]
    where = f"{uri} ({action})"
    try:
        yield
    except (NoCredentialsError, PartialCredentialsError) as err:
        raise DistillError(f"no usable AWS credentials for {where}: {err}",
                           "set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE); for MinIO also "
                           "AWS_ENDPOINT_URL") from err
    except (ConnectionError, HTTPClientError) as err:
        raise DistillError(f"cannot reach {endpoint() or 'the S3 endpoint'} for {where}: {err}",
                           "check AWS_ENDPOINT_URL and that the S3/MinIO server is up "
                           "(docker compose -f infra/docker-compose.yml up -d minio)") from err
    except ClientError as err:
        code = str(err.response.get("Error", {}).get("Code", ""))
        if code == "NoSuchBucket":
            raise DistillError(f"bucket {bucket!r} does not exist at {endpoint() or 'the S3 endpoint'}",
                               f"create it (aws s3 mb s3://{bucket}) or point {setting} at an existing bucket") from err
        if code in ACCESS_DENIED:
            raise DistillError(f"access denied to {where} ({code})",
                               f"check the AWS credentials and what they may do on s3://{bucket}") from err
        if others:
            raise DistillError(f"cannot {action} {uri}: {code or err}", f"check the key and {setting}") from err
        raise
    except BotoCoreError as err:
        if others:
            raise DistillError(f"S3 request for {where} failed: {err}",
                               "check AWS_ENDPOINT_URL, the region and the AWS credentials") from err
        raise
