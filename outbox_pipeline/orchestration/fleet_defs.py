"""The code location's fleet: one job that follows every relay, and the one sensor that starts it.

A following run per relay would hold a run slot and a resident process per relay, and run
limits would make some relays wait behind the others for as long as a run follows. The
fleet's run follows them all in one process (see ``ops/fleet_ops.py``); each relay keeps
its own jobs for a one-off run, replays, requeue, retention and checks.
"""

import dagster as dg

from outbox_pipeline.config.settings import RelaySettings
from outbox_pipeline.orchestration.hooks import sentry_on_failure
from outbox_pipeline.orchestration.jobs import RELAY_TAG
from outbox_pipeline.orchestration.ops.fleet_ops import FLEET_JOB, build_follow_fleet_op
from outbox_pipeline.orchestration.relay_instance import DEFAULT_RELAY, definition_name
from outbox_pipeline.orchestration.resources import ClickHouseResource, OutboxDatabaseResource
from outbox_pipeline.orchestration.run_limits import clickhouse_run_tags
from outbox_pipeline.orchestration.sensors import build_pending_sensor

FLEET_TAG_VALUE = "fleet"


def relay_names(relays: dg.Definitions) -> list[str]:
    """The relays of the definitions, the default one first: each brought its outbox as a code-location resource."""
    names = {resource.relay_name for resource in (relays.resources or {}).values() if isinstance(resource, OutboxDatabaseResource)}
    return sorted(names, key=lambda name: (name != DEFAULT_RELAY, name))


def build_fleet_defs(relays: dg.Definitions, settings: RelaySettings) -> dg.Definitions:
    names = relay_names(relays)
    resources = relays.resources or {}
    uses_chdb = any(
        isinstance(clickhouse := resources.get(definition_name("clickhouse", name)), ClickHouseResource) and clickhouse.is_embedded
        for name in names
    )
    follow_fleet = build_follow_fleet_op(names)

    @dg.job(
        name=FLEET_JOB,
        description=f"Relay every relay's events as they arrive, in one run and one process ({', '.join(names)}); "
        "started by outbox_pending_sensor, ends once no event arrived for OUTBOX_FOLLOW_QUIET_SECONDS or after "
        "OUTBOX_FOLLOW_SECONDS. Config follow_seconds: 0 drains what is pending and ends.",
        tags={RELAY_TAG: FLEET_TAG_VALUE, **clickhouse_run_tags(uses_chdb)},
        executor_def=dg.in_process_executor,
        hooks={sentry_on_failure},
    )
    def follow_outbox_fleet():
        follow_fleet()

    low_latency_names = {definition_name("relay_low_latency", name) for name in names}
    low_latency_jobs = [job for job in relays.jobs or [] if isinstance(job, dg.JobDefinition) and job.name in low_latency_names]
    return dg.Definitions(
        jobs=[follow_outbox_fleet], sensors=[build_pending_sensor(settings, names, follow_outbox_fleet, low_latency_jobs)]
    )
