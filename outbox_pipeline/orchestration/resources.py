"""Dagster resources of one relay: its outbox (with the relay's identity and settings) and its ClickHouse table.

Connections open lazily, on first use inside a run (and are closed at its end),
never at import: the webserver, the daemon and the code server all import the
definitions, and only a run worker may open the embedded ClickHouse directory.
The resources carry everything ops need, so ops never read the environment.
"""

import contextlib
import threading
from collections.abc import Iterator
from pathlib import Path

import dagster as dg
from pydantic import Field, PrivateAttr

from outbox_pipeline.producer.event_registry import load_event_classes
from outbox_pipeline.relay.delivery import RelayPolicy
from outbox_pipeline.relay.prefetch import BatchPrefetcher
from outbox_pipeline.relay.retrying import BackoffPolicy
from outbox_pipeline.stores.clickhouse_connection import chdb_directory_wanted, chdb_path
from outbox_pipeline.stores.event_log_store import EventLogStore
from outbox_pipeline.stores.outbox_store import OutboxStore
from outbox_pipeline.stores.postgres_connection import embedded_postgres_url, validate_postgres_url
from outbox_pipeline.stores.relay_identity import RelayIdentity


class OutboxDatabaseResource(dg.ConfigurableResource):
    """The PostgreSQL outbox as one relay sees it; without a URL, the embedded server under ``state_dir``."""

    url: str | None = Field(default=None, description="postgresql:// URL; unset: the embedded server.")
    state_dir: str = ".outbox_state"
    relay_name: str = Field(default="default", description="The relay whose bookkeeping (cursor, batches, failures) this is.")
    event_types: list[str] = Field(default=[], description="Event-type patterns this relay takes; empty: all.")
    batch_size: int = 100_000
    max_batches_per_run: int = 50
    batches_per_step: int = 10
    max_seconds_per_run: float = 300.0
    lease_seconds: float = 300.0
    retry_attempts: int = 5
    retry_base_seconds: float = 0.5
    max_event_attempts: int = 5
    event_retry_base_seconds: float = 30.0
    retention_days: int = 3
    follow_seconds: float = Field(default=1200.0, description="How long a run keeps relaying new events after its backlog.")
    follow_quiet_seconds: float = 60.0
    follow_interval_seconds: float = 2.0
    materialization_window_seconds: float = 300.0
    freshness_max_lag_seconds: float = 300.0

    _store: OutboxStore | None = PrivateAttr(default=None)
    _prefetcher: BatchPrefetcher | None = PrivateAttr(default=None)

    def resolved_url(self) -> str:
        if self.url:
            validate_postgres_url(self.url)
            return self.url
        return embedded_postgres_url(Path(self.state_dir) / "postgres")

    @property
    def described_url(self) -> str:
        return self.url or f"embedded PostgreSQL in {self.state_dir}"

    @property
    def retry(self) -> BackoffPolicy:
        return BackoffPolicy(self.retry_attempts, self.retry_base_seconds)

    def policy(self, batch_size: int | None = None) -> RelayPolicy:
        return RelayPolicy(
            batch_size=batch_size or self.batch_size,
            lease_seconds=self.lease_seconds,
            max_event_attempts=self.max_event_attempts,
            event_retry_base_seconds=self.event_retry_base_seconds,
            retry=self.retry,
        )

    @property
    def relay(self) -> RelayIdentity:
        return RelayIdentity(name=self.relay_name, event_types=tuple(self.event_types))

    def store(self) -> OutboxStore:
        """The run's connection, opened on first use."""
        if self._store is None:
            self._store = OutboxStore.connect(self.resolved_url(), relay=self.relay)
        return self._store

    def prefetcher(self, *, embedded_clickhouse: bool = False) -> BatchPrefetcher:
        """Reads the run's next batches on a second connection while the current one is loaded.

        ``embedded_clickhouse``: the run inserts into chDB (see ``BatchPrefetcher``); the first call of a run decides.
        """
        if self._prefetcher is None:
            self._prefetcher = BatchPrefetcher(self.resolved_url(), embedded_clickhouse=embedded_clickhouse)
        return self._prefetcher

    @contextlib.contextmanager
    def short_lived_store(self) -> Iterator[OutboxStore]:
        """A connection for one sensor tick or command, closed afterwards."""
        store = OutboxStore.connect(self.resolved_url(), relay=self.relay)
        try:
            yield store
        finally:
            store.close()

    def close(self) -> None:
        """Close the run's connections; ``store()`` opens a fresh one (a fleet member starting again after a failure)."""
        if self._prefetcher is not None:
            self._prefetcher.close()
            self._prefetcher = None
        if self._store is not None:
            self._store.close()
            self._store = None

    def teardown_after_execution(self, context: dg.InitResourceContext) -> None:
        self.close()


class ClickHouseResource(dg.ConfigurableResource):
    """ClickHouse from one URL: ``http(s)://user:password@host:port/db`` or ``chdb:///absolute/path``."""

    url: str
    table: str = Field(default="event_log", description="The destination table.")
    asset_key: list[str] = Field(default=["event_log"], description="The Dagster asset that stands for the table.")
    event_classes: list[str] = Field(default=[], description="Registered event classes (module or module:Class): their typed tables.")
    # A run that finds the embedded directory held (say by `outbox-pipeline status`) waits this long.
    busy_wait_seconds: float = 30.0

    _store: EventLogStore | None = PrivateAttr(default=None)
    # The run's steps and the thread that inserts batches ahead share one connection, opened once.
    _lock: threading.Lock = PrivateAttr(default_factory=threading.Lock)

    @property
    def asset(self) -> dg.AssetKey:
        return dg.AssetKey(self.asset_key)

    @property
    def is_embedded(self) -> bool:
        return chdb_path(self.url) is not None

    def store(self, busy_wait_seconds: float | None = None) -> EventLogStore:
        """The run's connection, opened on first use (waiting ``busy_wait_seconds`` for a busy chDB directory)."""
        with self._lock:
            if self._store is None:
                self._store = self._connect(self.busy_wait_seconds if busy_wait_seconds is None else busy_wait_seconds)
            return self._store

    def _connect(self, busy_wait_seconds: float) -> EventLogStore:
        classes = load_event_classes(self.event_classes)
        store = EventLogStore.connect(self.url, table=self.table, busy_wait_seconds=busy_wait_seconds, event_classes=classes)
        # A relay added as a component brings its own table: created here if missing (IF NOT EXISTS, so a
        # table created by hand, such as a replicated one on a cluster, is left as it is). The typed tables
        # follow the classes: created, or evolved, or the run stops with what to do (typed_tables.py).
        try:
            store.migrate()
        except Exception:
            store.close()
            raise
        return store

    @property
    def wanted_elsewhere(self) -> bool:
        """Another process waits for the embedded ClickHouse directory this run holds."""
        return self._store is not None and chdb_directory_wanted(self.url)

    def release(self) -> None:
        """Close the connection (for chDB: let go of the directory); ``store()`` opens it again."""
        with self._lock:
            if self._store is not None:
                self._store.close()
                self._store = None

    def teardown_after_execution(self, context: dg.InitResourceContext) -> None:
        self.release()


class RunHistoryResource(dg.ConfigurableResource):
    """Which of Dagster's own records belong to one relay, and how long they are kept (see run_history.py)."""

    job_names: list[str] = Field(description="The relay's frequent jobs, whose old runs are deleted.")
    asset_key: list[str] = Field(default=["event_log"], description="The asset whose hourly rollups are recorded.")
    run_retention_hours: float = Field(default=24.0, description="Successful runs are deleted after this (OUTBOX_RUN_RETENTION_HOURS).")
    failed_run_retention_days: float = Field(
        default=30.0, description="Failed and canceled runs are deleted after this (OUTBOX_FAILED_RUN_RETENTION_DAYS)."
    )

    @property
    def asset(self) -> dg.AssetKey:
        return dg.AssetKey(self.asset_key)
