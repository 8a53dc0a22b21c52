"""Ops of ``process_outbox_events``: extract batches, load them into ClickHouse, mark them processed, report.

A load step and its mark step take up to ``batches_per_step`` batches; each batch keeps its own
insert, deduplication token, lease and mark.

The run then follows the stream (ops/follow_ops.py) before it ends.

Only small handles travel between ops (through the IO manager); the rows go
straight from PostgreSQL's COPY into the ClickHouse insert inside ``load_batch``.
"""

import dataclasses
import time

import dagster as dg

from outbox_pipeline.config.errors import ConfigurationError, StoreBusyError
from outbox_pipeline.monitoring.run_monitor import RelayRunMonitor
from outbox_pipeline.orchestration.ops.event_log_events import relay_asset_events, relay_metadata
from outbox_pipeline.orchestration.resources import ClickHouseResource, OutboxDatabaseResource
from outbox_pipeline.orchestration.run_config import RelayRunConfig
from outbox_pipeline.orchestration.run_limits import shared_ops_pool
from outbox_pipeline.relay.delivery import LoadResult, Relay
from outbox_pipeline.relay.retrying import call_with_retries, is_transient
from outbox_pipeline.stores.batches import ends_backlog
from outbox_pipeline.stores.event_log_store import EventLogStore
from outbox_pipeline.stores.outbox_store import BatchHandle, OutboxCounts


@dataclasses.dataclass(frozen=True)
class ClaimedBatches:
    """The batches of one load step, in claim order.

    A step takes several batches because each Dagster step costs bookkeeping (tens
    of events in the run's storage) that competes with the load itself; each batch
    keeps its own insert, deduplication token, lease and mark.
    """

    handles: tuple[BatchHandle, ...]
    deadline: float  # wall-clock time after which the run loads no more batches


@dataclasses.dataclass(frozen=True)
class LoadedBatch:
    handle: BatchHandle
    result: LoadResult


@dataclasses.dataclass(frozen=True)
class MarkedBatch:
    batch_id: int
    row_count: int
    loaded_rows: int
    rejected_rows: int
    seconds: float
    marked: bool
    released: bool


def build_relay(
    context: dg.OpExecutionContext,
    outbox: OutboxDatabaseResource,
    monitor: RelayRunMonitor,
    batch_size: int | None = None,
    prefetch: bool = False,
) -> Relay:
    """A relay on the run's outbox connection; ``load_batch`` attaches ClickHouse itself (with retries)."""
    return Relay(
        outbox.store(),
        None,
        outbox.policy(batch_size),
        claimed_by=context.run_id,
        on_retry=monitor.on_retry,
        prefetcher=outbox.prefetcher() if prefetch else None,
    )


def read_queue(outbox: OutboxDatabaseResource) -> OutboxCounts:
    """The queue, on a connection of its own: the run's may be what failed."""
    with outbox.short_lived_store() as store:
        return store.counts(include_processed=False)


def connect_event_log(clickhouse: ClickHouseResource, relay: Relay, monitor: RelayRunMonitor) -> EventLogStore:
    """ClickHouse may be down (503, refused) when the run starts: connecting is retried like every later call."""
    return call_with_retries(
        "connecting to ClickHouse", clickhouse.store, relay.policy.retry, on_retry=monitor.on_retry, transient=_transient_connect_error
    )


def open_embedded_clickhouse(clickhouse: ClickHouseResource) -> None:
    """Start chDB on the step's own thread, while the reader reads the first batch ahead.

    Loading the engine holds the GIL for most of its 0.3 s. On the inserter's thread, beside
    Dagster's bookkeeping, it took up to 0.9 s. Here the read overlaps it: over 100,000
    events the first insert ended 40-50 ms sooner than with the engine started before the
    read. A busy directory or a failure is left to the first insert, which waits for it or
    reports it.
    """
    try:
        clickhouse.store(busy_wait_seconds=0)
    except Exception:
        pass


def _transient_connect_error(exc: BaseException) -> bool:
    # The connect raises its one-line translation `from None`; the driver's own error is its __context__.
    # A busy chDB directory was already waited for; bad URLs and credentials do not pass.
    if isinstance(exc, (ConfigurationError, StoreBusyError)):
        return False
    return is_transient(exc.__context__ or exc)


@dg.op(out=dg.DynamicOut(ClaimedBatches), description="Claim pending outbox batches for this run (extract).")
def extract_outbox_batches(
    context: dg.OpExecutionContext,
    config: RelayRunConfig,
    outbox: OutboxDatabaseResource,
    clickhouse: ClickHouseResource,
    monitor: RelayRunMonitor,
):
    batch_size = config.batch_size or outbox.batch_size
    max_batches = config.max_batches or outbox.max_batches_per_run
    relay = build_relay(context, outbox, monitor, batch_size)
    deadline = time.time() + (config.max_seconds or outbox.max_seconds_per_run)
    per_step = config.batches_per_step or outbox.batches_per_step
    prefetcher = outbox.prefetcher(embedded_clickhouse=clickhouse.is_embedded)
    # Should the run fail before report_relay_run, the monitor reads the queue's end figures itself.
    monitor.read_queue_at_end(lambda: read_queue(outbox))
    counts = outbox.store().counts(include_processed=False)
    monitor.set_data(batch_size=batch_size)
    monitor.record_queue_before(counts)
    context.log.info(f"{counts.pending} events pending; claiming up to {max_batches} batches of {batch_size}")
    claimed = 0
    step: list[BatchHandle] = []
    while claimed < max_batches:
        with monitor.span("extract", "claim outbox batch") as span:
            handle = relay.claim()
            if span is not None and handle is not None:
                span.set_data("batch_id", handle.batch_id)
                span.set_data("batch_size", handle.row_count)
        if handle is None:
            break
        claimed += 1
        # Reading and inserting the first batch start while the others are still being claimed, and each
        # next batch is inserted while Dagster records the steps of the previous one (see prefetch.py).
        prefetcher.plan([handle])
        if claimed == 1:
            # Only a run with work opens chDB, while the first batch is being read (see open_embedded_clickhouse).
            if clickhouse.is_embedded:
                open_embedded_clickhouse(clickhouse)
            prefetcher.start_inserting(lambda: clickhouse.store(busy_wait_seconds=0), deadline=deadline, batches_ahead=per_step)
        step.append(handle)
        # The backlog's tail: what producers commit from now on is the stream's, which follow_outbox
        # (or the next run) loads in a few batches, not in one Dagster step per trickle.
        tail = ends_backlog(handle, batch_size)
        if len(step) == per_step or tail:
            yield _step_output(step, deadline)
            step = []
        if tail:
            break
    if step:
        yield _step_output(step, deadline)
    context.log.info(f"claimed {claimed} batches")


def _step_output(handles: list[BatchHandle], deadline: float) -> dg.DynamicOutput:
    first, last = handles[0].batch_id, handles[-1].batch_id
    key = f"batch_{first}" if len(handles) == 1 else f"batches_{first}_to_{last}"
    return dg.DynamicOutput(ClaimedBatches(tuple(handles), deadline), mapping_key=key)


@dg.op(
    description="Insert the claimed batches of one step into ClickHouse, each idempotently; isolates events ClickHouse rejects.",
    pool=shared_ops_pool(),
)
def load_batch(
    context: dg.OpExecutionContext,
    claimed: ClaimedBatches,
    outbox: OutboxDatabaseResource,
    clickhouse: ClickHouseResource,
    monitor: RelayRunMonitor,
) -> list[LoadedBatch]:
    relay = build_relay(context, outbox, monitor, prefetch=True)
    loaded: list[LoadedBatch] = []
    try:
        for handle in claimed.handles:
            loaded.append(LoadedBatch(handle, _load_one(context, relay, handle, claimed.deadline, clickhouse, monitor)))
    except Exception:
        # The step fails, so its mark step does not run: every batch of the step goes back at once. Those
        # already inserted are inserted again by the next run under the same tokens, which ClickHouse drops.
        if not relay.release_after_failure(*claimed.handles):
            ids = ", ".join(str(handle.batch_id) for handle in claimed.handles)
            context.log.warning(f"could not release batches {ids}; they are retaken when their leases expire")
        raise
    return loaded


def _load_one(
    context: dg.OpExecutionContext,
    relay: Relay,
    handle: BatchHandle,
    deadline: float,
    clickhouse: ClickHouseResource,
    monitor: RelayRunMonitor,
) -> LoadResult:
    if time.time() >= deadline:
        relay.release(handle)
        context.log.info(f"run time limit reached: batch {handle.batch_id} released for the next run")
        return LoadResult(handle.batch_id, handle.kind, handle.row_count, 0, (), 0, 0.0, lease_lost=True)
    if relay.event_log is None:
        relay.event_log = connect_event_log(clickhouse, relay, monitor)
    with monitor.span("load", "insert batch into ClickHouse", batch_id=handle.batch_id, batch_size=handle.row_count) as span:
        result = relay.load(handle)
        if span is not None:
            # Many inserts for one batch mean rejected events were bisected out.
            span.set_data("inserts", result.inserts)
            span.set_data("rejected", len(result.rejected))
    # Before the mark, which forgets the retry counts of delivered retries.
    monitor.trace_batch(relay.outbox, handle, result, destination=clickhouse.table)
    for event in result.rejected:
        context.log.warning(f"ClickHouse rejected event {event.event_id}: {event.error[:500]}")
    monitor.distribution("outbox.batch_processing_time", result.seconds, unit="second")
    return result


# Priority: a step's batches are marked right after their load, not after every load of the run,
# so a run that dies midway leaves only its current step's batches to be taken again.
@dg.op(
    description="Mark the loaded batches of one step processed, each with its rejected events in one transaction.",
    tags={"dagster/priority": "1"},
)
def mark_batch_processed(
    context: dg.OpExecutionContext,
    batches: list[LoadedBatch],
    outbox: OutboxDatabaseResource,
    monitor: RelayRunMonitor,
) -> list[MarkedBatch]:
    relay = build_relay(context, outbox, monitor)
    return [_mark_one(context, relay, batch, monitor) for batch in batches]


def _mark_one(context: dg.OpExecutionContext, relay: Relay, batch: LoadedBatch, monitor: RelayRunMonitor) -> MarkedBatch:
    loaded = batch.result
    with monitor.span("mark", "mark batch processed", batch_id=loaded.batch_id):
        marked = relay.mark(loaded, batch.handle)
    if marked:
        monitor.record_batch(loaded)
    elif not loaded.lease_lost:
        context.log.info(f"batch {loaded.batch_id} was finished by another run")
    return MarkedBatch(
        loaded.batch_id, loaded.row_count, loaded.loaded_rows if marked else 0, len(loaded.rejected) if marked else 0,
        loaded.seconds, marked, loaded.lease_lost,
    )


@dg.op(description="Record what the run did with its backlog on the event_log asset, with the checks' evaluations.")
def report_relay_run(
    context: dg.OpExecutionContext,
    steps: list[list[MarkedBatch]],
    outbox: OutboxDatabaseResource,
    clickhouse: ClickHouseResource,
    monitor: RelayRunMonitor,
):
    batches = [batch for step in steps for batch in step]
    stats = context.instance.get_run_stats(context.run_id)
    started = stats.start_time or time.time()
    loaded = sum(b.loaded_rows for b in batches)
    counts = outbox.store().counts(include_processed=False)
    monitor.record_queue_after(counts)
    metadata = relay_metadata(
        events_loaded=loaded,
        events_rejected=sum(b.rejected_rows for b in batches),
        batches=sum(1 for b in batches if b.marked),
        batches_released=sum(1 for b in batches if b.released),
        seconds=time.time() - started,
        counts=counts,
    )
    if loaded:
        relay = build_relay(context, outbox, monitor)
        yield from relay_asset_events(
            clickhouse.asset, metadata, description=f"{loaded} events of the backlog", counts=counts,
            max_lag_seconds=outbox.freshness_max_lag_seconds, event_log=connect_event_log(clickhouse, relay, monitor),
            loaded_since=started,
        )
    yield dg.Output({key: value.value for key, value in metadata.items()}, metadata=metadata)
