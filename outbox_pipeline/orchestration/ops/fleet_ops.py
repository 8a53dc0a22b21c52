"""The fleet's op: every relay of the code location followed in one run (see relay/fleet.py).

Each relay keeps its own resources (``outbox_<name>``, ``clickhouse_<name>`` and a monitor of
its own), claims batches under the run's id as its own run would, records one materialization
per window on its own asset with its checks' evaluations, and reports to Sentry as itself: a
``process_events`` transaction tagged with the relay, heartbeats on its Crons monitor, and its
failures grouped by relay. A relay that fails is started again after a backoff; the others go on.
"""


import dataclasses
import datetime as dt
import threading
from collections.abc import Callable, Iterator

import dagster as dg

from outbox_pipeline.monitoring.relay_report import one_line
from outbox_pipeline.monitoring.run_monitor import RelayRunMonitor
from outbox_pipeline.orchestration.hooks import report_relay_failure
from outbox_pipeline.orchestration.ops.event_log_events import window_asset_events
from outbox_pipeline.orchestration.ops.follow_ops import (
    ENDED_QUEUED_RUN,
    FollowConfig,
    SharedClickHouse,
    runs_waiting_for_embedded_clickhouse,
)
from outbox_pipeline.orchestration.ops.relay_ops import connect_event_log
from outbox_pipeline.orchestration.relay_instance import definition_name
from outbox_pipeline.orchestration.resources import ClickHouseResource, OutboxDatabaseResource
from outbox_pipeline.orchestration.run_limits import shared_ops_pool
from outbox_pipeline.relay.delivery import LoadResult, Relay
from outbox_pipeline.relay.fleet import ENDED_STOPPED, Fleet, FleetMember
from outbox_pipeline.relay.following import Follower, FollowLimits, Period

FLEET_JOB = "follow_outbox_fleet"
# The relays a fleet's run follows (written as it starts), and a request to end it (from the sensor,
# whose code location knows of relays added since the run started).
FLEET_RELAYS_TAG = "outbox_pipeline/fleet_relays"
FLEET_STOP_TAG = "outbox_pipeline/fleet_stop"
ENDED_INTERRUPTED = "the deployment is shutting down"


def member_resource_keys(relay_name: str) -> tuple[str, str, str]:
    """The code-location resource keys of one relay in the fleet: its outbox, its ClickHouse, its fleet monitor."""
    return (definition_name("outbox", relay_name), definition_name("clickhouse", relay_name), f"fleet_monitor__{relay_name}")


@dataclasses.dataclass(frozen=True)
class LogLine:
    text: str
    level: str = "info"


@dataclasses.dataclass
class FleetRelay:
    """One relay's part of the fleet's run."""

    name: str
    outbox: OutboxDatabaseResource
    clickhouse: ClickHouseResource
    monitor: RelayRunMonitor
    run_id: str
    total: Period = dataclasses.field(default_factory=lambda: Period(0.0))

    def follow(self, limits: FollowLimits, stop: threading.Event, touch: Callable[[], None]) -> Iterator[object]:
        """Relay until the fleet stops (or its deadline): log lines and, per window, the asset's events."""
        outbox, clickhouse, monitor = self.outbox, self.clickhouse, self.monitor
        relay = Relay(outbox.store(), None, outbox.policy(), claimed_by=self.run_id, on_retry=monitor.on_retry)
        monitor.read_queue_at_end(lambda: outbox.store().counts(include_processed=False))

        def on_batch(result: LoadResult) -> None:
            monitor.record_batch(result)
            touch()

        started_at = dt.datetime.now(dt.UTC)
        follower = None
        try:
            relay.event_log = connect_event_log(clickhouse, relay, monitor)
            # The relays of one chDB directory share it in this process; a command waiting for it gets it between looks.
            destination = SharedClickHouse(clickhouse, relay)
            # Quiet is the fleet's to decide: a member follows until the fleet stops or its deadline.
            follower = Follower(
                relay, dataclasses.replace(limits, quiet_seconds=max(limits.follow_seconds, limits.interval_seconds)),
                should_stop=lambda: ENDED_STOPPED if stop.is_set() else None,
                ready=destination.ready, on_pause=destination.on_pause, on_batch=on_batch, sleep=stop.wait,
            )
            for update in follower.updates():
                window = update.window
                if window is not None and (window.batches or window.events_rejected):
                    yield self._window_events(window, relay)
                    monitor.heartbeat()
                if update.ended is None and update.since_last.events_loaded:
                    minute = update.since_last
                    yield LogLine(f"relay {self.name}: {minute.events_loaded} events in {minute.drains} loads "
                                  f"over the last {minute.seconds:.0f} s")
            monitor.record_queue_after(outbox.store().counts(include_processed=False))
        finally:
            total = follower.total if follower is not None else Period(0.0)
            for field in ("drains", "batches", "events_loaded", "events_rejected"):
                setattr(self.total, field, getattr(self.total, field) + getattr(total, field))
            monitor.finished_span("follow", f"relay {self.name}: new events as they arrive", started_at,
                                  drains=total.drains, batches=total.batches, events=total.events_loaded)
            # A member that starts again after a failure gets fresh connections.
            outbox.close()
            clickhouse.release()

    def _window_events(self, window: Period, relay: Relay) -> list:
        return window_asset_events(
            self.clickhouse.asset, window, description=f"{window.events_loaded} events loaded by the fleet's run (relay {self.name})",
            counts=self.outbox.store().counts(include_processed=False), max_lag_seconds=self.outbox.freshness_max_lag_seconds,
            event_log=relay.event_log,
        )


def build_follow_fleet_op(relay_names: list[str]) -> dg.OpDefinition:
    keys = {name: member_resource_keys(name) for name in relay_names}

    @dg.op(
        name="follow_fleet",
        required_resource_keys={key for member in keys.values() for key in member},
        description=f"Relay the events of {len(relay_names)} relays ({', '.join(relay_names)}) as they arrive, "
        "each in a thread of its own, until none arrived for the quiet time or a limit is reached.",
        pool=shared_ops_pool(),
    )
    def follow_fleet(context: dg.OpExecutionContext, config: FollowConfig):
        relays = [
            FleetRelay(name, *(getattr(context.resources, key) for key in keys[name]), run_id=context.run_id)
            for name in relay_names
        ]
        by_name = {relay.name: relay for relay in relays}
        limits = config.limits(relays[0].outbox)
        if not limits.follows:
            # follow_seconds 0: each relay drains what is pending now, then the run ends.
            limits = dataclasses.replace(limits, follow_seconds=limits.interval_seconds, quiet_seconds=limits.interval_seconds)
        embedded = any(relay.clickhouse.is_embedded for relay in relays)

        def should_stop() -> str | None:
            asked = (context.instance.get_run_by_id(context.run_id) or context.dagster_run).tags.get(FLEET_STOP_TAG)
            if asked:
                return asked
            # One process at a time can open the embedded ClickHouse: a run queued for it must not wait for this one.
            return ENDED_QUEUED_RUN if embedded and runs_waiting_for_embedded_clickhouse(context.instance) else None

        fleet = Fleet(
            [FleetMember(relay.name, lambda stop, touch, relay=relay: relay.follow(limits, stop, touch)) for relay in relays],
            follow_seconds=limits.follow_seconds, quiet_seconds=limits.quiet_seconds,
            retry_base_seconds=max(limits.interval_seconds, relays[0].outbox.retry_base_seconds), should_stop=should_stop,
        )
        run = context.dagster_run
        failed: set[str] = set()
        try:
            # Inside the try: a stop that comes while the run writes its first records ends it as a success too.
            context.instance.add_run_tags(context.run_id, {FLEET_RELAYS_TAG: ",".join(relay_names)})
            context.log.info(
                f"following {len(relays)} relay{'' if len(relays) == 1 else 's'}: a look every {limits.interval_seconds:g} s, "
                f"for up to {limits.follow_seconds:g} s, until none of them received an event for {limits.quiet_seconds:g} s"
            )
            for message in fleet.messages():
                relay = by_name[message.member]
                if message.error is not None:
                    failed.add(relay.name)
                    context.log.error(
                        f"relay {relay.name} failed ({message.failures} in a row), starting again in {message.retry_in:.1f} s; "
                        f"the other relays go on: {one_line(message.error)}"
                    )
                    try:
                        report_relay_failure(relay.monitor, run, context.job_name, context.run_id, message.error)
                    except Exception as exc:  # reporting must never stop the fleet
                        context.log.warning(f"could not report relay {relay.name}'s failure to Sentry: {one_line(exc)}")
                elif isinstance(message.item, LogLine):
                    context.log.info(message.item.text)
                else:
                    yield from message.item
        except (dg.DagsterExecutionInterruptedError, KeyboardInterrupt):
            # The deployment is stopping (Ctrl-C, SIGTERM, a deploy). Every relay has finished the batch it had
            # and holds no claim (the fleet has joined them): the run ends as a success, not a failure to report.
            fleet.ended = ENDED_INTERRUPTED
            context.log.info("stopping: the deployment is shutting down; every relay has given back its claims")
        summary = {
            relay.name: {"events_loaded": relay.total.events_loaded, "batches": relay.total.batches, "drains": relay.total.drains}
            for relay in relays
        }
        context.log.info(
            f"stopped following ({fleet.ended}): "
            + ", ".join(f"{name} {figures['events_loaded']} events" for name, figures in summary.items())
        )
        yield dg.Output(
            summary,
            metadata={
                "ended": fleet.ended or "",
                "events_loaded": sum(figures["events_loaded"] for figures in summary.values()),
                "relays": len(relays),
                "relays_failed": ", ".join(sorted(failed)) or "none",
            },
        )

    return follow_fleet
