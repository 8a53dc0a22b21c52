"""The events of a loaded batch whose Sentry traces the relay continues (Sentry's Queues module).

A sample, read in one query per batch and only when Sentry is on: see docs/sentry.md, "Sentry's
Queues module", and monitoring/queue_tracing.py.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections.abc import Sequence

import psycopg

from outbox_pipeline.stores.batches import BatchHandle


@dataclasses.dataclass(frozen=True)
class TracedEvent:
    """An event of a batch that was published inside a traced Sentry transaction (see monitoring/queue_tracing.py)."""

    outbox_id: int
    event_id: str
    # The producer's commit when the server records commit times (track_commit_timestamp), else created_at
    enqueued_at: dt.datetime
    commit_time_known: bool
    sentry_trace: str
    baggage: str | None
    body_size: int
    # Failed deliveries before this one (outbox_failure.attempts)
    attempts: int
    # Retried or rejected: always traced, whatever the sample
    always: bool


# The start of the producer's transaction (created_at = now()) is the fallback: PostgreSQL knows commit
# times only with track_commit_timestamp on, and CASE keeps the function from being called without it.
_COMMIT_TIME = "CASE WHEN current_setting('track_commit_timestamp')::boolean THEN pg_xact_commit_timestamp(o.txid::xid) END"
_TRACED_COLUMNS = f"""o.id, o.event_id::text AS event_id, coalesce({_COMMIT_TIME}, o.created_at) AS enqueued_at,
    {_COMMIT_TIME} IS NOT NULL AS commit_time_known, o.sentry_trace, o.sentry_baggage,
    octet_length(o.event_context) AS body_size, coalesce(f.attempts, 0) AS attempts"""
_TRACED_NAMES = "id, event_id, enqueued_at, commit_time_known, sentry_trace, sentry_baggage, body_size, attempts, always"


def read_trace_sample(
    conn: psycopg.Connection,
    handle: BatchHandle,
    *,
    rejected_outbox_ids: Sequence[int],
    sample_size: int,
    examined_rows: int,
    retried_limit: int,
) -> list[TracedEvent]:
    """The traced events of a batch whose traces the relay continues, in one query (see docs/sentry.md, "Sentry's Queues module").

    Always: the rejected events and those retried (at most ``retried_limit`` of a retry batch
    besides the rejected). Of the other traced events, all if at most ``sample_size``, else
    ``sample_size`` spread evenly over them in id order. A range batch of more than
    ``examined_rows`` rows is sampled at that many ids spread evenly over its id range, each
    a primary-key lookup: the query never scans a large batch.
    """
    rejected = list(rejected_outbox_ids)
    if handle.kind == "retry":
        rows = conn.execute(
            f"""
            SELECT {_TRACED_COLUMNS}, true FROM outbox_failure f JOIN outbox o ON o.id = f.outbox_id
            WHERE f.batch_id = %s AND o.sentry_trace IS NOT NULL
            ORDER BY o.id = ANY(%s) DESC, o.id LIMIT %s
            """,
            (handle.batch_id, rejected, retried_limit + len(rejected)),
        ).fetchall()
        return sorted((TracedEvent(*row) for row in rows), key=lambda event: event.outbox_id)
    filtered = bool(handle.event_type_patterns)
    if handle.row_count <= examined_rows:
        # Ordered and limited like every read of a batch, so the planner walks the (txid, id) index.
        source = f"""(SELECT * FROM outbox WHERE (txid, id) >= (%(first_txid)s::xid8, %(first_id)s)
                      AND (txid, id) <= (%(last_txid)s::xid8, %(last_id)s) ORDER BY txid, id LIMIT {examined_rows:d}) AS o"""
        probes = ()
    else:
        source = "unnest(%(probes)s::bigint[]) AS p (id) JOIN outbox o ON o.id = p.id"
        probes = (_spread_ids(handle, examined_rows, rejected),)
    params = {
        "probes": probes[0] if probes else None, "relay": handle.relay, "rejected": rejected, "sample": sample_size,
        "first_txid": handle.first_key[0], "first_id": handle.first_key[1],
        "last_txid": handle.last_key[0], "last_id": handle.last_key[1], "patterns": list(handle.event_type_patterns),
    }
    rows = conn.execute(
        f"""
        WITH traced AS (
            SELECT {_TRACED_COLUMNS}, o.id = ANY(%(rejected)s) OR coalesce(f.attempts, 0) > 0 AS always
            FROM {source} LEFT JOIN outbox_failure f ON f.outbox_id = o.id AND f.relay = %(relay)s
            WHERE o.sentry_trace IS NOT NULL
              AND (o.txid, o.id) >= (%(first_txid)s::xid8, %(first_id)s) AND (o.txid, o.id) <= (%(last_txid)s::xid8, %(last_id)s)
              {"AND o.event_type LIKE ANY (%(patterns)s)" if filtered else ""}
        ), pool AS (
            SELECT traced.*, row_number() OVER (ORDER BY id) - 1 AS k, count(*) OVER () AS total FROM traced WHERE NOT always
        )
        SELECT {_TRACED_NAMES} FROM traced WHERE always
        UNION ALL
        -- the k-th of the pool is kept when k = floor(i * total / sample) for some i < sample
        SELECT {_TRACED_NAMES} FROM pool
        WHERE total <= %(sample)s
           OR ((k * %(sample)s + total - 1) / total < %(sample)s
               AND ((k * %(sample)s + total - 1) / total) * total / %(sample)s = k)
        """,
        params,
    ).fetchall()
    return sorted((TracedEvent(*row) for row in rows), key=lambda event: event.outbox_id)


def _spread_ids(handle: BatchHandle, count: int, extra: Sequence[int]) -> list[int]:
    """``count`` ids spread evenly from the batch's first to its last id, plus ``extra``."""
    low, high = sorted((handle.first_key[1], handle.last_key[1]))
    span = high - low
    spread = {low + span * i // max(count - 1, 1) for i in range(count)}
    return sorted(spread.union(extra))
