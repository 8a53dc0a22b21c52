"""The sensor that starts the relay when events are pending."""

import time

import dagster as dg
import psycopg

from outbox_pipeline.errors import OutboxPipelineError
from outbox_pipeline.jobs import process_outbox_events, relay_low_latency, relay_run_tags
from outbox_pipeline.resources import OutboxDatabaseResource
from outbox_pipeline.settings import RelaySettings
from outbox_pipeline.stores.postgres_connection import translate_postgres_error

_settings = RelaySettings.from_env()

ACTIVE_STATUSES = [
    dg.DagsterRunStatus.QUEUED,
    dg.DagsterRunStatus.NOT_STARTED,
    dg.DagsterRunStatus.STARTING,
    dg.DagsterRunStatus.STARTED,
    dg.DagsterRunStatus.CANCELING,
]
MAX_FAILURE_BACKOFF_SECONDS = 300


RELAY_JOBS = (process_outbox_events, relay_low_latency)


def active_relay_run(instance: dg.DagsterInstance) -> dg.RunRecord | None:
    for job in RELAY_JOBS:
        records = instance.get_run_records(dg.RunsFilter(job_name=job.name, statuses=ACTIVE_STATUSES), limit=1)
        if records:
            return records[0]
    return None


def failure_backoff_remaining(
    instance: dg.DagsterInstance, interval: float, now: float, job_name: str = process_outbox_events.name
) -> float:
    """After consecutive failed relay runs, wait interval * 2^(failures-1) (capped) before the next."""
    records = instance.get_run_records(dg.RunsFilter(job_name=job_name), limit=8)
    failures = 0
    for record in records:
        if record.dagster_run.status != dg.DagsterRunStatus.FAILURE:
            break
        failures += 1
    if not failures:
        return 0.0
    ended = records[0].end_time or now
    wait = min(MAX_FAILURE_BACKOFF_SECONDS, interval * 2 ** (failures - 1))
    return max(0.0, ended + wait - now)


@dg.sensor(
    jobs=list(RELAY_JOBS),
    minimum_interval_seconds=_settings.sensor_interval_seconds,
    default_status=dg.DefaultSensorStatus.RUNNING if _settings.sensor_enabled else dg.DefaultSensorStatus.STOPPED,
    description=(
        "Starts process_outbox_events when events are pending and no relay run is queued or running; "
        "with OUTBOX_LOW_LATENCY=true keeps one relay_low_latency run going instead."
    ),
)
def outbox_pending_sensor(context: dg.SensorEvaluationContext, outbox: OutboxDatabaseResource):
    active = active_relay_run(context.instance)
    if active is not None:
        return dg.SkipReason(f"relay run {active.dagster_run.run_id} is {active.dagster_run.status.value}")
    if _settings.low_latency:
        return low_latency_run_request(context.instance)
    remaining = failure_backoff_remaining(context.instance, _settings.sensor_interval_seconds, time.time())
    if remaining > 0:
        return dg.SkipReason(f"the last relay runs failed; next attempt in {remaining:.0f} s")
    try:
        with outbox.short_lived_store() as store:
            if not store.has_pending_work():
                return dg.SkipReason("no pending events")
            fingerprint = store.pending_work_fingerprint()
    except psycopg.Error as exc:
        return dg.SkipReason(f"outbox unavailable: {translate_postgres_error(exc, outbox.url or 'embedded')}")
    except OutboxPipelineError as exc:
        return dg.SkipReason(f"outbox unavailable: {exc}")
    last = context.instance.get_run_records(dg.RunsFilter(job_name=process_outbox_events.name), limit=1)
    last_run_id = last[0].dagster_run.run_id if last else "none"
    # The key names the waiting work and the last run that saw it: the daemon never
    # launches two runs for one key, and a new key appears once that run has ended.
    return dg.RunRequest(
        run_key=f"{fingerprint}/{last_run_id}", job_name=process_outbox_events.name, tags=relay_run_tags(_settings)
    )


def low_latency_run_request(instance: dg.DagsterInstance) -> dg.RunRequest | dg.SkipReason:
    """One long run at a time; when it ends (its time limit, or a failure after backoff) the next starts."""
    remaining = failure_backoff_remaining(instance, _settings.sensor_interval_seconds, time.time(), relay_low_latency.name)
    if remaining > 0:
        return dg.SkipReason(f"the last low-latency runs failed; next attempt in {remaining:.0f} s")
    last = instance.get_run_records(dg.RunsFilter(job_name=relay_low_latency.name), limit=1)
    last_run_id = last[0].dagster_run.run_id if last else "none"
    return dg.RunRequest(run_key=f"low-latency/{last_run_id}", job_name=relay_low_latency.name, tags=relay_run_tags(_settings))
