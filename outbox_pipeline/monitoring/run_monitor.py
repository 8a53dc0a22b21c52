"""What one Dagster run reports to Sentry: a transaction, spans, metrics and cron check-ins.

A run-scoped resource: with the in-process executor it is set up once per run,
before the first op, and torn down after the last, so the transaction covers
the whole run whatever fails in between. Every call is a no-op when Sentry is
not configured (no DSN, or DEBUG=true), and no Sentry problem fails the run:
errors of the monitoring itself are logged as warnings.

The run's status comes from its event log at teardown (any STEP_FAILURE makes
it ``internal_error``), so a failure that no hook reported, such as an
interrupted step, still marks the transaction failed. Run tags record the
trace id, the open check-in and the transaction status, which lets the
run-failure sensor finish the report of a run whose worker died.
"""

import contextlib
import time
from collections.abc import Iterator
from typing import Any

import dagster as dg
import sentry_sdk
import sentry_sdk.metrics
from pydantic import Field, PrivateAttr

from outbox_pipeline.monitoring.crons import CronMonitor
from outbox_pipeline.monitoring.sentry_setup import SentrySettings, flush_sentry, init_sentry

RELAY_JOB = "process_outbox_events"
TRANSACTION_OP = "process_events"
TRANSACTION_NAME = "process_outbox_events"

# Run tags written by the monitor (visible in the Dagster UI, read by the run-failure sensor).
TRACE_ID_TAG = "outbox_pipeline/sentry_trace_id"
CHECK_IN_TAG = "outbox_pipeline/sentry_check_in_id"
TRANSACTION_STATUS_TAG = "outbox_pipeline/sentry_transaction_status"

MAX_ERROR_CHARS = 1000


def one_line(error: BaseException | str) -> str:
    text = " ".join(str(error).split()) or type(error).__name__
    return text[:MAX_ERROR_CHARS]


def dagster_tags(run: dg.DagsterRun | None, job_name: str, run_id: str) -> dict[str, str]:
    """Sentry tags that identify a Dagster run, shared by transactions, hooks and sensors."""
    tags = {"dagster.job": job_name, "dagster.run_id": run_id}
    run_tags = run.tags if run is not None else {}
    if run_tags.get("dagster/partition"):
        tags["dagster.partition"] = run_tags["dagster/partition"]
    tags["dagster.run_retry_number"] = run_tags.get("dagster/retry_number", "0")
    return tags


def _as_int(value: object) -> int:
    try:
        return int(value or 0)
    except (TypeError, ValueError):
        return 0


def metric_attributes(job_name: str, environment: str) -> dict[str, str]:
    return {"job": job_name, "environment": environment}


def first_step_failure(instance: dg.DagsterInstance, run_id: str) -> str | None:
    """The error of the run's first STEP_FAILURE event, in one line; None when no step failed."""
    records = instance.get_records_for_run(run_id=run_id, of_type=dg.DagsterEventType.STEP_FAILURE, limit=1).records
    if not records:
        return None
    event = records[0].event_log_entry.dagster_event
    data = event.step_failure_data if event is not None else None
    if data is not None and data.error is not None:
        error = data.error
        # User code errors come wrapped: the cause is the op's own exception.
        if error.cls_name == "DagsterExecutionStepExecutionError" and error.cause is not None:
            error = error.cause
        return one_line(error.message)
    return one_line(records[0].event_log_entry.message or "a step failed")


class RelayRunMonitor(dg.ConfigurableResource):
    """Sentry reporting for the run it is set up in, with the code location's Sentry settings."""

    relay_job: str = Field(default=RELAY_JOB, description="The job whose runs get a transaction and cron check-ins.")
    dsn: str | None = Field(default=None, description="Sentry DSN (SENTRY_CONFIG_DSN); unset: nothing is sent.")
    environment: str = "development"
    debug: bool = False
    traces_sample_rate: float = 1.0
    send_event_payloads: bool = False
    flush_timeout_seconds: float = 2.0
    cron: CronMonitor = Field(default_factory=CronMonitor, description="The relay's Sentry Crons monitor.")

    _active: bool = PrivateAttr(default=False)
    _transaction: Any = PrivateAttr(default=None)
    _check_in_id: str | None = PrivateAttr(default=None)
    _job_name: str = PrivateAttr(default="")
    _run_id: str = PrivateAttr(default="")
    _started: float = PrivateAttr(default=0.0)
    _error: str | None = PrivateAttr(default=None)
    _data: dict = PrivateAttr(default_factory=dict)
    _reported: set = PrivateAttr(default_factory=set)

    def setup_for_execution(self, context: dg.InitResourceContext) -> None:
        self._transaction = None
        self._check_in_id = None
        self._error = None
        self._reported = set()
        self._started = time.perf_counter()
        run = context.dagster_run
        self._job_name = run.job_name if run else ""
        self._run_id = run.run_id if run else ""
        self._data = {
            "batches": 0,
            "events_processed": 0,
            "events_failed": 0,
            "retry_attempts": 0,
            "failed_steps": 0,
            "run_retry_number": _as_int((run.tags if run else {}).get("dagster/retry_number")),
        }
        try:
            self._active = init_sentry(self.sentry_settings())
        except Exception as exc:  # bad Sentry settings must not stop the relay
            context.log.warning(f"Sentry is off for this run: {one_line(exc)}")
            self._active = False
        if not self._active:
            return
        # A run worker runs one run: start its breadcrumbs from nothing.
        sentry_sdk.get_isolation_scope().clear_breadcrumbs()
        if self._job_name != self.relay_job or run is None:
            return
        try:
            self._start_transaction(context, run)
        except Exception as exc:
            context.log.warning(f"could not start the Sentry transaction: {one_line(exc)}")

    def _start_transaction(self, context: dg.InitResourceContext, run: dg.DagsterRun) -> None:
        transaction = sentry_sdk.start_transaction(op=TRANSACTION_OP, name=TRANSACTION_NAME)
        for key, value in dagster_tags(run, self._job_name, run.run_id).items():
            transaction.set_tag(key, value)
        self._transaction = transaction
        self._check_in_id = self.cron.open_check_in()
        run_tags = {TRACE_ID_TAG: transaction.trace_id}
        if self._check_in_id:
            run_tags[CHECK_IN_TAG] = self._check_in_id
        context.instance.add_run_tags(run.run_id, run_tags)

    def teardown_after_execution(self, context: dg.InitResourceContext) -> None:
        try:
            if self._transaction is not None:
                self._finish_transaction(context)
        except Exception as exc:
            context.log.warning(f"could not finish the Sentry transaction: {one_line(exc)}")
        finally:
            self._transaction = None
            # A run worker exits right after this: send what is queued, bounded by the flush timeout.
            flush_sentry()

    def _finish_transaction(self, context: dg.InitResourceContext) -> None:
        transaction = self._transaction
        duration = time.perf_counter() - self._started
        # The event log knows of failures no hook reported (an interrupted step, say).
        error = self._error or first_step_failure(context.instance, self._run_id)
        for key, value in {**self._data, "duration": round(duration, 3)}.items():
            transaction.set_data(key, value)
        status = "ok" if error is None else "internal_error"
        transaction.set_status(status)
        if error is not None:
            transaction.set_data("error", error)
        transaction.finish()
        self.cron.close_check_in(self._check_in_id, ok=error is None, duration=duration)
        context.instance.add_run_tags(self._run_id, {TRANSACTION_STATUS_TAG: status})

    # -- called by ops and hooks ----------------------------------------------------------------

    def sentry_settings(self) -> SentrySettings:
        return SentrySettings(
            dsn=self.dsn,
            environment=self.environment,
            debug=self.debug,
            traces_sample_rate=self.traces_sample_rate,
            send_event_payloads=self.send_event_payloads,
            flush_timeout_seconds=self.flush_timeout_seconds,
        )

    @classmethod
    def from_settings(cls, settings, relay_name: str = "default", relay_job: str = RELAY_JOB) -> "RelayRunMonitor":
        """The monitor of one relay; the DSN stays a variable's name in the UI."""
        return cls(
            relay_job=relay_job,
            dsn=dg.EnvVar("SENTRY_CONFIG_DSN") if settings.sentry_dsn else None,
            environment=settings.sentry_environment,
            debug=settings.debug,
            traces_sample_rate=settings.sentry_traces_sample_rate,
            send_event_payloads=settings.sentry_send_event_payloads,
            flush_timeout_seconds=settings.sentry_flush_timeout_seconds,
            cron=CronMonitor.from_settings(settings, relay_name),
        )

    @property
    def transaction(self) -> Any:
        """The run's transaction, or None (Sentry off, or not the relay job)."""
        return self._transaction

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

    def data(self) -> dict:
        return dict(self._data)

    def record_failure(self, error: BaseException | str) -> None:
        if self._error is None:
            self._error = one_line(error)

    def note_failure(self, fingerprint: tuple[str, ...], error: BaseException | str) -> bool:
        """Record a failed step; True only for the first failure with this fingerprint in the run.

        A ClickHouse outage fails every mapped load step of the run the same way:
        one event per run and cause keeps issue counts meaning "failed runs".
        """
        self.record_failure(error)
        self.add_data(failed_steps=1)
        if fingerprint in self._reported:
            return False
        self._reported.add(fingerprint)
        return True

    def count(self, name: str, value: float = 1, unit: str | None = None) -> None:
        sentry_sdk.metrics.count(name, value, unit=unit, attributes=self._attributes())

    def gauge(self, name: str, value: float, unit: str | None = None) -> None:
        sentry_sdk.metrics.gauge(name, value, unit=unit, attributes=self._attributes())

    def distribution(self, name: str, value: float, unit: str | None = None) -> None:
        sentry_sdk.metrics.distribution(name, value, unit=unit, attributes=self._attributes())

    def _attributes(self) -> dict[str, str]:
        return metric_attributes(self._job_name, self.environment)

    def on_retry(self, what: str, attempt: int, exc: BaseException, delay: float) -> None:
        """Callback for the relay's transient-error retries."""
        self.add_data(retry_attempts=1)
        self.count("outbox.retry_attempts")
        sentry_sdk.add_breadcrumb(
            category="outbox.retry",
            level="warning",
            message=f"retrying {what} (attempt {attempt + 1}) in {delay:.2f}s after {type(exc).__name__}: {one_line(exc)}",
        )
