"""The relay's side of the PostgreSQL outbox: one connection, one relay, every statement it needs.

The SQL lives by responsibility in the modules beside this one; this facade holds
the connection and the relay's identity, and makes sure (once per connection,
before the relay's first statement) that the schema is at this release's version
and the relay is registered:

* ``migrations``: schema versions, ``init``, the optional commit notifications;
* ``batches``: claim, lease, read, split and mark a relay's batches;
* ``reporting``: pending work, counts, table statistics;
* ``replay_retention``: delivery states for replays, retention deletes;
* ``partitions``: the daily partitions, made ahead and dropped once delivered;
* ``producer_sql``: the producers' INSERT and COPY.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator, Sequence

import psycopg

from outbox_pipeline.stores import batch_reads, batches, migrations, partitions, replay_retention, reporting
from outbox_pipeline.stores.batches import BatchHandle, RejectedEvent
from outbox_pipeline.stores.migrations import NOTIFY_CHANNEL
from outbox_pipeline.stores.postgres_connection import connect_postgres, describe_postgres_url
from outbox_pipeline.stores.producer_sql import COPY_EVENTS_IN, INSERT_EVENT
from outbox_pipeline.stores.relay_identity import DEFAULT_RELAY, RelayIdentity
from outbox_pipeline.stores.reporting import OutboxCounts
from outbox_pipeline.stores.trace_sample import TracedEvent, read_trace_sample

# Importable from here as before the split (producer.py, ops, tests).
__all__ = [
    "COPY_EVENTS_IN", "INSERT_EVENT", "NOTIFY_CHANNEL", "BatchHandle", "OutboxCounts", "OutboxStore", "RejectedEvent",
    "TracedEvent",
]


class OutboxStore:
    """One relay's view of the outbox, on one psycopg 3 connection in autocommit mode."""

    def __init__(self, conn: psycopg.Connection, url: str | None = None, *, relay: RelayIdentity = DEFAULT_RELAY):
        self.conn = conn
        self.url = url
        self.relay = relay
        self._installation_id: str | None = None
        self._ready = False

    @classmethod
    def connect(cls, url: str, *, relay: RelayIdentity = DEFAULT_RELAY) -> OutboxStore:
        return cls(connect_postgres(url), url, relay=relay)

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

    def _where(self) -> str:
        return describe_postgres_url(self.url) if self.url else "this database"

    def _relay_conn(self) -> psycopg.Connection:
        """The connection, once the schema is known current and the relay registered."""
        if not self._ready:
            migrations.check_version(self.conn, self._where())
            self._register()
            self._ready = True
        return self.conn

    def _register(self) -> None:
        # A new relay's cursor starts before the oldest event; a changed filter applies from the cursor on.
        self.conn.execute(
            """
            INSERT INTO outbox_relay_cursor AS c (relay, event_types, event_type_patterns) VALUES (%s, %s, %s)
            ON CONFLICT (relay) DO UPDATE SET event_types = EXCLUDED.event_types,
                event_type_patterns = EXCLUDED.event_type_patterns, updated_at = now()
            WHERE c.event_types IS DISTINCT FROM EXCLUDED.event_types
            """,
            (self.relay.name, list(self.relay.event_types), list(self.relay.like_patterns)),
        )

    @property
    def installation_id(self) -> str:
        if self._installation_id is None:
            conn = self._relay_conn()
            self._installation_id = str(conn.execute("SELECT installation_id FROM outbox_installation").fetchone()[0])
        return self._installation_id

    # -- schema -----------------------------------------------------------------------------

    def migrate(self) -> list[int]:
        """Apply the missing schema versions (see migrations.py); returns those applied now."""
        self._ready = False
        applied = migrations.apply_migrations(self.conn)
        self.create_partitions()
        return applied

    def install_commit_notifications(self) -> None:
        """Make every producer commit NOTIFY the low-latency relay (left off otherwise: it costs producers a little)."""
        migrations.install_commit_notifications(self.conn)

    def check_schema(self) -> None:
        """Raise SchemaMissingError (or SchemaOutdatedError) unless `init` has brought the schema to this release."""
        self._relay_conn()

    def check_xid_horizon(self) -> str | None:
        return reporting.check_xid_horizon(self._relay_conn())

    # -- claim, lease, read, mark -------------------------------------------------------------

    def claim_next_batch(self, *, claimed_by: str, batch_size: int, lease_seconds: float) -> BatchHandle | None:
        installation_id = self.installation_id
        return batches.claim_next_batch(
            self._relay_conn(), self.relay.name, installation_id,
            claimed_by=claimed_by, batch_size=batch_size, lease_seconds=lease_seconds,
        )

    def renew_lease(self, handle: BatchHandle, lease_seconds: float) -> bool:
        return batches.renew_lease(self.conn, handle, lease_seconds)

    def release_batches(self, handles: Sequence[BatchHandle]) -> None:
        batches.release_batches(self.conn, handles)

    def current_split_points(self, handle: BatchHandle) -> tuple[int, ...]:
        return batches.current_split_points(self.conn, handle)

    def record_split(self, handle: BatchHandle, position: int) -> None:
        batches.record_split(self.conn, handle, position)

    def read_block_csv(self, handle: BatchHandle, start: int, stop: int) -> bytearray:
        return batch_reads.read_block_csv(self.conn, handle, start, stop)

    def stream_block_csv(self, handle: BatchHandle, start: int, stop: int, without: Sequence[int] = ()) -> Iterator[bytes]:
        return batch_reads.stream_block_csv(self.conn, handle, start, stop, without)

    def read_block_keys(self, handle: BatchHandle, start: int, stop: int) -> list[tuple[int, str, dt.datetime]]:
        return batch_reads.read_block_keys(self.conn, handle, start, stop)

    def read_block_identities(self, handle: BatchHandle, start: int, stop: int) -> list[tuple[int, str]]:
        return batch_reads.read_block_identities(self.conn, handle, start, stop)

    def complete_batch(
        self, handle: BatchHandle, rejected: Sequence[RejectedEvent], *, max_attempts: int, retry_base_seconds: float
    ) -> bool:
        return batches.complete_batch(self.conn, handle, rejected, max_attempts=max_attempts, retry_base_seconds=retry_base_seconds)

    def read_trace_sample(
        self,
        handle: BatchHandle,
        *,
        rejected_outbox_ids: Sequence[int],
        sample_size: int,
        examined_rows: int,
        retried_limit: int,
    ) -> list[TracedEvent]:
        """The traced events of a loaded batch whose traces are continued (before it is marked: retry counts)."""
        return read_trace_sample(
            self.conn, handle, rejected_outbox_ids=rejected_outbox_ids, sample_size=sample_size,
            examined_rows=examined_rows, retried_limit=retried_limit,
        )

    def requeue_failed(self, *, event_ids: Sequence[str] = (), event_type: str | None = None, all_failed: bool = False) -> int:
        return batches.requeue_failed(
            self._relay_conn(), self.relay.name, event_ids=event_ids, event_type=event_type, all_failed=all_failed
        )

    # -- observing ------------------------------------------------------------------------------

    def has_pending_work(self) -> bool:
        return reporting.has_pending_work(self._relay_conn(), self.relay)

    def pending_work_fingerprint(self) -> str:
        return reporting.pending_work_fingerprint(self._relay_conn(), self.relay)

    def counts(self, *, include_processed: bool = True) -> OutboxCounts:
        return reporting.counts(self._relay_conn(), self.relay, include_processed=include_processed)

    def table_statistics(self) -> dict:
        return reporting.table_statistics(self.conn)

    # -- replay and retention ---------------------------------------------------------------------

    def delete_processed_before(self, cutoff: dt.datetime, *, chunk_size: int) -> int:
        """Every relay's view, whichever relay's store deletes: see replay_retention.py."""
        return replay_retention.delete_processed_before(self._relay_conn(), cutoff, chunk_size=chunk_size)

    def create_partitions(self, days_ahead: int = partitions.DAYS_AHEAD) -> int:
        """Make the daily partitions of today to ``days_ahead`` days ahead (UTC) that are missing; returns how many."""
        today = dt.datetime.now(dt.UTC).date()
        return partitions.create_partitions(self.conn, today, today + dt.timedelta(days=days_ahead))

    def drop_delivered_partitions(self, older_than: dt.datetime) -> list[partitions.PartitionOutcome]:
        """Every relay's view, like delete_processed_before: see partitions.py."""
        return partitions.drop_delivered_partitions(self._relay_conn(), older_than)

    def list_partitions(self) -> list[partitions.Partition]:
        return partitions.list_partitions(self.conn)

    def default_partition_holds_events(self) -> bool:
        return partitions.default_partition_holds_events(self._relay_conn())

    def delete_finished_batches_before(self, cutoff: dt.datetime, *, chunk_size: int = 10_000) -> int:
        return replay_retention.delete_finished_batches_before(self._relay_conn(), cutoff, chunk_size=chunk_size)

    def retire_relay(self, name: str) -> bool:
        """Forget relay ``name`` and its bookkeeping, so retention no longer waits for it."""
        retired = replay_retention.retire_relay(self._relay_conn(), name)
        if name == self.relay.name:
            self._ready = False  # registered again (from the start) on its next use
        return retired

    def day_outbox_ids(self, day: dt.date) -> list[int]:
        return replay_retention.day_outbox_ids(self._relay_conn(), self.relay, day)

    def delivery_states(self, outbox_ids: Sequence[int]) -> list[tuple[int, str, str]]:
        return replay_retention.delivery_states(self._relay_conn(), self.relay, outbox_ids)

    def delivered_per_day(self, since: dt.date, days: Sequence[dt.date] | None = None) -> dict[dt.date, int]:
        return replay_retention.delivered_per_day(self._relay_conn(), self.relay, since, days)

    def days_delivered_since(self, since: dt.datetime) -> list[dt.date]:
        return replay_retention.days_delivered_since(self._relay_conn(), self.relay, since)

    def events_csv(self, outbox_ids: Sequence[int]) -> bytes:
        return replay_retention.events_csv(self.conn, outbox_ids)
