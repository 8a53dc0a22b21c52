"""Failed runs that no op hook reported: the run worker died, a run timeout, a failure before the first step.

Op failure hooks run inside the run worker, after a step failed. Nothing runs
there when the worker is killed, when run monitoring terminates a run that
exceeded its maximum runtime (steps are interrupted, and interrupted steps get
no hooks), or when the run fails before its first step. This sensor runs in
the code server on every failed run of the code location and reports the run
when its event log holds no STEP_FAILURE other than an interruption, that is
when no hook saw the failure.

For the relay job it also completes what the worker could not: a
``process_events`` transaction with status ``internal_error`` (so the saved
query of failed runs misses none) and the ``error`` check-in, unless the
worker's monitor already sent them (run tags, see run_monitor).
"""

import datetime as dt

import dagster as dg
import sentry_sdk

from outbox_pipeline.config.settings import RelaySettings
from outbox_pipeline.monitoring.crons import CronMonitor
from outbox_pipeline.monitoring.relay_report import RELAY_JOB, RUNNER_TAG, TRANSACTION_NAME, TRANSACTION_OP, one_line
from outbox_pipeline.monitoring.run_monitor import (
    CHECK_IN_TAG,
    RELAY_SENTRY_TAG,
    TRACE_ID_TAG,
    TRANSACTION_STATUS_TAG,
    dagster_tags,
)
from outbox_pipeline.monitoring.sentry_setup import flush_sentry, fresh_scope, init_sentry
from outbox_pipeline.orchestration.relay_instance import DEFAULT_RELAY, RELAY_NAME_TAG, definition_name

SENSOR_NAME = "sentry_run_failure_sensor"
_INTERRUPT = "INTERRUPT"


def failure_seen_by_hook(instance: dg.DagsterInstance, run_id: str) -> bool:
    """Whether an op failure hook ran for this run: any STEP_FAILURE that is not an interruption."""
    records = instance.get_records_for_run(run_id=run_id, of_type=dg.DagsterEventType.STEP_FAILURE).records
    for record in records:
        event = record.event_log_entry.dagster_event
        data = event.step_failure_data if event is not None else None
        source = getattr(getattr(data, "error_source", None), "value", None)
        if source != _INTERRUPT:
            return True
    return False


def failure_kind(event: dg.DagsterEvent) -> str:
    """A stable name for why the run failed, for grouping (never the message text)."""
    message = (event.message or "").lower()
    if "exceeded maximum runtime" in message:
        return "run_timeout"
    if "run worker" in message or "worker status" in message:
        return "run_worker_failed"
    if "interrupted" in message:
        return "run_interrupted"
    data = event.event_specific_data
    reason = getattr(data, "failure_reason", None)
    if reason is not None and reason.value not in ("UNKNOWN", "STEP_FAILURE"):
        return reason.value.lower()
    if "start" in message and "timeout" in message:
        return "start_timeout"
    return "run_failed"


def run_failure_fingerprint(job_name: str, kind: str) -> list[str]:
    return ["dagster-run-failure", job_name, kind]


def _timestamp(value: float | None) -> dt.datetime:
    return dt.datetime.fromtimestamp(value, dt.UTC) if value else dt.datetime.now(dt.UTC)


def _complete_relay_report(
    instance: dg.DagsterInstance, run: dg.DagsterRun, tags: dict[str, str], error: str, cron: CronMonitor, suffix: str = ""
) -> None:
    """``suffix``: the run tags' of one relay in a fleet's run (``/<relay>``)."""
    if run.tags.get(TRANSACTION_STATUS_TAG + suffix):
        return  # the worker's monitor finished the transaction itself
    record = instance.get_run_record_by_id(run.run_id)
    start = record.start_time if record is not None else None
    end = record.end_time if record is not None else None
    if start is None and record is not None:
        start = record.create_timestamp.timestamp()
    options = {"trace_id": run.tags[TRACE_ID_TAG + suffix]} if run.tags.get(TRACE_ID_TAG + suffix) else {}
    transaction = sentry_sdk.start_transaction(
        op=TRANSACTION_OP, name=TRANSACTION_NAME, start_timestamp=_timestamp(start), **options
    )
    for key, value in {**tags, RUNNER_TAG: "dagster"}.items():
        transaction.set_tag(key, value)
    transaction.set_data("error", error)
    transaction.set_data("reported_by", SENSOR_NAME)
    transaction.set_status("internal_error")
    transaction.finish(end_timestamp=_timestamp(end))
    if run.tags.get(CHECK_IN_TAG + suffix):
        cron.close_check_in(run.tags[CHECK_IN_TAG + suffix], ok=False)
    instance.add_run_tags(run.run_id, {TRANSACTION_STATUS_TAG + suffix: "internal_error"})


def relay_of(run: dg.DagsterRun) -> str | None:
    """The relay whose transaction this run reports, or None for every other job."""
    relay_name = run.tags.get(RELAY_NAME_TAG, DEFAULT_RELAY)
    return relay_name if run.job_name == definition_name(RELAY_JOB, relay_name) else None


def fleet_relays_of(run: dg.DagsterRun) -> list[str]:
    """The relays whose transactions a fleet's run opened (their trace ids are tagged ``<tag>/<relay>``)."""
    prefix = TRACE_ID_TAG + "/"
    return sorted(key[len(prefix):] for key in run.tags if key.startswith(prefix))


def report_run_failure(context: dg.RunFailureSensorContext, settings: RelaySettings) -> str | None:
    """Report the failed run unless a hook did; returns the Sentry event id, or None."""
    sentry = settings.sentry
    run = context.dagster_run
    instance = context.instance
    if not init_sentry(sentry) or failure_seen_by_hook(instance, run.run_id):
        return None
    # The run as stored now: the monitor may have tagged it after the failure event was read.
    run = instance.get_run_by_id(run.run_id) or run
    event = context.failure_event
    kind = failure_kind(event)
    error = one_line(event.message or "run failed")
    tags = dagster_tags(run, run.job_name, run.run_id)
    with fresh_scope() as scope:
        for key, value in tags.items():
            scope.set_tag(key, value)
        scope.set_tag("dagster.failure_kind", kind)
        scope.set_context("dagster", {"job": run.job_name, "run_id": run.run_id, "failure_kind": kind, "message": error})
        scope.fingerprint = run_failure_fingerprint(run.job_name, kind)
        event_id = sentry_sdk.capture_message(f"{run.job_name} run failed outside its ops ({kind}): {error}", level="error")
    relay_name = relay_of(run)
    if relay_name is not None:
        with fresh_scope():
            _complete_relay_report(instance, run, tags, error, CronMonitor.from_settings(settings, relay_name))
    # A fleet's run reports each relay apart: its monitors tagged the run per relay.
    for fleet_relay in fleet_relays_of(run):
        with fresh_scope():
            _complete_relay_report(
                instance, run, {**tags, RELAY_SENTRY_TAG: fleet_relay}, error, CronMonitor.from_settings(settings, fleet_relay),
                suffix=f"/{fleet_relay}",
            )
    flush_sentry()
    return event_id


def build_run_failure_sensor(settings: RelaySettings) -> dg.SensorDefinition:
    """One sensor for the code location: every job of every relay."""

    @dg.run_failure_sensor(
        name=SENSOR_NAME,
        default_status=dg.DefaultSensorStatus.RUNNING,
        description="Reports to Sentry the failed runs no op hook saw: dead run worker, run timeout, failure before the first step.",
    )
    def sentry_run_failure_sensor(context: dg.RunFailureSensorContext):
        try:
            event_id = report_run_failure(context, settings)
        except Exception as exc:  # a Sentry problem must not stall the sensor's cursor
            return dg.SkipReason(f"could not report run {context.dagster_run.run_id} to Sentry: {one_line(exc)}")
        if event_id is None:
            return dg.SkipReason(f"run {context.dagster_run.run_id}: reported by its op hook, or Sentry is off")
        return dg.SkipReason(f"run {context.dagster_run.run_id} reported to Sentry (event {event_id})")

    return sentry_run_failure_sensor
