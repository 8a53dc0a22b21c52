"""The sensor that starts the relays when events are pending: one for the code location, whatever the number of relays."""

import hashlib
import time

import dagster as dg
import psycopg

from outbox_pipeline.config.errors import OutboxPipelineError
from outbox_pipeline.config.settings import RelaySettings
from outbox_pipeline.orchestration.ops.fleet_ops import FLEET_RELAYS_TAG, FLEET_STOP_TAG
from outbox_pipeline.orchestration.relay_instance import definition_name
from outbox_pipeline.orchestration.resources import OutboxDatabaseResource
from outbox_pipeline.stores.outbox_store import OutboxStore
from outbox_pipeline.stores.postgres_connection import connect_postgres, translate_postgres_error

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


def build_pending_sensor(
    settings: RelaySettings, relay_names: list[str], fleet_job: dg.JobDefinition, low_latency_jobs: list[dg.JobDefinition]
) -> dg.SensorDefinition:
    """The code location's one sensor for every relay: it keeps the fleet's run going while any relay has work."""
    outbox_keys = {name: definition_name("outbox", name) for name in relay_names}
    tags = dict(fleet_job.tags)

    @dg.sensor(
        name="outbox_pending_sensor",
        jobs=[fleet_job, *low_latency_jobs],
        minimum_interval_seconds=settings.sensor_interval_seconds,
        default_status=dg.DefaultSensorStatus.RUNNING if settings.sensor_enabled else dg.DefaultSensorStatus.STOPPED,
        required_resource_keys=set(outbox_keys.values()),
        description=(
            f"Starts {fleet_job.name}, which relays every relay's events as they arrive, when any of the "
            f"{len(relay_names)} relays has pending events and no such run is queued or running; with "
            "OUTBOX_LOW_LATENCY=true keeps one low-latency run per relay going instead."
        ),
    )
    def outbox_pending_sensor(context: dg.SensorEvaluationContext, **_resources):
        # (Called directly, a sensor also receives its resources as keyword arguments.)
        if settings.low_latency:
            return low_latency_run_requests(context.instance, low_latency_jobs, settings.sensor_interval_seconds)
        active = active_relay_run(context.instance, (fleet_job.name,))
        if active is not None:
            return end_a_stale_fleet_run(context.instance, active.dagster_run, relay_names)
        remaining = failure_backoff_remaining(context.instance, settings.sensor_interval_seconds, time.time(), fleet_job.name)
        if remaining > 0:
            return dg.SkipReason(f"the last relay runs failed; next attempt in {remaining:.0f} s")
        pending, unavailable = pending_work({name: getattr(context.resources, key) for name, key in outbox_keys.items()})
        if not pending:
            if unavailable:
                return dg.SkipReason(f"outbox unavailable: {'; '.join(unavailable)}")
            return dg.SkipReason("no pending events")
        last = context.instance.get_run_records(dg.RunsFilter(job_name=fleet_job.name), limit=1)
        last_run_id = last[0].dagster_run.run_id if last else "none"
        # The key names the waiting work and the last run that saw it: the daemon never
        # launches two runs for one key, and a new key appears once that run has ended.
        work = hashlib.sha1(",".join(pending).encode()).hexdigest()[:16] if len(pending) > 1 else pending[0]
        return dg.RunRequest(run_key=f"{work}/{last_run_id}", job_name=fleet_job.name, tags=tags)

    return outbox_pending_sensor


def pending_work(outboxes: dict[str, OutboxDatabaseResource]) -> tuple[list[str], list[str]]:
    """(``relay:fingerprint`` of each relay with pending work, ``relay: problem`` of each unreachable outbox).

    Relays of one outbox database share one connection per tick: a fleet's tick costs a connection
    per database, not per relay.
    """
    pending, unavailable = [], []
    by_database: dict[str, list[str]] = {}
    for name, outbox in outboxes.items():
        try:
            by_database.setdefault(outbox.resolved_url(), []).append(name)
        except OutboxPipelineError as exc:
            unavailable.append(f"{name}: {exc}")
    for url, names in by_database.items():
        try:
            conn = connect_postgres(url, application_name="outbox_pipeline sensor")
        except (psycopg.Error, OutboxPipelineError) as exc:
            problem = translate_postgres_error(exc, url) if isinstance(exc, psycopg.Error) else exc
            unavailable.extend(f"{name}: {problem}" for name in names)
            continue
        try:
            for name in names:
                store = OutboxStore(conn, url, relay=outboxes[name].relay)
                try:
                    if store.has_pending_work():
                        pending.append(f"{name}:{store.pending_work_fingerprint()}")
                except psycopg.Error as exc:
                    unavailable.append(f"{name}: {translate_postgres_error(exc, url)}")
                except OutboxPipelineError as exc:
                    unavailable.append(f"{name}: {exc}")
        finally:
            conn.close()
    return pending, unavailable


def end_a_stale_fleet_run(instance: dg.DagsterInstance, run: dg.DagsterRun, relay_names: list[str]) -> dg.SkipReason:
    """A fleet's run started before relays were added (or removed) follows the old set: ask it to end, so the next covers all."""
    followed = run.tags.get(FLEET_RELAYS_TAG)
    if followed is not None and followed != ",".join(relay_names) and not run.tags.get(FLEET_STOP_TAG):
        instance.add_run_tags(run.run_id, {FLEET_STOP_TAG: "the code location's relays changed"})
        return dg.SkipReason(f"relay run {run.run_id} follows {followed}; asked it to end for {', '.join(relay_names)}")
    return dg.SkipReason(f"relay run {run.run_id} is {run.status.value}")


def low_latency_run_requests(
    instance: dg.DagsterInstance, jobs: list[dg.JobDefinition], interval: float
) -> dg.SensorResult | dg.SkipReason:
    """One low-latency run per relay; a relay whose run is going (or backs off after failures) is skipped."""
    requests, skipped = [], []
    for job in jobs:
        active = active_relay_run(instance, (job.name,))
        request = (
            dg.SkipReason(f"relay run {active.dagster_run.run_id} is {active.dagster_run.status.value}")
            if active is not None else low_latency_run_request(instance, job.name, interval, dict(job.tags))
        )
        if isinstance(request, dg.RunRequest):
            requests.append(request)
        else:
            skipped.append(f"{job.name}: {request.skip_message}")
    return dg.SensorResult(run_requests=requests) if requests else dg.SkipReason("; ".join(skipped))


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
