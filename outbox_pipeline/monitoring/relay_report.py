"""What one relay run sends to Sentry: a transaction, a cron check-in pair, metrics and retry breadcrumbs.

Framework-free: the Dagster ``monitor`` resource (run_monitor) and the
``outbox-pipeline relay`` command report a run through the same
:class:`RelayRunReport`, so a run looks the same in Sentry whoever ran it. The
tag ``outbox.runner`` (``dagster`` or ``cli``) tells them apart.

Nothing here may fail or change a run: the callers catch and log what goes
wrong, and reading the queue at the end of a run is allowed to fail.
"""

from __future__ import annotations

import contextlib
import datetime
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import sentry_sdk
import sentry_sdk.metrics

from outbox_pipeline.config import errors
from outbox_pipeline.config.settings import RelaySettings
from outbox_pipeline.monitoring.crons import CronMonitor
from outbox_pipeline.monitoring.queue_tracing import continue_batch_traces
from outbox_pipeline.monitoring.sentry_setup import flush_sentry, init_sentry
from outbox_pipeline.relay.delivery import LoadResult
from outbox_pipeline.relay.retrying import RetryNotice
from outbox_pipeline.stores.outbox_store import BatchHandle, OutboxCounts, OutboxStore

RELAY_JOB = "process_outbox_events"
TRANSACTION_OP = "process_events"
TRANSACTION_NAME = "process_outbox_events"
RUNNER_TAG = "outbox.runner"

MAX_ERROR_CHARS = 1000


def one_line(error: BaseException | str) -> str:
    return errors.one_line(error, MAX_ERROR_CHARS)


def metric_attributes(job_name: str, environment: str) -> dict[str, str]:
    return {"job": job_name, "environment": environment}


class RelayRunReport:
    """The Sentry record of one run: figures, metrics, and (once opened) one transaction and one check-in pair."""

    def __init__(self, job_name: str, environment: str, cron: CronMonitor | None = None, **data: Any):
        self.job_name = job_name
        self.environment = environment
        self.cron = cron or CronMonitor()
        self.transaction: Any = None
        self.check_in_id: str | None = None
        self.data: dict[str, Any] = {
            "batches": 0,
            "events_processed": 0,
            "events_failed": 0,
            "retry_attempts": 0,
            "failed_steps": 0,
            **data,
        }
        self._started = time.perf_counter()
        self._queue_after_recorded = False

    # -- the transaction and the check-in -----------------------------------------------------

    def open(self, tags: dict[str, str]) -> None:
        """Start the run's transaction and open its check-in (``in_progress``)."""
        transaction = sentry_sdk.start_transaction(op=TRANSACTION_OP, name=TRANSACTION_NAME)
        for key, value in tags.items():
            transaction.set_tag(key, value)
        self.transaction = transaction
        self.check_in_id = self.cron.open_check_in()

    def close(self, error: str | None) -> str | None:
        """Finish the transaction and close the check-in; returns the transaction's status (None if none was open)."""
        transaction, self.transaction = self.transaction, None
        if transaction is None:
            return None
        duration = time.perf_counter() - self._started
        for key, value in {**self.data, "duration": round(duration, 3)}.items():
            transaction.set_data(key, value)
        status = "ok" if error is None else "internal_error"
        transaction.set_status(status)
        if error is not None:
            transaction.set_data("error", error)
        transaction.finish()
        self.cron.close_check_in(self.check_in_id, ok=error is None, duration=duration)
        return status

    @contextlib.contextmanager
    def span(self, op: str, description: str, **data: Any) -> Iterator[Any]:
        if self.transaction is None:
            yield None
            return
        with self.transaction.start_child(op=op, name=description) as span:
            for key, value in data.items():
                span.set_data(key, value)
            yield span

    def finished_span(self, op: str, description: str, started_at: datetime.datetime, **data: Any) -> None:
        """A child span from ``started_at`` until now, never made current: a long op's summary in one span."""
        if self.transaction is None:
            return
        span = self.transaction.start_child(op=op, name=description, start_timestamp=started_at)
        for key, value in data.items():
            span.set_data(key, value)
        span.finish()

    # -- figures and metrics -------------------------------------------------------------------

    def add_data(self, **increments: float) -> None:
        for key, value in increments.items():
            self.data[key] = self.data.get(key, 0) + value

    def count(self, name: str, value: float = 1, unit: str | None = None) -> None:
        sentry_sdk.metrics.count(name, value, unit=unit, attributes=self._attributes())

    def gauge(self, name: str, value: float, unit: str | None = None) -> None:
        sentry_sdk.metrics.gauge(name, value, unit=unit, attributes=self._attributes())

    def distribution(self, name: str, value: float, unit: str | None = None) -> None:
        sentry_sdk.metrics.distribution(name, value, unit=unit, attributes=self._attributes())

    def _attributes(self) -> dict[str, str]:
        return metric_attributes(self.job_name, self.environment)

    def record_queue_before(self, counts: OutboxCounts) -> None:
        self.data["queue_size_before"] = counts.pending
        self.gauge("outbox.queue_size", counts.pending)

    def record_queue_after(self, counts: OutboxCounts) -> None:
        self.data["queue_size_after"] = counts.pending
        self.gauge("outbox.queue_size", counts.pending)
        self.gauge("outbox.oldest_pending_age", counts.oldest_pending_age_seconds or 0.0, unit="second")
        self._queue_after_recorded = True

    @property
    def queue_after_recorded(self) -> bool:
        return self._queue_after_recorded

    def record_batch(self, result: LoadResult) -> None:
        """A batch marked processed: its events count as processed, those ClickHouse rejected as failed."""
        self.add_data(batches=1, events_processed=result.loaded_rows, events_failed=len(result.rejected))
        self.count("outbox.events_processed", result.loaded_rows)
        if result.rejected:
            self.count("outbox.events_failed", len(result.rejected))

    def record_retry(self, notice: RetryNotice) -> None:
        self.add_data(retry_attempts=1)
        self.count("outbox.retry_attempts")
        sentry_sdk.add_breadcrumb(category="outbox.retry", level="warning", message=notice.message)

    def trace_batch(self, outbox: OutboxStore, handle: BatchHandle, result: LoadResult, *, destination: str) -> int:
        """Continue the producers' traces of a sample of a loaded batch's events (queue_tracing); returns how many.

        Raises what went wrong (the callers log it): a run never fails because of it.
        """
        return continue_batch_traces(outbox, handle, result, destination=destination)

    def batch_tracer(
        self, outbox: OutboxStore, destination: str, warn: Callable[[str], None] | None = None
    ) -> Callable[[BatchHandle, LoadResult], None]:
        """``Relay.drain(on_loaded=...)``: trace each loaded batch, a failure to do so being one warning."""

        def trace(handle: BatchHandle, result: LoadResult) -> None:
            try:
                self.trace_batch(outbox, handle, result, destination=destination)
            except Exception as exc:
                (warn or _warn_on_stderr)(f"could not continue the traces of batch {handle.batch_id} in Sentry: {one_line(exc)}")

        return trace


def _warn_on_stderr(message: str) -> None:
    print(f"outbox-pipeline: warning: {message}", file=sys.stderr)


@contextlib.contextmanager
def command_run_report(
    read_queue: Callable[[], OutboxCounts],
    *,
    settings: RelaySettings,
    tags: dict[str, str],
    warn: Callable[[str], None] = _warn_on_stderr,
) -> Iterator[RelayRunReport]:
    """Report a relay run made outside Dagster (``outbox-pipeline relay``) like a Dagster run.

    One transaction and one check-in pair, the queue read at the start and at the
    end whatever happened in between, and a failure sent as one error event. The
    run's own exception, if any, passes through unchanged.
    """
    active = False
    try:
        active = init_sentry(settings.sentry)
    except Exception as exc:  # Sentry must not stop the relay
        warn(f"Sentry is off for this run: {one_line(exc)}")
    report = RelayRunReport(RELAY_JOB, settings.sentry_environment, CronMonitor.from_settings(settings))
    if not active:
        yield report
        return
    error: str | None = None
    try:
        report.open({**tags, RUNNER_TAG: "cli"})
        _record_queue(report, read_queue, at_end=False)
    except Exception as exc:
        warn(f"could not start the Sentry transaction: {one_line(exc)}")
    try:
        yield report
    except BaseException as exc:
        error = one_line(exc)
        _capture_command_failure(report, exc, tags)
        raise
    finally:
        try:
            _record_queue(report, read_queue, at_end=True)
            report.close(error)
        except Exception as exc:
            warn(f"could not finish the Sentry transaction: {one_line(exc)}")
        # The command exits right after this: send what is queued, bounded by the flush timeout.
        flush_sentry()


def _record_queue(report: RelayRunReport, read_queue: Callable[[], OutboxCounts], *, at_end: bool) -> None:
    # A queue that cannot be read (PostgreSQL down: the likely reason the run failed) leaves the figure out.
    try:
        counts = read_queue()
    except Exception:
        return
    (report.record_queue_after if at_end else report.record_queue_before)(counts)


def _capture_command_failure(report: RelayRunReport, exc: BaseException, tags: dict[str, str]) -> None:
    if isinstance(exc, KeyboardInterrupt):
        return  # stopped by the user: the transaction says so, an issue would not help
    try:
        with sentry_sdk.new_scope() as scope:
            if report.transaction is not None:
                scope.span = report.transaction  # links the issue to the run's trace
            for key, value in {**tags, RUNNER_TAG: "cli"}.items():
                scope.set_tag(key, value)
            scope.set_context("outbox_run", dict(report.data))
            scope.fingerprint = ["outbox-relay-command-failure", type(exc).__name__]
            sentry_sdk.capture_exception(exc)
    except Exception:
        pass  # reporting must never hide the run's own error
