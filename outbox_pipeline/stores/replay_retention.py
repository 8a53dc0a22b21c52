"""Queries of the replay and retention jobs: which events were delivered, and deleting old ones.

Delivered (``processed``) is always one relay's view: at or below its cursor, in
none of its batches still claimed, and with no failure record of its own. An
event may be deleted only once every relay whose filter matches it has delivered
it (an event no relay wants needs no one's permission).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence

import psycopg

from outbox_pipeline.stores.batch_reads import SELECT_EVENT_COLUMNS, copy_csv
from outbox_pipeline.stores.relay_identity import RelayIdentity

# Where rows are deleted one by one: the default partition, or (benches measuring the
# schema before version 6) the whole unpartitioned outbox.
ROW_DELETE_TABLES = ("outbox_default", "outbox")


def delete_processed_before(
    conn: psycopg.Connection, cutoff: dt.datetime, *, chunk_size: int, table: str = "outbox_default"
) -> int:
    """Delete one chunk of events of ``outbox_default`` created before ``cutoff`` that every relay they match has delivered.

    The daily partitions go whole (partitions.py); only the events no partition covered
    are deleted row by row. Each chunk is its own short statement. Like the first
    release, an event is kept from the first key of a relay's oldest range batch still
    in flight on.
    """
    if table not in ROW_DELETE_TABLES:
        raise ValueError(f"rows are deleted from one of {ROW_DELETE_TABLES}, not {table!r}")
    row = conn.execute(
        f"""
        WITH relays AS (
            SELECT r.event_type_patterns AS patterns, r.claimed_txid, r.claimed_id, b.first_txid, b.first_id
            FROM outbox_relay_cursor r
            LEFT JOIN LATERAL (
                SELECT first_txid, first_id FROM outbox_batch
                WHERE relay = r.relay AND state = 'claimed' AND kind = 'range'
                ORDER BY first_txid, first_id LIMIT 1
            ) b ON true
        ),
        doomed AS (
            SELECT o.id FROM {table} o
            WHERE o.created_at < %(cutoff)s
              AND NOT EXISTS (SELECT 1 FROM outbox_failure f WHERE f.outbox_id = o.id)
              AND NOT EXISTS (
                  SELECT 1 FROM relays r
                  WHERE (cardinality(r.patterns) = 0 OR o.event_type LIKE ANY (r.patterns))
                    AND ((o.txid, o.id) > (r.claimed_txid, r.claimed_id) OR (o.txid, o.id) >= (r.first_txid, r.first_id)))
            ORDER BY o.created_at LIMIT %(n)s
        ),
        deleted AS (DELETE FROM {table} WHERE id IN (SELECT id FROM doomed) RETURNING 1)
        SELECT count(*) FROM deleted
        """,
        {"cutoff": cutoff, "n": chunk_size},
    ).fetchone()
    return row[0]


def delete_finished_batches_before(conn: psycopg.Connection, cutoff: dt.datetime, *, chunk_size: int = 10_000) -> int:
    """Delete one chunk of batches (of any relay) finished before ``cutoff``; returns how many."""
    row = conn.execute(
        """
        WITH doomed AS (
            SELECT b.id FROM outbox_batch b WHERE b.state = 'done' AND b.done_at < %s
              AND NOT EXISTS (SELECT 1 FROM outbox_failure f WHERE f.batch_id = b.id)
            ORDER BY b.done_at LIMIT %s
        ),
        deleted AS (DELETE FROM outbox_batch WHERE id IN (SELECT id FROM doomed) RETURNING 1)
        SELECT count(*) FROM deleted
        """,
        (cutoff, chunk_size),
    ).fetchone()
    return row[0]


def retire_relay(conn: psycopg.Connection, name: str) -> bool:
    """Forget a relay: its cursor, batches and failures. False if it was not registered.

    Retention stops waiting for it. Registered again later, it starts over from
    the oldest event the outbox still holds.
    """
    with conn.transaction():
        conn.execute("DELETE FROM outbox_failure WHERE relay = %s", (name,))
        conn.execute("DELETE FROM outbox_batch WHERE relay = %s", (name,))
        return conn.execute("DELETE FROM outbox_relay_cursor WHERE relay = %s RETURNING 1", (name,)).fetchone() is not None


def day_outbox_ids(conn: psycopg.Connection, relay: RelayIdentity, day: dt.date) -> list[int]:
    """Outbox ids of the relay's events of one UTC day of event_date_time, in id order (8 bytes each: a day fits in memory)."""
    type_filter = " AND event_type LIKE ANY (%s)" if relay.like_patterns else ""
    params = (day, day + dt.timedelta(days=1), *([list(relay.like_patterns)] if relay.like_patterns else []))
    return [
        r[0]
        for r in conn.execute(
            "SELECT id FROM outbox WHERE event_date_time >= %s::date::timestamptz "
            f"AND event_date_time < %s::date::timestamptz{type_filter} ORDER BY id",
            params,
        ).fetchall()
    ]


def delivery_states(conn: psycopg.Connection, relay: RelayIdentity, outbox_ids: Sequence[int]) -> list[tuple[int, str, str]]:
    """(id, event_id, state) in id order, for the relay; state is processed, pending, in_flight, retrying or failed.

    Processed means delivered by the relay, which never loads it again. One
    statement, so one consistent snapshot of the relay's bookkeeping.
    """
    return [
        (r[0], r[1], r[2])
        for r in conn.execute(
            """
            SELECT o.id, o.event_id::text,
                   CASE WHEN f.state IS NOT NULL THEN f.state
                        WHEN (o.txid, o.id) > (c.claimed_txid, c.claimed_id) THEN 'pending'
                        WHEN EXISTS (
                            SELECT 1 FROM outbox_batch b
                            WHERE b.relay = c.relay AND b.state = 'claimed' AND b.kind = 'range'
                              AND (o.txid, o.id) >= (b.first_txid, b.first_id)
                              AND (o.txid, o.id) <= (b.last_txid, b.last_id)) THEN 'in_flight'
                        ELSE 'processed' END
            FROM outbox o JOIN outbox_relay_cursor c ON c.relay = %(relay)s
            LEFT JOIN outbox_failure f ON f.outbox_id = o.id AND f.relay = c.relay
            WHERE o.id = ANY(%(ids)s) ORDER BY o.id
            """,
            {"relay": relay.name, "ids": list(outbox_ids)},
        ).fetchall()
    ]


def days_delivered_since(conn: psycopg.Connection, relay: RelayIdentity, since: dt.datetime) -> list[dt.date]:
    """UTC days of event_date_time of the relay's events in range batches finished at or after ``since``.

    What a completeness pass looks at again between two full passes; it reads only the rows of
    those batches, through the (txid, id) index. Events delivered by a retry of their own are
    left to the full pass (their failure records are gone once they land).
    """
    type_filter = " AND o.event_type LIKE ANY (%(patterns)s)" if relay.like_patterns else ""
    rows = conn.execute(
        f"""
        SELECT DISTINCT (o.event_date_time AT TIME ZONE 'UTC')::date
        FROM outbox_batch b JOIN outbox o
          ON (o.txid, o.id) >= (b.first_txid, b.first_id) AND (o.txid, o.id) <= (b.last_txid, b.last_id)
        WHERE b.relay = %(relay)s AND b.kind = 'range' AND b.state = 'done' AND b.done_at >= %(since)s{type_filter}
        """,
        {"relay": relay.name, "since": since, "patterns": list(relay.like_patterns)},
    ).fetchall()
    return sorted(row[0] for row in rows)


def delivered_per_day(
    conn: psycopg.Connection, relay: RelayIdentity, since: dt.date, days: Sequence[dt.date] | None = None
) -> dict[dt.date, int]:
    """Per UTC day of event_date_time from ``since`` on (only ``days``, if given): how many of the relay's events
    it has delivered (processed).

    The same states as ``delivery_states``, counted in one statement over the days' index range.
    """
    type_filter = " AND o.event_type LIKE ANY (%(patterns)s)" if relay.like_patterns else ""
    if days is not None:
        type_filter += " AND (o.event_date_time AT TIME ZONE 'UTC')::date = ANY(%(days)s)"
    rows = conn.execute(
        f"""
        SELECT (o.event_date_time AT TIME ZONE 'UTC')::date, count(*)
        FROM outbox o JOIN outbox_relay_cursor c ON c.relay = %(relay)s
        WHERE o.event_date_time >= %(since)s::date::timestamptz{type_filter}
          AND (o.txid, o.id) <= (c.claimed_txid, c.claimed_id)
          AND NOT EXISTS (SELECT 1 FROM outbox_failure f WHERE f.outbox_id = o.id AND f.relay = c.relay)
          AND NOT EXISTS (
              SELECT 1 FROM outbox_batch b
              WHERE b.relay = c.relay AND b.state = 'claimed' AND b.kind = 'range'
                AND (o.txid, o.id) >= (b.first_txid, b.first_id) AND (o.txid, o.id) <= (b.last_txid, b.last_id))
        GROUP BY 1
        """,
        {"relay": relay.name, "since": since, "patterns": list(relay.like_patterns), "days": list(days or [])},
    ).fetchall()
    return dict(rows)


def events_csv(conn: psycopg.Connection, outbox_ids: Sequence[int]) -> bytes:
    """These events as CSV in event_log column order and id order, straight from COPY."""
    query = f"SELECT {SELECT_EVENT_COLUMNS} FROM outbox o WHERE o.id = ANY(%s) ORDER BY o.id"
    return bytes(copy_csv(conn, query, (list(outbox_ids),)))
