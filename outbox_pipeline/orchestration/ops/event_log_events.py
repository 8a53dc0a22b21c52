"""What a relay run records on its event_log asset: a materialization, then the checks' evaluations.

One materialization for the run's backlog and, while it follows a stream, one per
time window: the figures are numeric metadata, which the asset's Plots tab draws.
Right after each materialization the run logs an evaluation of both checks of the
asset, so the asset page shows their current status against the latest
materialization instead of "Not evaluated":

* ``freshness``: the same comparison as the check job's (one cheap query);
* ``no_duplicates``: over every copy of the events loaded since the window began
  (``EventLogStore.counts_loaded_since``), which reads only the new rows' time
  range; the check job still reads the whole table on its schedule.
"""

from __future__ import annotations

import datetime as dt

import dagster as dg

from outbox_pipeline.orchestration.assets import DUPLICATES_CHECK, FRESHNESS_CHECK, duplicates_outcome, freshness_outcome
from outbox_pipeline.orchestration.relay_instance import typed_asset_key
from outbox_pipeline.stores.event_log_store import EventLogStore
from outbox_pipeline.stores.reporting import OutboxCounts

# ClickHouse stamps loaded_at with its own clock: the duplicate check looks this much further back.
CLOCK_MARGIN = dt.timedelta(seconds=60)


def relay_metadata(
    *,
    events_loaded: int,
    events_rejected: int,
    batches: int,
    batches_released: int,
    seconds: float,
    counts: OutboxCounts,
) -> dict[str, dg.MetadataValue]:
    """The numeric figures of a run or a window (plotted on the asset page)."""
    seconds = max(seconds, 1e-6)
    return {
        "events_loaded": dg.MetadataValue.int(events_loaded),
        "events_rejected": dg.MetadataValue.int(events_rejected),
        "batches": dg.MetadataValue.int(batches),
        "batches_released": dg.MetadataValue.int(batches_released),
        "duration_seconds": dg.MetadataValue.float(round(seconds, 3)),
        "events_per_second": dg.MetadataValue.float(round(events_loaded / seconds, 1)),
        "queue_size": dg.MetadataValue.int(counts.pending),
        "oldest_pending_age_seconds": dg.MetadataValue.float(round(counts.oldest_pending_age_seconds or 0.0, 3)),
        "failed_events": dg.MetadataValue.int(counts.failed),
    }


def relay_asset_events(
    asset_key: dg.AssetKey,
    metadata: dict[str, dg.MetadataValue],
    *,
    description: str,
    counts: OutboxCounts,
    max_lag_seconds: float,
    event_log: EventLogStore,
    loaded_since: float,
) -> list:
    """The materialization, then the evaluations of the asset's checks that go with it."""
    since = dt.datetime.fromtimestamp(loaded_since, dt.UTC) - CLOCK_MARGIN
    rows, distinct = event_log.counts_loaded_since(since)
    scope = f"the events loaded since {since:%Y-%m-%d %H:%M:%S} UTC"
    return [
        dg.AssetMaterialization(asset_key=asset_key, description=description, metadata=metadata),
        freshness_outcome(counts, max_lag_seconds).evaluation(asset_key, FRESHNESS_CHECK),
        duplicates_outcome(rows, distinct, scope).evaluation(asset_key, DUPLICATES_CHECK),
        # The typed tables took their rows inside the same inserts (a materialized view each).
        *(
            dg.AssetMaterialization(asset_key=typed_asset_key(asset_key, table), description=f"{description}, through {table.view_name}")
            for table in event_log.typed.tables
        ),
    ]


def window_asset_events(
    asset_key: dg.AssetKey, window, *, description: str, counts: OutboxCounts, max_lag_seconds: float, event_log: EventLogStore
) -> list:
    """A following run's window (a ``following.Period``) as the asset's materialization and checks' evaluations."""
    metadata = relay_metadata(
        events_loaded=window.events_loaded, events_rejected=window.events_rejected, batches=window.batches,
        batches_released=0, seconds=window.seconds, counts=counts,
    )
    metadata["drains"] = dg.MetadataValue.int(window.drains)
    return relay_asset_events(
        asset_key, metadata, description=description, counts=counts, max_lag_seconds=max_lag_seconds,
        event_log=event_log, loaded_since=window.started_at,
    )
