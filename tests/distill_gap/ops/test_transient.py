"""The transient-error policy: real exceptions, raised and chained as the code raises them; types and codes decide."""

from __future__ import annotations

import socket

import pytest
from prefect.states import Completed, Failed

from distill_gap.errors import DistillError
from distill_gap.ops.transient import TRANSIENT_CODES, is_transient, retry_if_transient, retry_if_transient_as


def _raised(exc: BaseException, *, wrap_from: bool | None = True) -> BaseException:
    """`exc` raised, then (unless wrap_from is False) wrapped in a DistillError as the library wraps it:
    `raise ... from err` (True), or raised inside the except block with no `from` (None)."""
    try:
        raise exc
    except BaseException as err:
        if wrap_from is False:
            return err
        try:
            if wrap_from:
                raise DistillError("store trouble", "fix it") from err
            raise DistillError("store trouble", "fix it")
        except DistillError as wrapped:
            return wrapped


def _client_error(code: str):
    from botocore.exceptions import ClientError

    return ClientError({"Error": {"Code": code, "Message": f"a {code} message"}}, "PutObject")


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_real_refused_connection_is_transient_also_wrapped_twice():
    with pytest.raises(ConnectionRefusedError) as refused:
        socket.create_connection(("127.0.0.1", _closed_port()), timeout=5)
    assert is_transient(refused.value)
    once = _raised(refused.value)
    twice = _raised(once)
    assert is_transient(once) and is_transient(twice)


def test_botocore_unreachable_endpoint_is_transient_through_the_chain():
    import boto3
    from botocore.config import Config

    client = boto3.session.Session(aws_access_key_id="x", aws_secret_access_key="y", region_name="us-east-1").client(
        "s3", endpoint_url=f"http://127.0.0.1:{_closed_port()}", config=Config(retries={"max_attempts": 1}))
    with pytest.raises(Exception) as err:
        client.list_buckets()
    assert type(err.value).__name__ == "EndpointConnectionError"
    assert is_transient(err.value) and is_transient(_raised(err.value)) and is_transient(_raised(err.value, wrap_from=None))


@pytest.mark.parametrize("code", ["SlowDown", "ThrottlingException", "503"])
def test_client_error_with_a_throttling_or_server_code_is_transient(code):
    assert code in TRANSIENT_CODES
    assert is_transient(_raised(_client_error(code), wrap_from=False))
    assert is_transient(_raised(_client_error(code)))


@pytest.mark.parametrize("code", ["NoSuchBucket", "AccessDenied", "NoSuchKey"])
def test_client_error_a_user_must_fix_is_not_transient(code):
    assert not is_transient(_raised(_client_error(code)))


def test_requests_connection_error_under_mlflow_style_wrapping_is_transient():
    """MLflow's REST client raises MlflowException inside `except Exception` (no `from`): the context counts."""
    import requests

    with pytest.raises(requests.exceptions.ConnectionError) as err:
        requests.get(f"http://127.0.0.1:{_closed_port()}/api/2.0/mlflow/experiments/search", timeout=5)
    assert is_transient(_raised(err.value, wrap_from=None))


def test_mlflow_registry_unreachable_is_transient(monkeypatch):
    """The registry over HTTP: MlflowException raised while handling requests' ConnectionError."""
    from mlflow import MlflowClient

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    with pytest.raises(Exception) as err:
        url = f"http://127.0.0.1:{_closed_port()}"  # the registry too: else an earlier test's registry URI answers
        MlflowClient(tracking_uri=url, registry_uri=url).get_registered_model("teacher")
    assert type(err.value).__name__ == "MlflowException"
    assert is_transient(err.value) and is_transient(_raised(err.value))


def test_data_loader_s3_unreachable_is_transient(monkeypatch):
    """distill_gap.data.splits keeps botocore's error as the cause of its 'cannot reach <endpoint>' DistillError."""
    from distill_gap.data.splits import read_table

    for name, value in (("AWS_ACCESS_KEY_ID", "x"), ("AWS_SECRET_ACCESS_KEY", "y"), ("AWS_DEFAULT_REGION", "us-east-1"),
                        ("AWS_ENDPOINT_URL", f"http://127.0.0.1:{_closed_port()}"), ("AWS_MAX_ATTEMPTS", "1")):
        monkeypatch.setenv(name, value)
    with pytest.raises(DistillError, match="cannot reach http://127.0.0.1:") as err:
        read_table("s3://bucket/data/train.csv")
    assert is_transient(err.value)


def test_the_data_and_teacher_stages_retry_by_this_policy():
    from tasks.data import load_data
    from tasks.teacher import resolve_teacher_task

    assert load_data.retry_condition_fn is retry_if_transient
    assert resolve_teacher_task.retry_condition_fn is retry_if_transient


def test_plain_errors_and_suppressed_chains_are_not_transient():
    assert not is_transient(None)
    assert not is_transient(_raised(ValueError("bug"), wrap_from=False))
    assert not is_transient(DistillError("labels differ", "re-import the teacher"))
    # Message text never decides: a message that names a connection error is still a ValueError.
    assert not is_transient(ValueError("ConnectionError: cannot reach S3"))
    try:                                                     # `raise ... from None` ends the chain
        try:
            raise ConnectionResetError("reset")
        except ConnectionResetError:
            raise DistillError("hidden", "fix") from None
    except DistillError as hidden:
        assert not is_transient(hidden)


def test_a_cycle_in_the_chain_ends():
    a, b = ValueError("a"), ValueError("b")
    a.__context__, b.__context__ = b, a
    assert not is_transient(a)


def test_retry_conditions_judge_the_failed_state_and_warn_once_per_retry(caplog):
    from botocore.exceptions import EndpointConnectionError

    def failed(exc):
        return Failed(data=exc)

    for retry in (retry_if_transient, retry_if_transient_as("soft-label store error", logger="distill.soft_labels")):
        assert retry(None, None, failed(EndpointConnectionError(endpoint_url="http://x")))
        assert retry(None, None, failed(_raised(EndpointConnectionError(endpoint_url="http://x"))))
        assert retry(None, None, failed(_client_error("SlowDown")))
        assert not retry(None, None, failed(_client_error("NoSuchBucket")))
        assert not retry(None, None, failed(_raised(_client_error("AccessDenied"))))
        assert not retry(None, None, failed(DistillError("labels differ", "re-import the teacher")))
        assert not retry(None, None, failed(ValueError("bug")))
        assert not retry(None, None, Completed(data=1))

    class Task:                               # what Prefect hands the condition: the task and its run
        retries, retry_delay_seconds = 2, [5, 15]

    class TaskRun:
        name, run_count = "label-shard-1", 2

    with caplog.at_level("WARNING"):
        assert retry_if_transient_as("soft-label store error", logger="distill.soft_labels")(
            Task(), TaskRun(), failed(_raised(ConnectionResetError("reset"))))
        assert not retry_if_transient(Task(), TaskRun(), failed(ValueError("bug")))
    assert [(r.name, r.getMessage()) for r in caplog.records] == [
        ("distill.soft_labels", "label-shard-1: soft-label store error on attempt 2 of 3, retrying in 15 s: "
                                "store trouble")]
