"""The sensor that starts a relay when events are pending."""

import time

import dagster as dg
import psycopg

from outbox_pipeline.config.errors import OutboxPipelineError
from outbox_pipeline.orchestration.assets import resource_keys
from outbox_pipeline.orchestration.jobs import RelayJobs, relay_run_tags
from outbox_pipeline.orchestration.relay_instance import RelayInstance
from outbox_pipeline.stores.postgres_connection import translate_postgres_error

ACTIVE_STATUSES = [
    dg.DagsterRunStatus.QUEUED,
    dg.DagsterRunStatus.NOT_STARTED,
    dg.DagsterRunStatus.STARTING,
    dg.DagsterRunStatus.STARTED,
    dg.DagsterRunStatus.CANCELING,
]
MAX_FAILURE_BACKOFF_SECONDS = 300


def active_relay_run(instance: dg.DagsterInstance, job_names: tuple[str, ...]) -> dg.RunRecord | None:
    for job_name in job_names:
        records = instance.get_run_records(dg.RunsFilter(job_name=job_name, statuses=ACTIVE_STATUSES), limit=1)
        if records:
            return records[0]
    return None


def failure_backoff_remaining(instance: dg.DagsterInstance, interval: float, now: float, job_name: str) -> float:
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


def build_pending_sensor(instance: RelayInstance, jobs: RelayJobs) -> dg.SensorDefinition:
    settings = instance.settings
    outbox_key, _ = resource_keys(instance)
    relay_job_names = tuple(job.name for job in jobs.relay_jobs)
    tags = relay_run_tags(instance)

    @dg.sensor(
        name=instance.named("outbox_pending_sensor"),
        jobs=list(jobs.relay_jobs),
        minimum_interval_seconds=settings.sensor_interval_seconds,
        default_status=dg.DefaultSensorStatus.RUNNING if settings.sensor_enabled else dg.DefaultSensorStatus.STOPPED,
        required_resource_keys={outbox_key},
        description=(
            f"Starts {jobs.process.name} when events are pending and no relay run is queued or running; "
            f"with OUTBOX_LOW_LATENCY=true keeps one {jobs.low_latency.name} run going instead."
        ),
    )
    def outbox_pending_sensor(context: dg.SensorEvaluationContext, **_resources):
        # (Called directly, a sensor also receives its resources as keyword arguments.)
        active = active_relay_run(context.instance, relay_job_names)
        if active is not None:
            return dg.SkipReason(f"relay run {active.dagster_run.run_id} is {active.dagster_run.status.value}")
        if settings.low_latency:
            return low_latency_run_request(context.instance, jobs.low_latency.name, settings.sensor_interval_seconds, tags)
        remaining = failure_backoff_remaining(context.instance, settings.sensor_interval_seconds, time.time(), jobs.process.name)
        if remaining > 0:
            return dg.SkipReason(f"the last relay runs failed; next attempt in {remaining:.0f} s")
        outbox = getattr(context.resources, outbox_key)
        try:
            with outbox.short_lived_store() as store:
                if not store.has_pending_work():
                    return dg.SkipReason("no pending events")
                fingerprint = store.pending_work_fingerprint()
        except psycopg.Error as exc:
            return dg.SkipReason(f"outbox unavailable: {translate_postgres_error(exc, outbox.url or 'embedded')}")
        except OutboxPipelineError as exc:
            return dg.SkipReason(f"outbox unavailable: {exc}")
        last = context.instance.get_run_records(dg.RunsFilter(job_name=jobs.process.name), limit=1)
        last_run_id = last[0].dagster_run.run_id if last else "none"
        # The key names the waiting work and the last run that saw it: the daemon never
        # launches two runs for one key, and a new key appears once that run has ended.
        return dg.RunRequest(run_key=f"{fingerprint}/{last_run_id}", job_name=jobs.process.name, tags=tags)

    return outbox_pending_sensor


def low_latency_run_request(
    instance: dg.DagsterInstance, job_name: str, interval: float, tags: dict[str, str]
) -> dg.RunRequest | dg.SkipReason:
    """One long run at a time; when it ends (its time limit, or a failure after backoff) the next starts."""
    remaining = failure_backoff_remaining(instance, interval, time.time(), job_name)
    if remaining > 0:
        return dg.SkipReason(f"the last low-latency runs failed; next attempt in {remaining:.0f} s")
    last = instance.get_run_records(dg.RunsFilter(job_name=job_name), limit=1)
    last_run_id = last[0].dagster_run.run_id if last else "none"
    return dg.RunRequest(run_key=f"low-latency/{last_run_id}", job_name=job_name, tags=tags)
