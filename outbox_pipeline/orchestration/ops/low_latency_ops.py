"""The low-latency mode: one long-running run that relays as soon as producers commit.

Instead of waiting for the sensor's next tick and a run launch (seconds), the run
LISTENs on a channel that a statement-level trigger on ``outbox`` NOTIFYs at every
producer commit, and drains the outbox each time, through the same claim / load /
mark as every other run: the same exactly-once guarantee, and runs of both kinds can
work side by side without ever taking the same events.
"""

import time

import dagster as dg
import psycopg
from pydantic import Field

from outbox_pipeline.monitoring.run_monitor import RelayRunMonitor
from outbox_pipeline.orchestration.resources import ClickHouseResource, OutboxDatabaseResource
from outbox_pipeline.orchestration.run_limits import shared_ops_pool
from outbox_pipeline.relay.delivery import Relay, RunTotals
from outbox_pipeline.stores.outbox_store import NOTIFY_CHANNEL
from outbox_pipeline.stores.postgres_connection import connect_postgres


class LowLatencyConfig(dg.Config):
    max_seconds: float = Field(default=3600.0, gt=0, description="Run this long, then end; the sensor starts the next run.")
    min_interval_seconds: float = Field(
        default=0.2, ge=0, description="At most one drain per interval: batches stay large enough for ClickHouse (a few inserts per second)."
    )
    poll_seconds: float = Field(
        default=1.0, gt=0, description="Drain at least this often without a notification (retries due, leases expired)."
    )
    batch_size: int | None = Field(default=None, ge=1, description="Events per batch (unset: OUTBOX_BATCH_SIZE).")


def wait_for_commit(listener: psycopg.Connection, timeout: float) -> bool:
    """True when a producer committed (a notification arrived) within ``timeout``."""
    for _ in listener.notifies(timeout=timeout, stop_after=1):
        return True
    return False


@dg.op(
    description="Relay continuously: drain on every producer commit (LISTEN/NOTIFY) until max_seconds.",
    pool=shared_ops_pool(),
)
def relay_continuously(
    context: dg.OpExecutionContext,
    config: LowLatencyConfig,
    outbox: OutboxDatabaseResource,
    clickhouse: ClickHouseResource,
    monitor: RelayRunMonitor,
) -> dg.Output[dict]:
    store = outbox.store()
    store.install_commit_notifications()
    relay = Relay(
        store, clickhouse.store(), outbox.policy(config.batch_size),
        claimed_by=context.run_id, on_retry=monitor.on_retry,
    )
    on_loaded = monitor.batch_tracer(store, clickhouse.table)
    totals = RunTotals()
    deadline = time.monotonic() + config.max_seconds
    with connect_postgres(outbox.resolved_url(), application_name="outbox_pipeline listener") as listener:
        listener.execute(f"LISTEN {NOTIFY_CHANNEL}")
        while time.monotonic() < deadline:
            started = time.monotonic()
            drained = relay.drain(deadline=deadline, on_batch=monitor.record_batch, on_loaded=on_loaded)
            totals.batches += drained.batches
            totals.events_loaded += drained.events_loaded
            totals.events_rejected += drained.events_rejected
            # Notifications that arrived while draining are covered by the next drain.
            pause = config.min_interval_seconds - (time.monotonic() - started)
            if pause > 0:
                time.sleep(pause)
            wait_for_commit(listener, min(config.poll_seconds, max(0.0, deadline - time.monotonic())))
    totals.retries = relay.retries
    context.log.info(f"relayed {totals.events_loaded} events in {totals.batches} batches")
    summary = {"events_loaded": totals.events_loaded, "batches": totals.batches, "events_rejected": totals.events_rejected}
    return dg.Output(summary, metadata={key: dg.MetadataValue.int(value) for key, value in summary.items()})
