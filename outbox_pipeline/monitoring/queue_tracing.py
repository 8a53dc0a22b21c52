"""Sentry's Queues module on the relay side: a loaded batch continues the traces of a sample of its events.

A producer publishing inside a sampled Sentry transaction stored its ``queue.publish``
span's trace headers with each event (publish_tracing.py). After a batch's insert is
acknowledged, and before the batch is marked, the relay reads the headers of a sample
of the batch's traced events in one query and sends, for each, a transaction that
continues the producer's trace: op ``queue.task.outbox``, with one ``queue.process``
span carrying what the Queues module reads. The run's own transaction is untouched.

The sample (docs/sentry.md, "Sentry's Queues module"): always the events ClickHouse rejected
in this batch and those being retried (at most RETRIED_LIMIT of a retry batch), and of
the other traced events at most SAMPLE_SIZE, spread evenly over the batch. The query
looks at every row of a batch of at most EXAMINED_ROWS, and at EXAMINED_ROWS rows spread
over a larger one (primary-key lookups), so its cost does not grow with the batch.

Nothing happens when Sentry is off, and nothing here may fail a run: callers catch.
"""

from __future__ import annotations

import datetime as dt
import time

import sentry_sdk
from sentry_sdk.tracing_utils import has_tracing_enabled

from outbox_pipeline.producer.tracing import MESSAGING_SYSTEM
from outbox_pipeline.relay.delivery import LoadResult
from outbox_pipeline.stores.outbox_store import BatchHandle, OutboxStore, TracedEvent

SAMPLE_SIZE = 10
EXAMINED_ROWS = 500
RETRIED_LIMIT = 50

TASK_OP = "queue.task.outbox"
PROCESS_OP = "queue.process"


def tracing_enabled() -> bool:
    """Whether this process sends transactions to Sentry (a started client with tracing configured)."""
    client = sentry_sdk.get_client()
    return client.is_active() and has_tracing_enabled(client.options)


def continue_batch_traces(outbox: OutboxStore, handle: BatchHandle, result: LoadResult, *, destination: str) -> int:
    """Send one ``queue.process`` transaction per sampled traced event of a loaded batch; returns how many were sampled."""
    if result.lease_lost or not tracing_enabled():
        return 0
    finished = result.finished_at or time.time()
    started = finished - result.seconds
    rejected = {event.outbox_id for event in result.rejected}
    events = outbox.read_trace_sample(
        handle, rejected_outbox_ids=sorted(rejected), sample_size=SAMPLE_SIZE, examined_rows=EXAMINED_ROWS,
        retried_limit=RETRIED_LIMIT,
    )
    for event in events:
        _send_process_transaction(
            event, handle, destination=destination, started=started, finished=finished, rejected=event.outbox_id in rejected
        )
    return len(events)


def _send_process_transaction(
    event: TracedEvent, handle: BatchHandle, *, destination: str, started: float, finished: float, rejected: bool
) -> None:
    headers = {"sentry-trace": event.sentry_trace, "baggage": event.baggage or ""}
    # continue_trace sets the propagation context of the isolation scope: a scope of its own per event.
    with sentry_sdk.isolation_scope():
        transaction = sentry_sdk.continue_trace(headers, op=TASK_OP, name=f"deliver to {destination}", source="task")
        # The insert that delivered the event began before these are read: date both spans back to it.
        transaction.start_timestamp = dt.datetime.fromtimestamp(started, dt.UTC)
        transaction = sentry_sdk.start_transaction(transaction)
        if not getattr(transaction, "sampled", False):
            return  # the producer's trace was not sampled (it stored no headers then), or this process drops it
        status = "internal_error" if rejected else "ok"
        span = transaction.start_child(op=PROCESS_OP, name=destination, start_timestamp=started)
        for key, value in {
            "messaging.system": MESSAGING_SYSTEM,
            "messaging.destination.name": destination,
            "messaging.message.id": event.event_id,
            "messaging.message.body.size": event.body_size,
            # Commit (or, without commit times, the producer's transaction start) to the insert acknowledged, in ms.
            "messaging.message.receive.latency": max(0.0, (finished - event.enqueued_at.timestamp()) * 1000.0),
            "messaging.message.retry.count": event.attempts,
            "outbox.relay": handle.relay,
            "outbox.batch_id": handle.batch_id,
            "outbox.claimed_by": handle.claimed_by,
            "outbox.latency_from": "commit" if event.commit_time_known else "created_at",
            "outbox.outcome": "rejected" if rejected else "delivered",
        }.items():
            span.set_data(key, value)
        span.set_status(status)
        span.finish(end_timestamp=finished)
        transaction.set_status(status)
        transaction.finish(end_timestamp=finished)
