"""What one Dagster run reports to Sentry: a transaction, spans, metrics and cron check-ins.

A run-scoped resource: with the in-process executor it is set up once per run,
before the first op, and torn down after the last, so the transaction covers
the whole run whatever fails in between. Every call is a no-op when Sentry is
not configured (no DSN, or DEBUG=true).
"""

import contextlib
import os
import time
from collections.abc import Iterator
from typing import Any

import dagster as dg
import sentry_sdk
import sentry_sdk.metrics
from pydantic import PrivateAttr

from outbox_pipeline.monitoring.sentry_setup import SentrySettings, flush_sentry, init_sentry

RELAY_JOB = "process_outbox_events"
TRANSACTION_OP = "process_events"
TRANSACTION_NAME = "process_outbox_events"


def cron_monitor_config() -> dict[str, Any]:
    """Sentry Crons monitor for the relay, from SENTRY_CRON_* settings."""
    return {
        "schedule": {"type": "interval", "value": int(os.environ.get("SENTRY_CRON_INTERVAL_MINUTES", "10")), "unit": "minute"},
        "checkin_margin": int(os.environ.get("SENTRY_CRON_CHECKIN_MARGIN_MINUTES", "5")),
        "max_runtime": int(os.environ.get("SENTRY_CRON_MAX_RUNTIME_MINUTES", "30")),
        "failure_issue_threshold": int(os.environ.get("SENTRY_CRON_FAILURE_THRESHOLD", "2")),
        "recovery_threshold": 1,
        "timezone": "UTC",
    }


def cron_monitor_slug() -> str:
    return os.environ.get("SENTRY_CRON_MONITOR_SLUG", "outbox-relay")


def metric_attributes(job_name: str) -> dict[str, str]:
    return {"job": job_name, "environment": SentrySettings.from_env().environment}


class RelayRunMonitor(dg.ConfigurableResource):
    """Sentry reporting for the run it is set up in."""

    _transaction: Any = PrivateAttr(default=None)
    _check_in_id: str | None = PrivateAttr(default=None)
    _job_name: str = PrivateAttr(default="")
    _started: float = PrivateAttr(default=0.0)
    _error: str | None = PrivateAttr(default=None)
    _data: dict = PrivateAttr(default_factory=dict)

    def setup_for_execution(self, context: dg.InitResourceContext) -> None:
        init_sentry()
        run = context.dagster_run
        self._job_name = run.job_name if run else ""
        self._started = time.perf_counter()
        self._error = None
        self._data = {}
        if self._job_name != RELAY_JOB:
            return
        self._transaction = sentry_sdk.start_transaction(op=TRANSACTION_OP, name=TRANSACTION_NAME)
        self._transaction.set_tag("dagster.run_id", run.run_id)
        self._transaction.set_tag("dagster.job", self._job_name)
        partition = run.tags.get("dagster/partition")
        if partition:
            self._transaction.set_tag("dagster.partition", partition)
        self._check_in_id = sentry_sdk.crons.capture_checkin(
            monitor_slug=cron_monitor_slug(), status="in_progress", monitor_config=cron_monitor_config()
        )

    def teardown_after_execution(self, context: dg.InitResourceContext) -> None:
        duration = time.perf_counter() - self._started
        if self._transaction is not None:
            transaction = self._transaction
            self._transaction = None
            for key, value in {**self._data, "duration": round(duration, 3)}.items():
                transaction.set_data(key, value)
            if self._error is None:
                transaction.set_status("ok")
            else:
                transaction.set_status("internal_error")
                transaction.set_data("error", self._error)
            transaction.finish()
            sentry_sdk.crons.capture_checkin(
                monitor_slug=cron_monitor_slug(),
                check_in_id=self._check_in_id,
                status="ok" if self._error is None else "error",
                duration=duration,
            )
        # A run worker exits right after this: send what is queued, bounded by the flush timeout.
        flush_sentry()

    # -- called by ops and hooks ----------------------------------------------------------------

    @contextlib.contextmanager
    def span(self, op: str, description: str, **data: Any) -> Iterator[Any]:
        if self._transaction is None:
            yield None
            return
        with self._transaction.start_child(op=op, name=description) as span:
            for key, value in data.items():
                span.set_data(key, value)
            yield span

    def set_data(self, **data: Any) -> None:
        self._data.update(data)

    def add_data(self, **increments: float) -> None:
        for key, value in increments.items():
            self._data[key] = self._data.get(key, 0) + value

    def record_failure(self, error: BaseException | str) -> None:
        if self._error is None:
            self._error = " ".join(str(error).split()) or type(error).__name__

    def count(self, name: str, value: float = 1, unit: str | None = None) -> None:
        sentry_sdk.metrics.count(name, value, unit=unit, attributes=metric_attributes(self._job_name))

    def gauge(self, name: str, value: float, unit: str | None = None) -> None:
        sentry_sdk.metrics.gauge(name, value, unit=unit, attributes=metric_attributes(self._job_name))

    def distribution(self, name: str, value: float, unit: str | None = None) -> None:
        sentry_sdk.metrics.distribution(name, value, unit=unit, attributes=metric_attributes(self._job_name))

    def on_retry(self, what: str, attempt: int, exc: BaseException, delay: float) -> None:
        """Callback for the relay's transient-error retries."""
        self.add_data(retry_attempts=1)
        self.count("outbox.retry_attempts")
        sentry_sdk.add_breadcrumb(
            category="outbox.retry",
            level="warning",
            message=f"retrying {what} (attempt {attempt + 1}) in {delay:.2f}s after {type(exc).__name__}: {exc}",
        )
