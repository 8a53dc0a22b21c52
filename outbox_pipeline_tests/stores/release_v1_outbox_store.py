# FROZEN: outbox_pipeline/stores/outbox_store.py exactly as released with schema version 1.
#
# The upgrade tests build a database with this release's schema (``MIGRATION``) and
# run a real relay on it with this store, so that what they upgrade is exactly what a
# deployment of that release leaves behind. Never edit it: a database created by that
# release looks like this forever.

"""Every SQL statement the relay runs against the PostgreSQL outbox.

Design (see README, "Delivery guarantees"):

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
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections.abc import Sequence

import psycopg
from psycopg.rows import dict_row

from outbox_pipeline.stores.postgres_connection import connect_postgres

SCHEMA_VERSION = 1

MIGRATION = """
CREATE TABLE IF NOT EXISTS outbox (
    id                bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    event_id          uuid        NOT NULL,
    event_type        text        NOT NULL,
    event_date_time   timestamptz NOT NULL,
    environment       text        NOT NULL,
    -- text, not jsonb: the payload is kept byte for byte as the producer serialized it
    event_context     text        NOT NULL,
    metadata_version  integer     NOT NULL DEFAULT 1,
    created_at        timestamptz NOT NULL DEFAULT now(),
    -- the writing transaction: the relay's order and completeness horizon
    txid              xid8        NOT NULL DEFAULT pg_current_xact_id(),
    CONSTRAINT outbox_event_id_key UNIQUE (event_id)
);
-- Pending work is found by one index range scan past the relay cursor, however
-- many processed rows the table holds.
CREATE INDEX IF NOT EXISTS outbox_txid_id_idx ON outbox (txid, id);
-- Replays select one day of events.
CREATE INDEX IF NOT EXISTS outbox_event_date_time_idx ON outbox (event_date_time);
-- Retention deletes by age in small batches.
CREATE INDEX IF NOT EXISTS outbox_created_at_idx ON outbox (created_at);
-- Rows are never updated and deleted only by retention: vacuum often enough to
-- keep the retention deletes from piling up dead tuples.
ALTER TABLE outbox SET (autovacuum_vacuum_scale_factor = 0.02, autovacuum_vacuum_insert_scale_factor = 0.05);

CREATE TABLE IF NOT EXISTS outbox_relay_cursor (
    singleton     boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    claimed_txid  xid8    NOT NULL DEFAULT '0',
    claimed_id    bigint  NOT NULL DEFAULT 0,
    -- names this outbox in ClickHouse deduplication tokens, so a recreated outbox
    -- whose batch ids start again at 1 never collides with an older one's tokens
    installation_id uuid NOT NULL DEFAULT gen_random_uuid(),
    updated_at    timestamptz NOT NULL DEFAULT now()
);
INSERT INTO outbox_relay_cursor (singleton) VALUES (true) ON CONFLICT DO NOTHING;

CREATE TABLE IF NOT EXISTS outbox_batch (
    id                 bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    kind               text    NOT NULL CHECK (kind IN ('range', 'retry')),
    -- a range batch holds the outbox rows with (txid, id) between first and last
    first_txid         xid8,
    first_id           bigint,
    last_txid          xid8,
    last_id            bigint,
    row_count          integer NOT NULL,
    oldest_created_at  timestamptz,
    state              text    NOT NULL DEFAULT 'claimed' CHECK (state IN ('claimed', 'done')),
    claimed_by         text    NOT NULL,
    claim_count        integer NOT NULL DEFAULT 1,
    claimed_at         timestamptz NOT NULL DEFAULT now(),
    lease_expires_at   timestamptz NOT NULL,
    -- positions where a rejected block was split; the blocks between them are
    -- what was (or will be) inserted, each under its own deduplication token
    split_points       integer[] NOT NULL DEFAULT '{}',
    loaded_rows        integer,
    failed_rows        integer,
    done_at            timestamptz
);
CREATE INDEX IF NOT EXISTS outbox_batch_open_idx ON outbox_batch (lease_expires_at) WHERE state = 'claimed';
CREATE INDEX IF NOT EXISTS outbox_batch_done_at_idx ON outbox_batch (done_at) WHERE state = 'done';

CREATE TABLE IF NOT EXISTS outbox_failure (
    outbox_id        bigint PRIMARY KEY REFERENCES outbox (id) ON DELETE CASCADE,
    event_id         uuid    NOT NULL,
    state            text    NOT NULL CHECK (state IN ('retrying', 'failed')),
    attempts         integer NOT NULL,
    last_error       text    NOT NULL,
    first_failed_at  timestamptz NOT NULL DEFAULT now(),
    updated_at       timestamptz NOT NULL DEFAULT now(),
    next_attempt_at  timestamptz NOT NULL,
    batch_id         bigint REFERENCES outbox_batch (id) ON DELETE SET NULL
);
CREATE INDEX IF NOT EXISTS outbox_failure_due_idx ON outbox_failure (next_attempt_at) WHERE state = 'retrying';

-- One row per event with its delivery state, for people looking at a single event.
CREATE OR REPLACE VIEW outbox_event_status AS
SELECT o.id, o.event_id, o.event_type, o.event_date_time, o.created_at,
       CASE WHEN f.state IS NOT NULL THEN f.state
            WHEN b.state = 'done' THEN 'processed'
            WHEN b.state = 'claimed' THEN 'in_flight'
            ELSE 'pending' END AS state,
       b.id AS batch_id, b.claimed_by, b.done_at AS processed_at,
       f.attempts, f.last_error, f.next_attempt_at
FROM outbox o
LEFT JOIN outbox_failure f ON f.outbox_id = o.id
LEFT JOIN LATERAL (
    SELECT b.id, b.state, b.claimed_by, b.done_at FROM outbox_batch b
    WHERE b.kind = 'range'
      AND (o.txid, o.id) >= (b.first_txid, b.first_id) AND (o.txid, o.id) <= (b.last_txid, b.last_id)
    LIMIT 1
) b ON true;

CREATE TABLE IF NOT EXISTS outbox_schema_version (
    version     integer PRIMARY KEY,
    applied_at  timestamptz NOT NULL DEFAULT now()
);
INSERT INTO outbox_schema_version (version) VALUES (1) ON CONFLICT DO NOTHING;
"""

# Columns in the order of the ClickHouse event_log insert.
EVENT_COLUMNS = ("event_id", "event_type", "event_date_time", "environment", "event_context", "metadata_version")
_SELECT_EVENT_COLUMNS = "o.event_id, o.event_type, o.event_date_time, o.environment, o.event_context, o.metadata_version"

# FORCE_QUOTE keeps leading/trailing blanks and empty strings exact through ClickHouse's CSV parser.
_COPY_CSV = "TO STDOUT (FORMAT csv, FORCE_QUOTE *)"

INSERT_EVENT = (
    "INSERT INTO outbox (event_id, event_type, event_date_time, environment, event_context, metadata_version) "
    "VALUES ({p}, {p}, {p}, {p}, {p}, {p})"
)
# Rows after the relay cursor whose transactions are all finished (txid below the horizon).
_NEXT_KEYS = """
    SELECT txid, id, created_at FROM outbox
    WHERE (txid, id) > (%(txid)s, %(id)s) AND txid < %(horizon)s
"""

# Producers' commits wake the low-latency relay through this channel.
NOTIFY_CHANNEL = "outbox_pipeline_events"
_COMMIT_NOTIFICATIONS = f"""
CREATE OR REPLACE FUNCTION outbox_notify_commit() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    -- Delivered at commit, once per transaction however many rows it inserted.
    PERFORM pg_notify('{NOTIFY_CHANNEL}', '');
    RETURN NULL;
END $$;
CREATE OR REPLACE TRIGGER outbox_notify_commit AFTER INSERT ON outbox
    FOR EACH STATEMENT EXECUTE FUNCTION outbox_notify_commit();
"""

COPY_EVENTS_IN = "COPY outbox (event_id, event_type, event_date_time, environment, event_context, metadata_version) FROM STDIN"


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

    def deduplication_token(self, start: int, stop: int) -> str:
        """Names rows start:stop of this batch, whose membership never changes."""
        return f"outbox-{self.installation_id}-{self.kind}-{self.batch_id}-{start}-{stop}"


@dataclasses.dataclass(frozen=True)
class RejectedEvent:
    position: int
    outbox_id: int
    event_id: str
    error: str


@dataclasses.dataclass(frozen=True)
class OutboxCounts:
    pending: int
    in_flight: int
    processed: int
    retrying: int
    failed: int
    oldest_pending_age_seconds: float | None


class OutboxStore:
    """The relay's side of the outbox, on one psycopg 3 connection in autocommit mode."""

    def __init__(self, conn: psycopg.Connection, url: str | None = None):
        self.conn = conn
        self.url = url
        self._installation_id: str | None = None

    @classmethod
    def connect(cls, url: str) -> OutboxStore:
        return cls(connect_postgres(url), url)

    def reconnect(self) -> None:
        """Replace a broken connection (server restart, network reset)."""
        if self.url is None:
            raise RuntimeError("this OutboxStore was built on a borrowed connection and cannot reconnect")
        try:
            self.conn.close()
        finally:
            self.conn = connect_postgres(self.url)

    def close(self) -> None:
        self.conn.close()

    @property
    def installation_id(self) -> str:
        if self._installation_id is None:
            self._installation_id = str(self.conn.execute("SELECT installation_id FROM outbox_relay_cursor").fetchone()[0])
        return self._installation_id

    def _handle(self, row) -> BatchHandle | None:
        if row is None:
            return None
        batch_id, kind, row_count, claimed_by, claim_count, split_points, first_txid, first_id, last_txid, last_id = row
        return BatchHandle(
            batch_id, kind, row_count, claimed_by, claim_count, self.installation_id, tuple(split_points or ()),
            (first_txid, first_id) if first_txid is not None else None,
            (last_txid, last_id) if last_txid is not None else None,
        )

    # -- schema -----------------------------------------------------------------------

    def migrate(self) -> None:
        with self.conn.transaction():
            # Serialize concurrent `init`s: CREATE ... IF NOT EXISTS races on the catalog otherwise.
            self.conn.execute("SELECT pg_advisory_xact_lock(7245100101)")
            self.conn.execute(MIGRATION)

    def install_commit_notifications(self) -> None:
        """Make every producer commit NOTIFY the low-latency relay (left off otherwise: it costs producers a little)."""
        with self.conn.transaction():
            self.conn.execute(_COMMIT_NOTIFICATIONS)

    def check_schema(self) -> None:
        """Raise psycopg.errors.UndefinedTable when `init` has not run."""
        self.conn.execute("SELECT 1 FROM outbox_relay_cursor, outbox_batch, outbox_failure LIMIT 0")

    def check_xid_horizon(self) -> str | None:
        """A database restored from a dump can have its transaction counter behind the stored txids.

        New events would then sort before the relay cursor and never be claimed.
        """
        row = self.conn.execute(
            "SELECT c.claimed_txid::text, pg_snapshot_xmax(pg_current_snapshot())::text "
            "FROM outbox_relay_cursor c WHERE c.claimed_txid > pg_snapshot_xmax(pg_current_snapshot())"
        ).fetchone()
        if row:
            return (
                f"the relay cursor (transaction {row[0]}) is ahead of this server's transaction counter ({row[1]}): "
                "the outbox was restored from a dump; see 'Restoring the outbox' in the README"
            )
        return None

    # -- claiming ---------------------------------------------------------------------

    def claim_next_batch(self, *, claimed_by: str, batch_size: int, lease_seconds: float) -> BatchHandle | None:
        """Claim the oldest available work: an expired lease, then due retries, then new events."""
        return (
            self._claim_expired_batch(claimed_by, lease_seconds)
            or self._claim_due_retries(claimed_by, batch_size, lease_seconds)
            or self._claim_next_range(claimed_by, batch_size, lease_seconds)
        )

    def _claim_expired_batch(self, claimed_by: str, lease_seconds: float) -> BatchHandle | None:
        with self.conn.transaction():
            row = self.conn.execute(
                """
                UPDATE outbox_batch SET claimed_by = %(by)s, claim_count = claim_count + 1, claimed_at = now(),
                       lease_expires_at = now() + make_interval(secs => %(lease)s)
                WHERE id = (SELECT id FROM outbox_batch WHERE state = 'claimed' AND lease_expires_at < now()
                            ORDER BY id LIMIT 1 FOR UPDATE SKIP LOCKED)
                RETURNING id, kind, row_count, claimed_by, claim_count, split_points,
                          first_txid::text, first_id, last_txid::text, last_id
                """,
                {"by": claimed_by, "lease": lease_seconds},
            ).fetchone()
        return self._handle(row)

    def _claim_due_retries(self, claimed_by: str, batch_size: int, lease_seconds: float) -> BatchHandle | None:
        with self.conn.transaction():
            due = self.conn.execute(
                """
                SELECT outbox_id FROM outbox_failure
                WHERE state = 'retrying' AND next_attempt_at <= now() AND batch_id IS NULL
                ORDER BY outbox_id LIMIT %s FOR UPDATE SKIP LOCKED
                """,
                (batch_size,),
            ).fetchall()
            if not due:
                return None
            ids = [r[0] for r in due]
            row = self.conn.execute(
                """
                INSERT INTO outbox_batch (kind, row_count, claimed_by, lease_expires_at, oldest_created_at)
                SELECT 'retry', %(n)s, %(by)s, now() + make_interval(secs => %(lease)s), min(created_at)
                FROM outbox WHERE id = ANY(%(ids)s)
                RETURNING id, kind, row_count, claimed_by, claim_count, split_points,
                          first_txid::text, first_id, last_txid::text, last_id
                """,
                {"n": len(ids), "by": claimed_by, "lease": lease_seconds, "ids": ids},
            ).fetchone()
            self.conn.execute("UPDATE outbox_failure SET batch_id = %s WHERE outbox_id = ANY(%s)", (row[0], ids))
        return self._handle(row)

    def _claim_next_range(self, claimed_by: str, batch_size: int, lease_seconds: float) -> BatchHandle | None:
        with self.conn.transaction():
            # First statement of the transaction, before it takes any lock and so
            # gets an xid of its own: every txid below this horizon is final.
            (horizon,) = self.conn.execute("SELECT pg_snapshot_xmin(pg_current_snapshot())").fetchone()
            cursor_txid, cursor_id = self.conn.execute(
                "SELECT claimed_txid, claimed_id FROM outbox_relay_cursor WHERE singleton FOR UPDATE"
            ).fetchone()
            params = {"txid": cursor_txid, "id": cursor_id, "horizon": horizon, "n": batch_size}
            # Index scans only: the first key, then the n-th (or, for a short tail, the last and the count).
            first = self.conn.execute(_NEXT_KEYS + "ORDER BY txid, id LIMIT 1", params).fetchone()
            if first is None:
                return None
            first_txid, first_id, oldest = first
            last = self.conn.execute(_NEXT_KEYS + "ORDER BY txid, id OFFSET %(n)s - 1 LIMIT 1", params).fetchone()
            if last is not None:
                last_txid, last_id, _ = last
                row_count = batch_size
            else:
                last_txid, last_id, _, row_count = self.conn.execute(
                    f"SELECT * FROM ({_NEXT_KEYS}) AS tail, LATERAL (SELECT count(*) FROM ({_NEXT_KEYS}) AS n) AS c "
                    "ORDER BY txid DESC, id DESC LIMIT 1",
                    params,
                ).fetchone()
            row = self.conn.execute(
                """
                INSERT INTO outbox_batch (kind, first_txid, first_id, last_txid, last_id, row_count,
                                          oldest_created_at, claimed_by, lease_expires_at)
                VALUES ('range', %s, %s, %s, %s, %s, %s, %s, now() + make_interval(secs => %s))
                RETURNING id, kind, row_count, claimed_by, claim_count, split_points,
                          first_txid::text, first_id, last_txid::text, last_id
                """,
                (first_txid, first_id, last_txid, last_id, row_count, oldest, claimed_by, lease_seconds),
            ).fetchone()
            self.conn.execute(
                "UPDATE outbox_relay_cursor SET claimed_txid = %s, claimed_id = %s, updated_at = now()",
                (last_txid, last_id),
            )
        return self._handle(row)

    def renew_lease(self, handle: BatchHandle, lease_seconds: float) -> bool:
        """Extend our lease; False when the batch was taken over or finished by another run."""
        row = self.conn.execute(
            """
            UPDATE outbox_batch SET lease_expires_at = now() + make_interval(secs => %s)
            WHERE id = %s AND state = 'claimed' AND claimed_by = %s AND claim_count = %s
            RETURNING split_points
            """,
            (lease_seconds, handle.batch_id, handle.claimed_by, handle.claim_count),
        ).fetchone()
        return row is not None

    def release_batch(self, handle: BatchHandle) -> None:
        """Give a claimed batch back at once (a run ran out of time): the next claim takes it."""
        self.conn.execute(
            "UPDATE outbox_batch SET lease_expires_at = now() - interval '1 second' "
            "WHERE id = %s AND state = 'claimed' AND claimed_by = %s AND claim_count = %s",
            (handle.batch_id, handle.claimed_by, handle.claim_count),
        )

    def current_split_points(self, handle: BatchHandle) -> tuple[int, ...]:
        row = self.conn.execute("SELECT split_points FROM outbox_batch WHERE id = %s", (handle.batch_id,)).fetchone()
        return tuple(row[0]) if row else ()

    def record_split(self, handle: BatchHandle, position: int) -> None:
        """Persist a split before inserting its halves, so a retried run inserts the same blocks."""
        self.conn.execute(
            """
            UPDATE outbox_batch
            SET split_points = (SELECT array_agg(DISTINCT p ORDER BY p) FROM unnest(split_points || %s::integer) AS p)
            WHERE id = %s
            """,
            (position, handle.batch_id),
        )

    # -- reading a batch ----------------------------------------------------------------

    def _batch_rows_query(self, handle: BatchHandle, columns: str, start: int, stop: int) -> tuple[str, tuple]:
        if handle.kind == "range":
            query = f"""
                SELECT {columns} FROM outbox o
                WHERE (o.txid, o.id) >= (%s::xid8, %s) AND (o.txid, o.id) <= (%s::xid8, %s)
                ORDER BY o.txid, o.id OFFSET %s LIMIT %s
            """
            return query, (*handle.first_key, *handle.last_key, start, stop - start)
        else:
            query = f"""
                SELECT {columns} FROM outbox o JOIN outbox_failure f ON f.outbox_id = o.id
                WHERE f.batch_id = %s ORDER BY o.id OFFSET %s LIMIT %s
            """
        return query, (handle.batch_id, start, stop - start)

    def read_block_csv(self, handle: BatchHandle, start: int, stop: int) -> bytearray:
        """Rows ``start:stop`` of the batch as CSV in event_log column order, straight from COPY."""
        query, params = self._batch_rows_query(handle, _SELECT_EVENT_COLUMNS, start, stop)
        buffer = bytearray()
        with self.conn.cursor() as cur, cur.copy(f"COPY ({query}) {_COPY_CSV}", params) as copy:
            for chunk in copy:
                buffer += chunk
        return buffer  # not copied into bytes: a batch can be tens of megabytes

    def read_block_identities(self, handle: BatchHandle, start: int, stop: int) -> list[tuple[int, str]]:
        query, params = self._batch_rows_query(handle, "o.id, o.event_id::text", start, stop)
        return [(r[0], r[1]) for r in self.conn.execute(query, params).fetchall()]

    # -- marking ------------------------------------------------------------------------

    def complete_batch(
        self,
        handle: BatchHandle,
        rejected: Sequence[RejectedEvent],
        *,
        max_attempts: int,
        retry_base_seconds: float,
    ) -> bool:
        """Mark a loaded batch done and record its rejected events, in one transaction.

        Returns False (and changes nothing) when another run owns or finished the batch.
        """
        with self.conn.transaction():
            done = self.conn.execute(
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
                self.conn.execute(
                    "DELETE FROM outbox_failure WHERE batch_id = %s AND NOT (outbox_id = ANY(%s))",
                    (handle.batch_id, rejected_ids),
                )
            if rejected:
                self.conn.cursor().executemany(
                    """
                    INSERT INTO outbox_failure AS f (outbox_id, event_id, state, attempts, last_error, next_attempt_at)
                    VALUES (%(id)s, %(event_id)s, CASE WHEN 1 >= %(max)s THEN 'failed' ELSE 'retrying' END, 1, %(error)s,
                            now() + make_interval(secs => %(base)s * (0.5 + random())))
                    ON CONFLICT (outbox_id) DO UPDATE SET
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
                        {"id": r.outbox_id, "event_id": r.event_id, "error": r.error[:4000], "max": max_attempts, "base": retry_base_seconds}
                        for r in rejected
                    ],
                )
        return True

    def requeue_failed(self, *, event_ids: Sequence[str] = (), event_type: str | None = None, all_failed: bool = False) -> int:
        """Put failed events back in line for delivery; returns how many."""
        if not (event_ids or event_type or all_failed):
            return 0
        row = self.conn.execute(
            """
            WITH requeued AS (
                UPDATE outbox_failure f SET state = 'retrying', attempts = 0, next_attempt_at = now(), updated_at = now(), batch_id = NULL
                FROM outbox o
                WHERE o.id = f.outbox_id AND f.state = 'failed'
                  AND (%(all)s OR f.event_id = ANY(%(ids)s::uuid[]) OR o.event_type = %(type)s)
                RETURNING 1
            ) SELECT count(*) FROM requeued
            """,
            {"all": all_failed, "ids": list(event_ids), "type": event_type},
        ).fetchone()
        return row[0]

    # -- observing ----------------------------------------------------------------------

    def has_pending_work(self) -> bool:
        (pending,) = self.conn.execute(
            """
            SELECT EXISTS (
                       SELECT 1 FROM outbox
                       WHERE (txid, id) > (SELECT claimed_txid, claimed_id FROM outbox_relay_cursor)
                         AND txid < pg_snapshot_xmin(pg_current_snapshot()))
                OR EXISTS (SELECT 1 FROM outbox_batch WHERE state = 'claimed' AND lease_expires_at < now())
                OR EXISTS (SELECT 1 FROM outbox_failure WHERE state = 'retrying' AND next_attempt_at <= now() AND batch_id IS NULL)
            """
        ).fetchone()
        return bool(pending)

    def pending_work_fingerprint(self) -> str:
        """Identifies the work waiting now; it changes whenever work is claimed, finished or added."""
        row = self.conn.execute(
            """
            SELECT c.claimed_txid::text || ':' || c.claimed_id,
                   (SELECT max(id) FROM outbox),
                   (SELECT count(*) FROM outbox_batch WHERE state = 'claimed'),
                   (SELECT max(id) FROM outbox_batch)
            FROM outbox_relay_cursor c
            """
        ).fetchone()
        return "/".join(str(part) for part in row)

    def counts(self, *, include_processed: bool = True) -> OutboxCounts:
        """Pending (waiting, in flight, awaiting a retry), processed and failed events.

        ``include_processed=False`` skips counting the whole table (``processed`` is
        then 0): what a run needs for its queue size.
        """
        row = self.conn.execute(
            """
            WITH cursor AS (SELECT claimed_txid, claimed_id FROM outbox_relay_cursor),
            beyond AS (
                SELECT count(*) AS n,
                       -- the oldest transaction's first row: an index lookup, not a scan
                       (SELECT created_at FROM outbox WHERE (txid, id) > (SELECT claimed_txid, claimed_id FROM cursor)
                        ORDER BY txid, id LIMIT 1) AS oldest
                FROM outbox WHERE (txid, id) > (SELECT claimed_txid, claimed_id FROM cursor)
            ),
            flight AS (
                SELECT coalesce(sum(row_count) FILTER (WHERE kind = 'range'), 0) AS n, min(oldest_created_at) AS oldest
                FROM outbox_batch WHERE state = 'claimed'
            ),
            failures AS (
                SELECT count(*) FILTER (WHERE state = 'retrying') AS retrying,
                       count(*) FILTER (WHERE state = 'failed') AS failed,
                       min(first_failed_at) FILTER (WHERE state = 'retrying') AS oldest
                FROM outbox_failure
            )
            SELECT beyond.n, flight.n, CASE WHEN %s THEN (SELECT count(*) FROM outbox) END AS total,
                   failures.retrying, failures.failed,
                   extract(epoch FROM now() - least(beyond.oldest, flight.oldest, failures.oldest))
            FROM beyond, flight, failures
            """,
            (include_processed,),
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

    # -- replay and retention -------------------------------------------------------------

    def delete_processed_before(self, cutoff: dt.datetime, *, chunk_size: int) -> int:
        """Delete one chunk of processed events created before ``cutoff``; returns how many.

        Processed means at or below the relay cursor, below the oldest batch still
        in flight, and not awaiting a retry. Each chunk is its own short statement.
        """
        cursor_txid, cursor_id = self.conn.execute("SELECT claimed_txid, claimed_id FROM outbox_relay_cursor").fetchone()
        in_flight = self.conn.execute(
            "SELECT first_txid, first_id FROM outbox_batch WHERE state = 'claimed' AND kind = 'range' "
            "ORDER BY first_txid, first_id LIMIT 1"
        ).fetchone()
        limit_txid, limit_id = in_flight if in_flight else (cursor_txid, cursor_id + 1)
        row = self.conn.execute(
            """
            WITH doomed AS (
                SELECT o.id FROM outbox o
                WHERE o.created_at < %(cutoff)s
                  AND (o.txid, o.id) <= (%(cursor_txid)s, %(cursor_id)s)
                  AND (o.txid, o.id) < (%(limit_txid)s, %(limit_id)s)
                  AND NOT EXISTS (SELECT 1 FROM outbox_failure f WHERE f.outbox_id = o.id)
                ORDER BY o.created_at LIMIT %(n)s
            ),
            deleted AS (DELETE FROM outbox WHERE id IN (SELECT id FROM doomed) RETURNING 1)
            SELECT count(*) FROM deleted
            """,
            {"cutoff": cutoff, "n": chunk_size, "cursor_txid": cursor_txid, "cursor_id": cursor_id,
             "limit_txid": limit_txid, "limit_id": limit_id},
        ).fetchone()
        return row[0]

    def delete_finished_batches_before(self, cutoff: dt.datetime, *, chunk_size: int = 10_000) -> int:
        """Delete one chunk of batches finished before ``cutoff``; returns how many."""
        row = self.conn.execute(
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

    def day_outbox_ids(self, day: dt.date) -> list[int]:
        """Outbox ids of one UTC day of event_date_time, in id order (8 bytes per event: a day fits in memory)."""
        return [
            r[0]
            for r in self.conn.execute(
                "SELECT id FROM outbox WHERE event_date_time >= %s::date::timestamptz "
                "AND event_date_time < %s::date::timestamptz ORDER BY id",
                (day, day + dt.timedelta(days=1)),
            ).fetchall()
        ]

    def delivery_states(self, outbox_ids: Sequence[int]) -> list[tuple[int, str, str]]:
        """(id, event_id, state) in id order; state is processed, pending, in_flight, retrying or failed.

        Processed means delivered by the relay, which never loads it again: at or
        below the cursor, in no batch still claimed, and with no failure record.
        One statement, so one consistent snapshot of the relay's bookkeeping.
        """
        return [
            (r[0], r[1], r[2])
            for r in self.conn.execute(
                """
                SELECT o.id, o.event_id::text,
                       CASE WHEN f.state IS NOT NULL THEN f.state
                            WHEN (o.txid, o.id) > (c.claimed_txid, c.claimed_id) THEN 'pending'
                            WHEN EXISTS (
                                SELECT 1 FROM outbox_batch b
                                WHERE b.state = 'claimed' AND b.kind = 'range'
                                  AND (o.txid, o.id) >= (b.first_txid, b.first_id)
                                  AND (o.txid, o.id) <= (b.last_txid, b.last_id)) THEN 'in_flight'
                            ELSE 'processed' END
                FROM outbox o CROSS JOIN outbox_relay_cursor c
                LEFT JOIN outbox_failure f ON f.outbox_id = o.id
                WHERE o.id = ANY(%s) ORDER BY o.id
                """,
                (list(outbox_ids),),
            ).fetchall()
        ]

    def events_csv(self, outbox_ids: Sequence[int]) -> bytes:
        """These events as CSV in event_log column order and id order, straight from COPY."""
        query = f"SELECT {_SELECT_EVENT_COLUMNS} FROM outbox o WHERE o.id = ANY(%s) ORDER BY o.id"
        buffer = bytearray()
        with self.conn.cursor() as cur, cur.copy(f"COPY ({query}) {_COPY_CSV}", (list(outbox_ids),)) as copy:
            for chunk in copy:
                buffer += chunk
        return bytes(buffer)

    def table_statistics(self) -> dict:
        with self.conn.cursor(row_factory=dict_row) as cur:
            return cur.execute(
                """
                SELECT pg_total_relation_size('outbox') AS total_bytes,
                       pg_relation_size('outbox') AS heap_bytes,
                       pg_indexes_size('outbox') AS index_bytes,
                       s.n_live_tup AS live_tuples, s.n_dead_tup AS dead_tuples
                FROM pg_stat_user_tables s WHERE s.relname = 'outbox'
                """
            ).fetchone()

