"""What one Dagster run reports to Sentry: a transaction, spans, metrics and cron check-ins.

A run-scoped resource: with the in-process executor it is set up once per run,
before the first op, and torn down after the last, so the transaction covers
the whole run whatever fails in between. Every call is a no-op when Sentry is
not configured (no DSN, or DEBUG=true), and no Sentry problem fails the run:
errors of the monitoring itself are logged as warnings. What is sent, and how,
is shared with ``outbox-pipeline relay`` (relay_report).

Resources can be set up again after a run has ended: `dagster job execute`
opens the run's result (``JobExecutionResult`` as a context manager), which
initialises them once more after RUN_SUCCESS. A monitor set up for a run that
has already finished stays silent, so each run sends one transaction and one
check-in pair. (The run's tags would not do as the sign: a run retried by the
daemon inherits its parent's tags.)

The run's status comes from its event log at teardown (any STEP_FAILURE makes
it ``internal_error``), so a failure that no hook reported, such as an
interrupted step, still marks the transaction failed. The queue figures of the
end of the run are read at teardown when no op recorded them (the run failed),
so a failed run keeps them too. Run tags record the trace id, the open
check-in and the transaction status, which lets the run-failure sensor finish
the report of a run whose worker died.
"""

import contextlib
import dataclasses
import datetime
from collections.abc import Callable
from typing import Any

import dagster as dg
import sentry_sdk
from pydantic import Field, PrivateAttr

from outbox_pipeline.config.settings import RelaySettings
from outbox_pipeline.monitoring.crons import CronMonitor
from outbox_pipeline.monitoring.relay_report import RELAY_JOB, RUNNER_TAG, RelayRunReport, one_line
from outbox_pipeline.monitoring.sentry_setup import SentrySettings, flush_sentry, init_sentry
from outbox_pipeline.relay.delivery import LoadResult
from outbox_pipeline.relay.retrying import RetryNotice
from outbox_pipeline.stores.outbox_store import BatchHandle, OutboxCounts, OutboxStore

# Run tags written by the monitor (visible in the Dagster UI, read by the run-failure sensor).
TRACE_ID_TAG = "outbox_pipeline/sentry_trace_id"
CHECK_IN_TAG = "outbox_pipeline/sentry_check_in_id"
TRANSACTION_STATUS_TAG = "outbox_pipeline/sentry_transaction_status"
# The relay of a transaction or an issue, where one run reports for several relays.
RELAY_SENTRY_TAG = "outbox.relay"


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


def run_has_ended(context: dg.InitResourceContext, run: dg.DagsterRun) -> bool:
    """Whether the run was already over when these resources were set up (a re-initialisation to read outputs)."""
    stored = context.instance.get_run_by_id(run.run_id) if context.instance is not None else None
    return (stored or run).is_finished


# The Sentry settings a monitor carries as its configuration (the release is the package's own).
_SENTRY_FIELDS = tuple(field.name for field in dataclasses.fields(SentrySettings) if field.name != "release")


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
    relay_name: str = Field(default="default", description="The relay reported on.")
    fleet_member: bool = Field(
        default=False, description="Several relays report from one run (a fleet): tags name the relay, run tags are per relay."
    )

    _active: bool = PrivateAttr(default=False)
    _silent: bool = PrivateAttr(default=False)
    _report: RelayRunReport = PrivateAttr(default_factory=lambda: RelayRunReport("", "development"))
    _run_id: str = PrivateAttr(default="")
    _error: str | None = PrivateAttr(default=None)
    _reported: set = PrivateAttr(default_factory=set)
    _read_queue: Callable[[], OutboxCounts] | None = PrivateAttr(default=None)

    @classmethod
    def from_settings(
        cls, settings: RelaySettings, relay_name: str = "default", relay_job: str = RELAY_JOB, *, fleet_member: bool = False
    ) -> "RelayRunMonitor":
        """The monitor of one relay; the DSN stays a variable's name in the UI."""
        sentry = {field: getattr(settings.sentry, field) for field in _SENTRY_FIELDS}
        if sentry["dsn"]:
            sentry["dsn"] = dg.EnvVar("SENTRY_CONFIG_DSN")
        return cls(
            relay_job=relay_job, cron=CronMonitor.from_settings(settings, relay_name), relay_name=relay_name,
            fleet_member=fleet_member, **sentry,
        )

    def run_tag(self, key: str) -> str:
        """A run tag this monitor writes: one per relay in a fleet's run."""
        return f"{key}/{self.relay_name}" if self.fleet_member else key

    @property
    def sentry_tags(self) -> dict[str, str]:
        return {RELAY_SENTRY_TAG: self.relay_name} if self.fleet_member else {}

    def sentry_settings(self) -> SentrySettings:
        return SentrySettings(**{field: getattr(self, field) for field in _SENTRY_FIELDS})

    def setup_for_execution(self, context: dg.InitResourceContext) -> None:
        self._error = None
        self._reported = set()
        self._read_queue = None
        run = context.dagster_run
        job_name = run.job_name if run else ""
        self._run_id = run.run_id if run else ""
        self._active = False
        retry_number = _as_int((run.tags if run else {}).get("dagster/retry_number"))
        self._report = RelayRunReport(job_name, self.environment, self.cron, run_retry_number=retry_number)
        self._silent = run is not None and run_has_ended(context, run)
        if self._silent:
            return  # set up again after the run ended: its report was sent already
        try:
            self._active = init_sentry(self.sentry_settings())
        except Exception as exc:  # Sentry must not stop the relay
            context.log.warning(f"Sentry is off for this run: {one_line(exc)}")
        if not self._active:
            return
        # A run worker runs one run: start its breadcrumbs from nothing.
        sentry_sdk.get_isolation_scope().clear_breadcrumbs()
        if job_name != self.relay_job or run is None:
            return
        try:
            self._report.open({**dagster_tags(run, job_name, run.run_id), RUNNER_TAG: "dagster", **self.sentry_tags})
            run_tags = {self.run_tag(TRACE_ID_TAG): self._report.transaction.trace_id}
            if self._report.check_in_id:
                run_tags[self.run_tag(CHECK_IN_TAG)] = self._report.check_in_id
            context.instance.add_run_tags(run.run_id, run_tags)
        except Exception as exc:
            context.log.warning(f"could not start the Sentry transaction: {one_line(exc)}")

    def teardown_after_execution(self, context: dg.InitResourceContext) -> None:
        if self._silent:
            return
        try:
            if self._active and self._report.job_name == self.relay_job:
                self._record_queue_at_end(context)
            if self._report.transaction is not None:
                # The event log knows of failures no hook reported (an interrupted step, say).
                error = self._error or first_step_failure(context.instance, self._run_id)
                status = self._report.close(error)
                context.instance.add_run_tags(self._run_id, {self.run_tag(TRANSACTION_STATUS_TAG): status})
        except Exception as exc:
            context.log.warning(f"could not finish the Sentry transaction: {one_line(exc)}")
        finally:
            self._report.transaction = None
            # A run worker exits right after this: send what is queued, bounded by the flush timeout.
            flush_sentry()

    def _record_queue_at_end(self, context: dg.InitResourceContext) -> None:
        # The last op records the figures of a run that got that far; a failed run's are read here.
        if self._report.queue_after_recorded or self._read_queue is None:
            return
        try:
            counts = self._read_queue()
        except Exception as exc:  # never a reason to change the run's outcome
            context.log.warning(f"could not read the outbox queue at the end of the run: {one_line(exc)}")
            return
        self._report.record_queue_after(counts)

    # -- called by ops and hooks ----------------------------------------------------------------

    @property
    def transaction(self) -> Any:
        """The run's transaction, or None (Sentry off, or not the relay job)."""
        return self._report.transaction

    def span(self, op: str, description: str, **data: Any) -> contextlib.AbstractContextManager[Any]:
        return self._report.span(op, description, **data)

    def finished_span(self, op: str, description: str, started_at: datetime.datetime, **data: Any) -> None:
        self._report.finished_span(op, description, started_at, **data)

    def heartbeat(self) -> None:
        """An ``ok`` check-in while a long relay run keeps up, so its length never reads as a missed check-in."""
        if not self._active or self._report.transaction is None:
            return
        try:
            self._report.cron.heartbeat()
        except Exception as exc:  # Sentry must not stop the relay
            dg.get_dagster_logger().warning(f"could not send the Sentry heartbeat: {one_line(exc)}")

    def set_data(self, **data: Any) -> None:
        self._report.data.update(data)

    def add_data(self, **increments: float) -> None:
        self._report.add_data(**increments)

    def data(self) -> dict:
        return dict(self._report.data)

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
        self._report.count(name, value, unit)

    def gauge(self, name: str, value: float, unit: str | None = None) -> None:
        self._report.gauge(name, value, unit)

    def distribution(self, name: str, value: float, unit: str | None = None) -> None:
        self._report.distribution(name, value, unit)

    def record_queue_before(self, counts: OutboxCounts) -> None:
        self._report.record_queue_before(counts)

    def record_queue_after(self, counts: OutboxCounts) -> None:
        self._report.record_queue_after(counts)

    def read_queue_at_end(self, read: Callable[[], OutboxCounts]) -> None:
        """How to read the queue at teardown if the run ends before ``record_queue_after`` (it failed)."""
        self._read_queue = read

    def record_batch(self, result: LoadResult) -> None:
        self._report.record_batch(result)

    def trace_batch(self, outbox: OutboxStore, handle: BatchHandle, result: LoadResult, *, destination: str) -> None:
        """Continue the producers' traces of a loaded batch's sampled events (Sentry's Queues module).

        Only while Sentry is on for this run; a failure is a warning in the run log, never the step's.
        """
        if self._silent or not self._active:
            return
        try:
            self._report.trace_batch(outbox, handle, result, destination=destination)
        except Exception as exc:
            dg.get_dagster_logger().warning(f"could not continue the traces of batch {handle.batch_id} in Sentry: {one_line(exc)}")

    def batch_tracer(self, outbox: OutboxStore, destination: str):
        """``Relay.drain(on_loaded=...)`` for runs that drain (the low-latency mode)."""
        return lambda handle, result: self.trace_batch(outbox, handle, result, destination=destination)

    def on_retry(self, notice: RetryNotice) -> None:
        """Callback for the relay's transient-error retries: a warning in the run log, a breadcrumb, a count."""
        self._report.record_retry(notice)
        # Logged from inside the op that retries, so Dagster files it under that step.
        dg.get_dagster_logger().warning(notice.message)
