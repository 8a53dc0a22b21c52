"""The last op of ``process_outbox_events``: after the backlog, keep relaying a steady stream (see following.py).

A stream of events would otherwise cost a Dagster run every few seconds (a process
start, the run's bookkeeping and its storage), far more than the relay's own work.
This op keeps the run going while events arrive: no Dagster step per load, a log
line a minute, one event_log materialization per window with the checks'
evaluations, one Sentry span for the whole of it and a Crons heartbeat per window.

``follow_seconds: 0`` (run config, or ``OUTBOX_FOLLOW_SECONDS=0``) ends the run with
its backlog, as a backfill or a one-off run from the Launchpad may want.
"""

import datetime as dt

import dagster as dg
from pydantic import Field

from outbox_pipeline.config.errors import StoreBusyError
from outbox_pipeline.monitoring.run_monitor import RelayRunMonitor
from outbox_pipeline.orchestration.ops.event_log_events import window_asset_events
from outbox_pipeline.orchestration.ops.relay_ops import build_relay, connect_event_log
from outbox_pipeline.orchestration.resources import ClickHouseResource, OutboxDatabaseResource
from outbox_pipeline.orchestration.run_limits import clickhouse_run_tags, shared_ops_pool
from outbox_pipeline.relay.delivery import Relay
from outbox_pipeline.relay.following import ENDED_MAXIMUM, ENDED_QUIET, Follower, FollowLimits, Period
from outbox_pipeline.stores.event_log_store import EventLogStore

ENDED_QUEUED_RUN = "a queued run waits for the embedded ClickHouse"
# The job Dagster builds for *Execute checks* / *Materialize* on the asset page.
IMPLICIT_ASSET_JOB = "__ASSET_JOB"
ENDED_NOT_FOLLOWING = "not following (follow_seconds is 0)"


class FollowConfig(dg.Config):
    follow_seconds: float | None = Field(
        default=None,
        ge=0,
        description="Keep relaying new events this long after the backlog, then end (unset: OUTBOX_FOLLOW_SECONDS); "
        "0: end with the backlog (a backfill or one-off run).",
    )
    quiet_seconds: float | None = Field(
        default=None, gt=0, description="End once no event arrived for this long (unset: OUTBOX_FOLLOW_QUIET_SECONDS)."
    )
    interval_seconds: float | None = Field(
        default=None, gt=0, description="Look for new events this often (unset: OUTBOX_FOLLOW_INTERVAL_SECONDS)."
    )
    window_seconds: float | None = Field(
        default=None,
        gt=0,
        description="One event_log materialization per window this long (unset: OUTBOX_MATERIALIZATION_WINDOW_SECONDS).",
    )

    def limits(self, outbox: OutboxDatabaseResource) -> FollowLimits:
        return FollowLimits(
            follow_seconds=outbox.follow_seconds if self.follow_seconds is None else self.follow_seconds,
            quiet_seconds=self.quiet_seconds or outbox.follow_quiet_seconds,
            interval_seconds=self.interval_seconds or outbox.follow_interval_seconds,
            window_seconds=self.window_seconds or outbox.materialization_window_seconds,
        )


def runs_waiting_for_embedded_clickhouse(instance: dg.DagsterInstance) -> bool:
    """Queued runs that wait for the embedded ClickHouse: our tagged jobs, and *Execute checks* on the asset page
    (Dagster's implicit asset job, held back by the checks' pool)."""
    queued = [dg.DagsterRunStatus.QUEUED]
    return bool(
        instance.get_run_records(dg.RunsFilter(statuses=queued, tags=clickhouse_run_tags(True)), limit=1)
        or instance.get_run_records(dg.RunsFilter(statuses=queued, job_name=IMPLICIT_ASSET_JOB), limit=1)
    )


class SharedClickHouse:
    """The run's ClickHouse connection, let go of between two loads when another process waits for it.

    Only the embedded ClickHouse can be wanted elsewhere: one process at a time can open its
    directory, and a following run would otherwise hold it for many minutes.
    """

    def __init__(self, clickhouse: ClickHouseResource, relay: Relay):
        self.clickhouse = clickhouse
        self.relay = relay

    def event_log(self) -> EventLogStore:
        if self.relay.event_log is None:
            self.relay.event_log = self.clickhouse.store()
        return self.relay.event_log

    def ready(self) -> bool:
        """Before a drain: taken back if it was let go; still busy elsewhere: the next look tries again."""
        if self.relay.event_log is None:
            try:
                self.relay.event_log = self.clickhouse.store(busy_wait_seconds=0)
            except StoreBusyError:
                return False
        return True

    def on_pause(self) -> None:
        """Between two looks: a command (`outbox-pipeline status`) may be waiting for the directory."""
        if self.clickhouse.wanted_elsewhere:
            self.clickhouse.release()
            self.relay.event_log = None


def _utc(timestamp: float) -> str:
    return dt.datetime.fromtimestamp(timestamp, dt.UTC).strftime("%H:%M:%S")


def _why_ended(ended: str | None, limits: FollowLimits) -> str:
    if ended == ENDED_QUIET:
        return f"no event arrived for {limits.quiet_seconds:g} s"
    if ended == ENDED_MAXIMUM:
        return f"it reached its maximum of {limits.follow_seconds:g} s; the sensor starts the next run if events keep coming"
    return ended


@dg.op(
    ins={"after_backlog": dg.In(dg.Nothing)},
    description="After the backlog, keep relaying new events as they arrive until the stream is quiet or a limit is reached.",
    pool=shared_ops_pool(),
)
def follow_outbox(
    context: dg.OpExecutionContext,
    config: FollowConfig,
    outbox: OutboxDatabaseResource,
    clickhouse: ClickHouseResource,
    monitor: RelayRunMonitor,
):
    limits = config.limits(outbox)
    if not limits.follows:
        yield dg.Output(_summary(Period(0.0), ENDED_NOT_FOLLOWING), metadata={"ended": ENDED_NOT_FOLLOWING})
        return
    relay = build_relay(context, outbox, monitor)
    relay.event_log = connect_event_log(clickhouse, relay, monitor)

    def should_stop() -> str | None:
        # Only one run can open the embedded ClickHouse: a run queued behind this one must not wait for its end.
        if clickhouse.is_embedded and runs_waiting_for_embedded_clickhouse(context.instance):
            return ENDED_QUEUED_RUN
        return None

    def window_events(window: Period) -> list:
        return window_asset_events(
            clickhouse.asset, window,
            description=f"{window.events_loaded} events loaded from {_utc(window.started_at)} to {_utc(window.ended_at)} UTC "
            "while following the stream",
            counts=outbox.store().counts(include_processed=False), max_lag_seconds=outbox.freshness_max_lag_seconds,
            event_log=destination.event_log(),
        )

    destination = SharedClickHouse(clickhouse, relay)
    follower = Follower(
        relay, limits, should_stop=should_stop, ready=destination.ready, on_pause=destination.on_pause,
        on_batch=monitor.record_batch,
    )
    started_at = dt.datetime.now(dt.UTC)
    context.log.info(
        f"following new events: a look every {limits.interval_seconds:g} s, for up to {limits.follow_seconds:g} s, "
        f"until none arrives for {limits.quiet_seconds:g} s; one materialization per {limits.window_seconds:g} s"
    )
    ended = None
    try:
        for update in follower.updates():
            ended = update.ended
            if update.window is not None and (update.window.batches or update.window.events_rejected):
                yield from window_events(update.window)
                monitor.heartbeat()
            if ended is None:
                minute = update.since_last
                context.log.info(
                    f"following: {minute.events_loaded} events in {minute.drains} loads over the last "
                    f"{minute.seconds:.0f} s ({follower.total.events_loaded} since following began)"
                )
    except Exception:
        # What was delivered before the failure is still recorded if it can be; the failure then ends the run.
        window = follower.close(follower.open_window)
        recorded = []
        if window.batches:
            try:
                recorded = window_events(window)
            except Exception as exc:
                context.log.warning(f"could not record the last window's materialization: {exc}")
        yield from recorded
        raise
    finally:
        total = follower.total
        monitor.set_data(follow_drains=total.drains, follow_events=total.events_loaded, follow_ended=ended or "failed")
        monitor.finished_span(
            "follow", "relay new events as they arrive", started_at,
            drains=total.drains, batches=total.batches, events=total.events_loaded, ended=ended or "failed",
        )
    monitor.record_queue_after(outbox.store().counts(include_processed=False))
    total = follower.total
    context.log.info(
        f"stopped following after {total.seconds:.0f} s ({_why_ended(ended, limits)}): "
        f"{total.events_loaded} events in {total.drains} loads"
    )
    summary = _summary(total, ended)
    yield dg.Output(summary, metadata={key: value for key, value in summary.items() if key != "seconds"})


def _summary(total: Period, ended: str | None) -> dict:
    return {
        "events_loaded": total.events_loaded,
        "events_rejected": total.events_rejected,
        "batches": total.batches,
        "drains": total.drains,
        "seconds": round(total.seconds, 3),
        "ended": ended,
    }
