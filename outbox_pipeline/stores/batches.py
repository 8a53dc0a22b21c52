"""A relay's batches: claim, lease, read, split and mark, on the PostgreSQL outbox.

Design (see docs/guarantees.md):

* Producers only INSERT into ``outbox``; each row records the id of its writing
  transaction (``txid``, xid8). The relay never updates or deletes event rows
  on the hot path.
* Work is ordered by ``(txid, id)``. Everything below the oldest transaction
  still running (``pg_snapshot_xmin``) is final: no row can ever appear there
  again, so a cursor over that prefix never skips a late-committing transaction
  (the classic "id > last id" bug).
* A batch is a claimed key range, one row in ``outbox_batch``: its membership is
  fixed before anything is inserted into ClickHouse, which is what makes the
  ClickHouse insert idempotent (the deduplication token is derived from it).
  Claiming and marking are one row write each, whatever the batch size.
* A claim is a lease: a batch whose run died is taken again after it expires.
* Events that ClickHouse rejects are recorded in ``outbox_failure`` and retried
  on their own with backoff until they land or are marked failed.
* Every relay has its own cursor, batches and failures. A relay with an event-type
  filter holds the rows of its key range whose type matches the patterns recorded
  on the batch at the claim.

Filtered claims walk the same ``(txid, id)`` index as the default relay and test
each row's type on the heap (rows sit there in about insertion order). Their
cursor moves past every row they examined below the horizon, matching or not, so
each row is examined once per relay. No index on ``event_type`` is needed, and
none is built on the outbox (which would block producers during an upgrade).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import psycopg

from outbox_pipeline.stores.relay_identity import DEFAULT_RELAY_NAME

_RETURNING = """
    RETURNING id, kind, row_count, claimed_by, claim_count, split_points,
              first_txid::text, first_id, last_txid::text, last_id, relay, event_type_patterns
"""


@dataclasses.dataclass(frozen=True)
class BatchHandle:
    """What ops pass to each other: a claimed batch, never its rows."""

    batch_id: int
    kind: str
    row_count: int
    claimed_by: str
    claim_count: int
    installation_id: str
    split_points: tuple[int, ...] = ()
    # (txid, id) bounds of a range batch, so reading it is one index range scan
    first_key: tuple[str, int] | None = None
    last_key: tuple[str, int] | None = None
    relay: str = DEFAULT_RELAY_NAME
    # LIKE patterns fixing which rows of the range belong to the batch; empty: all
    event_type_patterns: tuple[str, ...] = ()

    def deduplication_token(self, start: int, stop: int) -> str:
        """Names rows start:stop of this batch, whose membership never changes.

        The default relay's tokens keep the first release's format, so a batch in
        flight across the upgrade is deduplicated against its earlier insert.
        """
        relay = "" if self.relay == DEFAULT_RELAY_NAME else f"{self.relay}-"
        return f"outbox-{self.installation_id}-{relay}{self.kind}-{self.batch_id}-{start}-{stop}"


def ends_backlog(handle: BatchHandle, batch_size: int) -> bool:
    """A first claim of new events that came back short: the tail of what was pending.

    Events committed from then on are a stream's, for the next look; claiming on would
    follow a steady stream one tiny batch at a time, a core busy for a few events each.
    """
    return handle.kind == "range" and handle.claim_count == 1 and handle.row_count < batch_size


@dataclasses.dataclass(frozen=True)
class RejectedEvent:
    position: int
    outbox_id: int
    event_id: str
    error: str


def _handle(row, installation_id: str) -> BatchHandle | None:
    if row is None:
        return None
    batch_id, kind, row_count, claimed_by, claim_count, split_points, first_txid, first_id, last_txid, last_id, relay, patterns = row
    return BatchHandle(
        batch_id, kind, row_count, claimed_by, claim_count, installation_id, tuple(split_points or ()),
        (first_txid, first_id) if first_txid is not None else None,
        (last_txid, last_id) if last_txid is not None else None,
        relay, tuple(patterns or ()),
    )


# -- claiming ---------------------------------------------------------------------------


def claim_next_batch(
    conn: psycopg.Connection, relay: str, installation_id: str, *, claimed_by: str, batch_size: int, lease_seconds: float
) -> BatchHandle | None:
    """Claim the relay's oldest available work: an expired lease, then due retries, then new events."""
    row = (
        _claim_expired_batch(conn, relay, claimed_by, lease_seconds)
        or _claim_due_retries(conn, relay, claimed_by, batch_size, lease_seconds)
        or _claim_next_range(conn, relay, claimed_by, batch_size, lease_seconds)
    )
    return _handle(row, installation_id)


def _claim_expired_batch(conn, relay: str, claimed_by: str, lease_seconds: float):
    with conn.transaction():
        return conn.execute(
            """
            UPDATE outbox_batch SET claimed_by = %(by)s, claim_count = claim_count + 1, claimed_at = now(),
                   lease_expires_at = now() + make_interval(secs => %(lease)s)
            WHERE id = (SELECT id FROM outbox_batch WHERE relay = %(relay)s AND state = 'claimed' AND lease_expires_at < now()
                        ORDER BY id LIMIT 1 FOR UPDATE SKIP LOCKED)
            """ + _RETURNING,
            {"by": claimed_by, "lease": lease_seconds, "relay": relay},
        ).fetchone()


def _claim_due_retries(conn, relay: str, claimed_by: str, batch_size: int, lease_seconds: float):
    with conn.transaction():
        due = conn.execute(
            """
            SELECT outbox_id FROM outbox_failure
            WHERE relay = %s AND state = 'retrying' AND next_attempt_at <= now() AND batch_id IS NULL
            ORDER BY outbox_id LIMIT %s FOR UPDATE SKIP LOCKED
            """,
            (relay, batch_size),
        ).fetchall()
        if not due:
            return None
        ids = [r[0] for r in due]
        row = conn.execute(
            """
            INSERT INTO outbox_batch (relay, kind, row_count, claimed_by, lease_expires_at, oldest_created_at)
            SELECT %(relay)s, 'retry', %(n)s, %(by)s, now() + make_interval(secs => %(lease)s), min(created_at)
            FROM outbox WHERE id = ANY(%(ids)s)
            """ + _RETURNING,
            {"relay": relay, "n": len(ids), "by": claimed_by, "lease": lease_seconds, "ids": ids},
        ).fetchone()
        conn.execute("UPDATE outbox_failure SET batch_id = %s WHERE relay = %s AND outbox_id = ANY(%s)", (row[0], relay, ids))
    return row


def _next_keys(filtered: bool, columns: str = "txid, id") -> str:
    """Rows after the relay cursor whose transactions are all finished (txid below the horizon).

    Only the keys by default: then PostgreSQL counts its way to a batch's last row in the
    (txid, id) index alone, three times faster than fetching every row from the table.
    """
    return f"""
        SELECT {columns} FROM outbox
        WHERE (txid, id) > (%(txid)s, %(id)s) AND txid < %(horizon)s
    """ + (" AND event_type LIKE ANY (%(patterns)s)" if filtered else "")


def _claim_next_range(conn, relay: str, claimed_by: str, batch_size: int, lease_seconds: float):
    with conn.transaction():
        # First statement of the transaction, before it takes any lock and so
        # gets an xid of its own: every txid below this horizon is final.
        (horizon,) = conn.execute("SELECT pg_snapshot_xmin(pg_current_snapshot())").fetchone()
        # The patterns are read with the cursor, under its lock: one filter per claim.
        cursor_txid, cursor_id, patterns = conn.execute(
            "SELECT claimed_txid, claimed_id, event_type_patterns FROM outbox_relay_cursor WHERE relay = %s FOR UPDATE", (relay,)
        ).fetchone()
        params = {"txid": cursor_txid, "id": cursor_id, "horizon": horizon, "n": batch_size, "patterns": list(patterns)}
        next_keys = _next_keys(bool(patterns))
        # Index scans only: the first key, then the n-th (or, for a short tail, the last and the count).
        first = conn.execute(_next_keys(bool(patterns), "txid, id, created_at") + "ORDER BY txid, id LIMIT 1", params).fetchone()
        if first is None:
            if patterns:
                _skip_unmatched_rows(conn, relay, params)
            return None
        first_txid, first_id, oldest = first
        last = conn.execute(next_keys + "ORDER BY txid, id OFFSET %(n)s - 1 LIMIT 1", params).fetchone()
        if last is not None:
            last_txid, last_id = last
            row_count = batch_size
        else:
            last_txid, last_id, row_count = conn.execute(
                f"SELECT * FROM ({next_keys}) AS tail, LATERAL (SELECT count(*) FROM ({next_keys}) AS n) AS c "
                "ORDER BY txid DESC, id DESC LIMIT 1",
                params,
            ).fetchone()
        row = conn.execute(
            """
            INSERT INTO outbox_batch (relay, kind, first_txid, first_id, last_txid, last_id, row_count,
                                      oldest_created_at, claimed_by, lease_expires_at, event_type_patterns)
            VALUES (%s, 'range', %s, %s, %s, %s, %s, %s, %s, now() + make_interval(secs => %s), %s)
            """ + _RETURNING,
            (relay, first_txid, first_id, last_txid, last_id, row_count, oldest, claimed_by, lease_seconds, list(patterns)),
        ).fetchone()
        conn.execute(
            "UPDATE outbox_relay_cursor SET claimed_txid = %s, claimed_id = %s, updated_at = now() WHERE relay = %s",
            (last_txid, last_id, relay),
        )
        if patterns and last is None:
            # The tail past the last match holds only other types: nothing to claim there.
            _skip_unmatched_rows(conn, relay, params)
    return row


def _skip_unmatched_rows(conn, relay: str, params: dict) -> None:
    """Move a filtered relay's cursor to the last final row: every row up to it was examined and holds no match."""
    conn.execute(
        """
        UPDATE outbox_relay_cursor c SET claimed_txid = last.txid, claimed_id = last.id, updated_at = now()
        FROM (SELECT txid, id FROM outbox WHERE (txid, id) > (%(txid)s, %(id)s) AND txid < %(horizon)s
              ORDER BY txid DESC, id DESC LIMIT 1) AS last
        WHERE c.relay = %(relay)s AND (last.txid, last.id) > (c.claimed_txid, c.claimed_id)
        """,
        {**params, "relay": relay},
    )


# -- leases and splits --------------------------------------------------------------------


def renew_lease(conn: psycopg.Connection, handle: BatchHandle, lease_seconds: float) -> bool:
    """Extend our lease; False when the batch was taken over or finished by another run."""
    row = conn.execute(
        """
        UPDATE outbox_batch SET lease_expires_at = now() + make_interval(secs => %s)
        WHERE id = %s AND state = 'claimed' AND claimed_by = %s AND claim_count = %s
        RETURNING split_points
        """,
        (lease_seconds, handle.batch_id, handle.claimed_by, handle.claim_count),
    ).fetchone()
    return row is not None


def release_batches(conn: psycopg.Connection, handles: Sequence[BatchHandle]) -> None:
    """Give claimed batches back at once (a run ran out of time, or their step failed): the next claim takes them."""
    conn.execute(
        "UPDATE outbox_batch b SET lease_expires_at = now() - interval '1 second' "
        "FROM unnest(%s::bigint[], %s::text[], %s::integer[]) AS h(id, claimed_by, claim_count) "
        "WHERE b.id = h.id AND b.state = 'claimed' AND b.claimed_by = h.claimed_by AND b.claim_count = h.claim_count",
        ([h.batch_id for h in handles], [h.claimed_by for h in handles], [h.claim_count for h in handles]),
    )


def current_split_points(conn: psycopg.Connection, handle: BatchHandle) -> tuple[int, ...]:
    row = conn.execute("SELECT split_points FROM outbox_batch WHERE id = %s", (handle.batch_id,)).fetchone()
    return tuple(row[0]) if row else ()


def record_split(conn: psycopg.Connection, handle: BatchHandle, position: int) -> None:
    """Persist a split before inserting its halves, so a retried run inserts the same blocks."""
    conn.execute(
        """
        UPDATE outbox_batch
        SET split_points = (SELECT array_agg(DISTINCT p ORDER BY p) FROM unnest(split_points || %s::integer) AS p)
        WHERE id = %s
        """,
        (position, handle.batch_id),
    )


# -- marking ------------------------------------------------------------------------------


def complete_batch(
    conn: psycopg.Connection,
    handle: BatchHandle,
    rejected: Sequence[RejectedEvent],
    *,
    max_attempts: int,
    retry_base_seconds: float,
) -> bool:
    """Mark a loaded batch done and record its rejected events, in one transaction.

    Returns False (and changes nothing) when another run owns or finished the batch.
    """
    with conn.transaction():
        done = conn.execute(
            """
            UPDATE outbox_batch SET state = 'done', done_at = now(), loaded_rows = row_count - %s, failed_rows = %s
            WHERE id = %s AND state = 'claimed' AND claimed_by = %s AND claim_count = %s
            RETURNING id
            """,
            (len(rejected), len(rejected), handle.batch_id, handle.claimed_by, handle.claim_count),
        ).fetchone()
        if done is None:
            return False
        rejected_ids = [r.outbox_id for r in rejected]
        if handle.kind == "retry":
            conn.execute(
                "DELETE FROM outbox_failure WHERE batch_id = %s AND NOT (outbox_id = ANY(%s))", (handle.batch_id, rejected_ids)
            )
        if rejected:
            conn.cursor().executemany(
                """
                INSERT INTO outbox_failure AS f (outbox_id, relay, event_id, state, attempts, last_error, next_attempt_at)
                VALUES (%(id)s, %(relay)s, %(event_id)s, CASE WHEN 1 >= %(max)s THEN 'failed' ELSE 'retrying' END, 1, %(error)s,
                        now() + make_interval(secs => %(base)s * (0.5 + random())))
                ON CONFLICT (outbox_id, relay) DO UPDATE SET
                    attempts = f.attempts + 1,
                    state = CASE WHEN f.attempts + 1 >= %(max)s THEN 'failed' ELSE 'retrying' END,
                    last_error = EXCLUDED.last_error,
                    updated_at = now(),
                    batch_id = NULL,
                    -- exponential backoff with jitter, capped at one hour
                    next_attempt_at = now() + make_interval(
                        secs => least(3600, %(base)s * power(2, f.attempts)) * (0.5 + random()))
                """,
                [
                    {
                        "id": r.outbox_id, "relay": handle.relay, "event_id": r.event_id, "error": r.error[:4000],
                        "max": max_attempts, "base": retry_base_seconds,
                    }
                    for r in rejected
                ],
            )
    return True


def requeue_failed(
    conn: psycopg.Connection, relay: str, *, event_ids: Sequence[str] = (), event_type: str | None = None, all_failed: bool = False
) -> int:
    """Put the relay's failed events back in line for delivery; returns how many."""
    if not (event_ids or event_type or all_failed):
        return 0
    row = conn.execute(
        """
        WITH requeued AS (
            UPDATE outbox_failure f SET state = 'retrying', attempts = 0, next_attempt_at = now(), updated_at = now(), batch_id = NULL
            FROM outbox o
            WHERE o.id = f.outbox_id AND f.relay = %(relay)s AND f.state = 'failed'
              AND (%(all)s OR f.event_id = ANY(%(ids)s::uuid[]) OR o.event_type = %(type)s)
            RETURNING 1
        ) SELECT count(*) FROM requeued
        """,
        {"relay": relay, "all": all_failed, "ids": list(event_ids), "type": event_type},
    ).fetchone()
    return row[0]
