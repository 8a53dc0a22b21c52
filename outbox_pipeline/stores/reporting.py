"""What a relay has left to do, and how the outbox table is doing: read-only queries.

Every figure is one relay's: its cursor, its batches, its failures, and only the
event types its filter matches. The default relay's queries carry no type filter,
so they stay index-only scans of ``(txid, id)``.
"""

from __future__ import annotations

import dataclasses

import psycopg
from psycopg.rows import dict_row

from outbox_pipeline.stores.relay_identity import RelayIdentity

# A filtered relay looks this far past its cursor for a matching event. Further
# rows of other types are work too: the next claim moves the cursor past them, so
# the look never has to cover a long run of them twice.
UNMATCHED_LOOKAHEAD_ROWS = 10_000


@dataclasses.dataclass(frozen=True)
class OutboxCounts:
    pending: int
    in_flight: int
    processed: int
    retrying: int
    failed: int
    oldest_pending_age_seconds: float | None


def _type_filter(relay: RelayIdentity, column: str = "event_type") -> str:
    return f" AND {column} LIKE ANY (%(patterns)s)" if relay.like_patterns else ""


def _params(relay: RelayIdentity, **more) -> dict:
    return {"relay": relay.name, "patterns": list(relay.like_patterns), **more}


def has_pending_work(conn: psycopg.Connection, relay: RelayIdentity) -> bool:
    beyond_cursor = """
        SELECT {what} FROM outbox
        WHERE (txid, id) > (SELECT claimed_txid, claimed_id FROM outbox_relay_cursor WHERE relay = %(relay)s)
          AND txid < pg_snapshot_xmin(pg_current_snapshot())
    """
    if relay.like_patterns:
        new_events = f"""
            (SELECT coalesce(bool_or(event_type LIKE ANY (%(patterns)s)), false) OR count(*) >= %(lookahead)s
             FROM ({beyond_cursor.format(what="event_type")} ORDER BY txid, id LIMIT %(lookahead)s) AS ahead)
        """
    else:
        new_events = f"EXISTS ({beyond_cursor.format(what='1')})"
    (pending,) = conn.execute(
        f"""
        SELECT {new_events}
            OR EXISTS (SELECT 1 FROM outbox_batch WHERE relay = %(relay)s AND state = 'claimed' AND lease_expires_at < now())
            OR EXISTS (SELECT 1 FROM outbox_failure
                       WHERE relay = %(relay)s AND state = 'retrying' AND next_attempt_at <= now() AND batch_id IS NULL)
        """,
        _params(relay, lookahead=UNMATCHED_LOOKAHEAD_ROWS),
    ).fetchone()
    return bool(pending)


def pending_work_fingerprint(conn: psycopg.Connection, relay: RelayIdentity) -> str:
    """Identifies the relay's work waiting now; it changes whenever work is claimed, finished or added."""
    row = conn.execute(
        """
        SELECT c.claimed_txid::text || ':' || c.claimed_id,
               (SELECT max(id) FROM outbox),
               (SELECT count(*) FROM outbox_batch WHERE relay = c.relay AND state = 'claimed'),
               (SELECT max(id) FROM outbox_batch WHERE relay = c.relay)
        FROM outbox_relay_cursor c WHERE c.relay = %(relay)s
        """,
        _params(relay),
    ).fetchone()
    return "/".join(str(part) for part in row)


def counts(conn: psycopg.Connection, relay: RelayIdentity, *, include_processed: bool = True) -> OutboxCounts:
    """Pending (waiting, in flight, awaiting a retry), processed and failed events of the relay.

    ``include_processed=False`` skips counting the whole table (``processed`` is
    then 0): what a run needs for its queue size.
    """
    type_filter = _type_filter(relay)
    row = conn.execute(
        f"""
        WITH cursor AS (SELECT claimed_txid, claimed_id FROM outbox_relay_cursor WHERE relay = %(relay)s),
        beyond AS (
            SELECT count(*) AS n,
                   -- the oldest transaction's first row: an index lookup, not a scan
                   (SELECT created_at FROM outbox WHERE (txid, id) > (SELECT claimed_txid, claimed_id FROM cursor){type_filter}
                    ORDER BY txid, id LIMIT 1) AS oldest
            FROM outbox WHERE (txid, id) > (SELECT claimed_txid, claimed_id FROM cursor){type_filter}
        ),
        flight AS (
            SELECT coalesce(sum(row_count) FILTER (WHERE kind = 'range'), 0) AS n, min(oldest_created_at) AS oldest
            FROM outbox_batch WHERE relay = %(relay)s AND state = 'claimed'
        ),
        failures AS (
            SELECT count(*) FILTER (WHERE state = 'retrying') AS retrying,
                   count(*) FILTER (WHERE state = 'failed') AS failed,
                   min(first_failed_at) FILTER (WHERE state = 'retrying') AS oldest
            FROM outbox_failure WHERE relay = %(relay)s
        )
        SELECT beyond.n, flight.n,
               CASE WHEN %(include_processed)s THEN (SELECT count(*) FROM outbox WHERE true{type_filter}) END AS total,
               failures.retrying, failures.failed,
               extract(epoch FROM now() - least(beyond.oldest, flight.oldest, failures.oldest))
        FROM beyond, flight, failures
        """,
        _params(relay, include_processed=include_processed),
    ).fetchone()
    beyond, in_flight, total, retrying, failed, oldest_age = row
    return OutboxCounts(
        pending=int(beyond + in_flight + retrying),
        in_flight=int(in_flight),
        processed=int(total - beyond - in_flight - retrying - failed) if total is not None else 0,
        retrying=int(retrying),
        failed=int(failed),
        oldest_pending_age_seconds=float(oldest_age) if oldest_age is not None else None,
    )


def check_xid_horizon(conn: psycopg.Connection) -> str | None:
    """A database restored from a dump can have its transaction counter behind the stored txids.

    New events would then sort before the relay cursors and never be claimed.
    """
    row = conn.execute(
        "SELECT c.claimed_txid::text, pg_snapshot_xmax(pg_current_snapshot())::text "
        "FROM outbox_relay_cursor c WHERE c.claimed_txid > pg_snapshot_xmax(pg_current_snapshot()) "
        "ORDER BY c.claimed_txid DESC LIMIT 1"
    ).fetchone()
    if row:
        return (
            f"the relay cursor (transaction {row[0]}) is ahead of this server's transaction counter ({row[1]}): "
            "the outbox was restored from a dump; see 'Restoring the outbox' in docs/upgrading.md"
        )
    return None


def table_statistics(conn: psycopg.Connection) -> dict:
    """Sizes and tuples of the outbox, summed over its partitions (or of the table, before schema version 6)."""
    with conn.cursor(row_factory=dict_row) as cur:
        return cur.execute(
            """
            SELECT coalesce(sum(pg_total_relation_size(p.relid)), 0)::bigint AS total_bytes,
                   coalesce(sum(pg_relation_size(p.relid)), 0)::bigint AS heap_bytes,
                   coalesce(sum(pg_indexes_size(p.relid)), 0)::bigint AS index_bytes,
                   coalesce(sum(s.n_live_tup), 0)::bigint AS live_tuples, coalesce(sum(s.n_dead_tup), 0)::bigint AS dead_tuples
            FROM (SELECT relid FROM pg_partition_tree('outbox') WHERE isleaf
                  UNION ALL SELECT oid::regclass FROM pg_class WHERE oid = 'outbox'::regclass AND relkind = 'r') p
            LEFT JOIN pg_stat_user_tables s ON s.relid = p.relid
            """
        ).fetchone()
