"""The transient-error policy: which failures are worth a retry, and the Prefect retry condition built on it.

A failure is transient when connection trouble or S3 throttling/server trouble appears anywhere along its
exception chain (`raise ... from err` keeps it visible through a DistillError). The decision reads exception
TYPES and botocore error codes, never message text, so rewording a message cannot change what is retried.
"""

from __future__ import annotations

import logging
from functools import lru_cache

from distill_gap.errors import DistillError

# S3 ClientError codes worth a retry (throttling, server trouble, conditional write in flight).
TRANSIENT_CODES = frozenset({"SlowDown", "Throttling", "ThrottlingException", "RequestTimeout",
                             "RequestTimeTooSkewed", "InternalError", "ServiceUnavailable",
                             "ConditionalRequestConflict", "500", "502", "503", "504"})


@lru_cache(maxsize=1)
def _connection_types() -> tuple[type[BaseException], ...]:
    """Connection-level exception types: the socket's own, botocore's (S3) and requests' (MLflow over HTTP).

    Imported when the first failure is judged, not when a stage module is imported.
    """
    from botocore.exceptions import ConnectionError as BotoConnectionError
    from botocore.exceptions import HTTPClientError
    from requests.exceptions import ConnectionError as RequestsConnectionError
    from requests.exceptions import Timeout as RequestsTimeout

    # builtin ConnectionError: refused, reset or aborted sockets (ConnectionRefusedError, ...);
    # botocore: endpoint unreachable, connect/read timeouts, a connection dropped mid-request;
    # requests (under MLflow's REST client): the same for a tracking or artifact server.
    return (ConnectionError, BotoConnectionError, HTTPClientError, RequestsConnectionError, RequestsTimeout)


def is_transient(exc: BaseException | None) -> bool:
    """True for connection trouble and S3 throttling/server errors anywhere along the exception chain.

    The chain is followed as Python prints it: `__cause__` (raise ... from err), else `__context__`
    unless suppressed (raise ... from None ends it). A botocore ClientError decides by its error code.
    """
    from botocore.exceptions import ClientError

    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, _connection_types()):
            return True
        if isinstance(exc, ClientError):
            return str(exc.response.get("Error", {}).get("Code", "")) in TRANSIENT_CODES
        exc = exc.__cause__ if exc.__cause__ is not None or exc.__suppress_context__ else exc.__context__
    return False


def retry_if_transient(task, task_run, state) -> bool:
    """Prefect `retry_condition_fn`: retry transient errors only, never bad data, labels or bugs.

    Prefect asks only while retries are left, so a True here is a retry that will happen: it is logged
    as a warning (attempt, delay, the error), visible in the run's logs at the default level.
    """
    return _judge(task, task_run, state, what="transient error", logger="distill.retry")


def retry_if_transient_as(what: str, *, logger: str = "distill.retry"):
    """retry_if_transient whose retry warning names `what` (e.g. "soft-label store error") on `logger`."""
    def condition(task, task_run, state) -> bool:
        return _judge(task, task_run, state, what=what, logger=logger)

    condition.__name__ = condition.__qualname__ = f"retry_if_transient_as({what!r})"
    return condition


def _judge(task, task_run, state, *, what: str, logger: str) -> bool:
    try:
        state.result()
    except Exception as exc:  # noqa: BLE001 - the failure being judged
        transient = is_transient(exc)
        if transient and task is not None and task_run is not None:
            _warn_retry(task, task_run, exc, what=what, logger=logger)
        return transient
    return False


def _warn_retry(task, task_run, exc: BaseException, *, what: str, logger: str) -> None:
    attempt = max(1, int(getattr(task_run, "run_count", 1) or 1))
    delays = task.retry_delay_seconds
    if isinstance(delays, (list, tuple)):
        delay = delays[min(attempt - 1, len(delays) - 1)] if delays else 0
    else:
        delay = delays or 0
    problem = exc.problem if isinstance(exc, DistillError) else f"{type(exc).__name__}: {exc}"
    message = (f"{task_run.name}: {what} on attempt {attempt} of {task.retries + 1}, retrying in {delay:g} s: "
               f"{problem}")
    from prefect.logging.loggers import get_run_logger   # not from `prefect`: that import reconfigures logging
    from prefect.exceptions import MissingContextError

    try:
        get_run_logger().warning(message)        # in the run's logs, where the retry shows
    except MissingContextError:
        logging.getLogger(logger).warning(message)
