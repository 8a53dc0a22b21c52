"""Failure hook attached to every op of every job: one Sentry event per failed op and cause.

Grouping is by job, op and exception type, never by message text, so one issue
collects every "ClickHouse unreachable" of the load step, whatever host or
batch the message names. Within one run a cause is reported once: an outage
fails every mapped load step alike, and the transaction counts them
(``failed_steps``).

Dagster also writes the failure as an ERROR log line; the logging integration
keeps log lines as breadcrumbs only (see sentry_setup), so that line never
becomes a second event.
"""

import dagster as dg
import sentry_sdk

from outbox_pipeline.monitoring.relay_report import one_line
from outbox_pipeline.monitoring.run_monitor import RelayRunMonitor, dagster_tags
from outbox_pipeline.monitoring.sentry_setup import init_sentry


def failure_fingerprint(job_name: str, op_name: str, exception: BaseException | None) -> list[str]:
    return ["dagster-op-failure", job_name, op_name, type(exception).__name__ if exception else "unknown"]


def _op_retry_number(context: dg.HookContext) -> int:
    """Op retries (RetryPolicy) before this failure: the step's STEP_UP_FOR_RETRY events in the run's log."""
    records = context.instance.get_records_for_run(
        run_id=context.run_id, of_type=dg.DagsterEventType.STEP_UP_FOR_RETRY
    ).records
    return sum(1 for record in records if record.event_log_entry.step_key == context.step_key)


def report_op_failure(context: dg.HookContext) -> str | None:
    """Send the op's exception to Sentry; returns the Sentry event id (None when nothing was sent)."""
    monitor = getattr(context.resources, "monitor", None)
    if not isinstance(monitor, RelayRunMonitor) or not init_sentry(monitor.sentry_settings()):
        return None
    exception = context.op_exception
    fingerprint = failure_fingerprint(context.job_name, context.op.name, exception)
    if not monitor.note_failure(tuple(fingerprint), exception or "op failed"):
        return None
    run = context.instance.get_run_by_id(context.run_id)
    retry_number = _op_retry_number(context)
    tags = {
        **dagster_tags(run, context.job_name, context.run_id),
        "dagster.op": context.op.name, "dagster.step": context.step_key, "dagster.retry_number": str(retry_number),
    }
    details = {"job": context.job_name, "op": context.op.name, "step": context.step_key, "run_id": context.run_id,
               "retry_number": retry_number}
    return _capture(monitor, tags, details, fingerprint, exception, f"op {context.op.name} of {context.job_name} failed")


def relay_failure_fingerprint(relay_name: str, exception: BaseException) -> list[str]:
    return ["outbox-relay-failure", relay_name, type(exception).__name__]


def report_relay_failure(monitor: RelayRunMonitor, run: dg.DagsterRun | None, job_name: str, run_id: str,
                         exception: BaseException) -> str | None:
    """A fleet member's failure, which the op survives: one event per relay and cause in the run, grouped by relay."""
    if not init_sentry(monitor.sentry_settings()):
        return None
    fingerprint = relay_failure_fingerprint(monitor.relay_name, exception)
    if not monitor.note_failure(tuple(fingerprint), exception):
        return None
    tags = {**dagster_tags(run, job_name, run_id), **monitor.sentry_tags}
    details = {"job": job_name, "relay": monitor.relay_name, "run_id": run_id}
    return _capture(monitor, tags, details, fingerprint, exception, f"relay {monitor.relay_name} failed")


def _capture(monitor: RelayRunMonitor, tags: dict[str, str], details: dict, fingerprint: list[str],
             exception: BaseException | None, message: str) -> str | None:
    with sentry_sdk.new_scope() as scope:
        if monitor.transaction is not None:
            # Links the issue to the run's trace.
            scope.span = monitor.transaction
        for key, value in tags.items():
            scope.set_tag(key, value)
        scope.set_context("dagster", details)
        scope.set_context("outbox_run", monitor.data())
        scope.fingerprint = fingerprint
        if exception is not None:
            return sentry_sdk.capture_exception(exception)
        return sentry_sdk.capture_message(message, level="error")


@dg.failure_hook(name="sentry_on_failure", required_resource_keys={"monitor"})
def sentry_on_failure(context: dg.HookContext) -> None:
    # No flush here: the monitor flushes once at the end of the run, so a slow
    # Sentry costs a run at most one flush timeout however many steps fail.
    try:
        report_op_failure(context)
    except Exception as exc:  # reporting must never change the run's outcome
        context.log.warning(f"could not report the failure to Sentry: {one_line(exc)}")
