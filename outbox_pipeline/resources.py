"""Dagster resources for the two stores.

Connections open lazily, on first use inside a run (and are closed at its end),
never at import: the webserver, the daemon and the code server all import the
definitions, and only a run worker may open the embedded ClickHouse directory.
"""

import contextlib
from collections.abc import Iterator
from pathlib import Path

import dagster as dg
from pydantic import PrivateAttr

from outbox_pipeline.prefetch import BatchPrefetcher
from outbox_pipeline.stores.clickhouse_connection import chdb_path
from outbox_pipeline.stores.event_log_store import EventLogStore
from outbox_pipeline.stores.outbox_store import OutboxStore
from outbox_pipeline.stores.postgres_connection import embedded_postgres_url, validate_postgres_url


class OutboxDatabaseResource(dg.ConfigurableResource):
    """The PostgreSQL database holding the outbox; without a URL, the embedded server under ``state_dir``."""

    url: str | None = None
    state_dir: str = ".outbox_state"

    _store: OutboxStore | None = PrivateAttr(default=None)
    _prefetcher: BatchPrefetcher | None = PrivateAttr(default=None)

    def resolved_url(self) -> str:
        if self.url:
            validate_postgres_url(self.url)
            return self.url
        return embedded_postgres_url(Path(self.state_dir) / "postgres")

    def store(self) -> OutboxStore:
        """The run's connection, opened on first use."""
        if self._store is None:
            self._store = OutboxStore.connect(self.resolved_url())
        return self._store

    def prefetcher(self) -> BatchPrefetcher:
        """Reads the run's next batch on a second connection while the current one is loaded."""
        if self._prefetcher is None:
            self._prefetcher = BatchPrefetcher(self.resolved_url())
        return self._prefetcher

    @contextlib.contextmanager
    def short_lived_store(self) -> Iterator[OutboxStore]:
        """A connection for one sensor tick or command, closed afterwards."""
        store = OutboxStore.connect(self.resolved_url())
        try:
            yield store
        finally:
            store.close()

    def teardown_after_execution(self, context: dg.InitResourceContext) -> None:
        if self._prefetcher is not None:
            self._prefetcher.close()
            self._prefetcher = None
        if self._store is not None:
            self._store.close()
            self._store = None


class ClickHouseResource(dg.ConfigurableResource):
    """ClickHouse from one URL: ``http(s)://user:password@host:port/db`` or ``chdb:///absolute/path``."""

    url: str
    # A run that finds the embedded directory held (say by `outbox-pipeline status`) waits this long.
    busy_wait_seconds: float = 30.0

    _store: EventLogStore | None = PrivateAttr(default=None)

    @property
    def is_embedded(self) -> bool:
        return chdb_path(self.url) is not None

    def store(self) -> EventLogStore:
        if self._store is None:
            self._store = EventLogStore.connect(self.url, busy_wait_seconds=self.busy_wait_seconds)
        return self._store

    def teardown_after_execution(self, context: dg.InitResourceContext) -> None:
        if self._store is not None:
            self._store.close()
            self._store = None
