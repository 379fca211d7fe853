"""One maker of S3 clients, for the soft-label store, data splits and production samples on s3://.

Each client comes from a new botocore session, so credentials, region and AWS_ENDPOINT_URL are read when the client is
made (a rotated key or a moved endpoint reaches the next client; boto3's default session would keep the first ones),
while every session of the process shares one botocore data loader: the S3 service model and endpoint rules (JSON,
parsed by botocore) are read once per process instead of once per client, 62 ms -> 10 ms of CPU per client on the
2-core machine. A soft-label run opens one store per shard task, so this is paid per shard. (What the loader itself
reads, AWS_DATA_PATH, is read once per process.)
"""

from __future__ import annotations

import functools


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
