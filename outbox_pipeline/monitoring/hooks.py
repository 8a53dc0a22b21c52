"""Failure hook attached to every op of every job: one Sentry event per failed op.

Grouping is by job, op and exception type, never by message text, so one issue
collects every "ClickHouse unreachable" of the load step, whatever host or
batch the message names.
"""

import sentry_sdk
import dagster as dg

from outbox_pipeline.monitoring.sentry_setup import flush_sentry, init_sentry


def failure_fingerprint(job_name: str, op_name: str, exception: BaseException | None) -> list[str]:
    return ["dagster-op-failure", job_name, op_name, type(exception).__name__ if exception else "unknown"]


def _retry_number(context: dg.HookContext) -> int:
    # Not public on HookContext; 0 when the attribute is missing.
    step_context = getattr(context, "_step_execution_context", None)
    return int(getattr(step_context, "previous_attempt_count", 0) or 0)


def report_op_failure(context: dg.HookContext) -> str | None:
    """Send the op's exception to Sentry; returns the Sentry event id (None when Sentry is off)."""
    init_sentry()
    exception = context.op_exception
    run = context.instance.get_run_by_id(context.run_id)
    partition = run.tags.get("dagster/partition") if run else None
    monitor = getattr(context.resources, "monitor", None)
    if monitor is not None and exception is not None:
        monitor.record_failure(exception)
    with sentry_sdk.new_scope() as scope:
        scope.set_tag("dagster.job", context.job_name)
        scope.set_tag("dagster.op", context.op.name)
        scope.set_tag("dagster.step", context.step_key)
        scope.set_tag("dagster.run_id", context.run_id)
        scope.set_tag("dagster.retry_number", _retry_number(context))
        if partition:
            scope.set_tag("dagster.partition", partition)
        scope.fingerprint = failure_fingerprint(context.job_name, context.op.name, exception)
        if exception is not None:
            event_id = sentry_sdk.capture_exception(exception)
        else:
            event_id = sentry_sdk.capture_message(f"op {context.op.name} of {context.job_name} failed", level="error")
    flush_sentry()
    return event_id


@dg.failure_hook(name="sentry_on_failure", required_resource_keys={"monitor"})
def sentry_on_failure(context: dg.HookContext) -> None:
    report_op_failure(context)
