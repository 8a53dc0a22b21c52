"""Retrying transient failures with exponential backoff and full jitter."""

from __future__ import annotations

import dataclasses
import random
import time
from collections.abc import Callable
from typing import Protocol, TypeVar

import psycopg

from outbox_pipeline.config.errors import LeaseLostError, RetriesExhaustedError, SchemaMissingError, StoreBusyError, one_line
from outbox_pipeline.stores.clickhouse_connection import ErrorKind, classify_clickhouse_error

T = TypeVar("T")

MAX_BACKOFF_SECONDS = 30.0


@dataclasses.dataclass(frozen=True)
class RetryNotice:
    """A transient failure about to be retried, for whoever reports retries."""

    what: str  # "inserting into ClickHouse", "claiming a batch in PostgreSQL", ...
    attempt: int  # the attempt that failed, from 1
    attempts: int  # attempts in all
    error: BaseException
    delay: float  # seconds until the next attempt

    @property
    def message(self) -> str:
        """One line, e.g. ``inserting into ClickHouse failed (OperationalError: HTTP 503 ...); attempt 2 of 5 in 0.42 s``."""
        reason = " ".join(str(self.error).split())[:300]
        cause = f"{type(self.error).__name__}: {reason}" if reason else type(self.error).__name__
        return f"{self.what} failed ({cause}); attempt {self.attempt + 1} of {self.attempts} in {self.delay:.2f} s"


RetryCallback = Callable[[RetryNotice], None]


@dataclasses.dataclass(frozen=True)
class BackoffPolicy:
    """How often and how patiently a transient failure is retried (not Dagster's op ``RetryPolicy``)."""

    attempts: int = 5
    base_seconds: float = 0.5

    def backoff(self, attempt: int) -> float:
        """Full jitter: uniform in [0, base * 2^(attempt-1)], capped."""
        return random.uniform(0, min(MAX_BACKOFF_SECONDS, self.base_seconds * 2 ** (attempt - 1)))


def is_transient_postgres_error(exc: BaseException) -> bool:
    return isinstance(
        exc,
        (
            psycopg.OperationalError,  # connection refused/reset, server restart (57P01), timeouts
            psycopg.errors.SerializationFailure,
            psycopg.errors.DeadlockDetected,
            psycopg.errors.LockNotAvailable,
        ),
    ) and not isinstance(exc, psycopg.errors.UndefinedTable)


def is_transient(exc: BaseException) -> bool:
    if isinstance(exc, (SchemaMissingError, LeaseLostError)):
        return False
    if isinstance(exc, StoreBusyError):
        return True
    if isinstance(exc, psycopg.Error):
        return is_transient_postgres_error(exc)
    return classify_clickhouse_error(exc) is ErrorKind.TRANSIENT


def call_with_retries(
    what: str,
    fn: Callable[[], T],
    policy: BackoffPolicy,
    *,
    on_retry: RetryCallback | None = None,
    before_retry: Callable[[BaseException], None] | None = None,
    transient: Callable[[BaseException], bool] = is_transient,
) -> T:
    """Call ``fn``; on a transient error wait and call again, up to ``policy.attempts`` calls in all.

    ``before_retry`` repairs state between attempts (for example reconnecting);
    when every attempt failed, RetriesExhaustedError says so in one line.
    """
    attempt = 1
    while True:
        try:
            return fn()
        except Exception as exc:
            if not transient(exc):
                raise
            if attempt >= policy.attempts:
                reason = one_line(exc, 300)
                raise RetriesExhaustedError(
                    f"{what} failed {attempt} times in a row ({reason}); nothing was lost: "
                    "the events stay pending and the next run retries them"
                ) from exc
            delay = policy.backoff(attempt)
            if on_retry is not None:
                on_retry(RetryNotice(what, attempt, policy.attempts, exc, delay))
            time.sleep(delay)
            if before_retry is not None:
                try:
                    before_retry(exc)
                except Exception:  # the next attempt reports the state of the store
                    pass
            attempt += 1


class Reconnectable(Protocol):
    def reconnect(self) -> None: ...


def call_postgres_with_retries(
    store: Reconnectable,
    what: str,
    fn: Callable[[], T],
    policy: BackoffPolicy,
    *,
    on_retry: RetryCallback | None = None,
) -> T:
    """``call_with_retries`` for a call on ``store``'s PostgreSQL connection, reconnecting between attempts.

    A dropped connection (server restart, network reset) cannot be used again, so
    each retry runs on a fresh one.
    """
    return call_with_retries(f"{what} in PostgreSQL", fn, policy, on_retry=on_retry, before_retry=lambda exc: store.reconnect())
