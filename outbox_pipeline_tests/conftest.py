"""Shared fixtures: a real PostgreSQL server and the real ClickHouse engine (chDB).

PostgreSQL is the server named by OUTBOX_TEST_DATABASE_URL when set, otherwise an
embedded PostgreSQL started once per test session. Every test gets a database of
its own on it. ClickHouse is chDB in the test's temporary directory.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import urllib.parse
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from outbox_pipeline.stores.event_log_store import EventLogStore
from outbox_pipeline.stores.outbox_store import OutboxStore
from outbox_pipeline.stores.postgres_connection import embedded_postgres_url

pytest_plugins = ["outbox_pipeline_tests.support.sentry_fixtures", "outbox_pipeline_tests.monitoring.envelopes", "outbox_pipeline_tests.support.django_app", "outbox_pipeline_tests.support.alone"]


def with_database(url: str, database: str) -> str:
    parts = urllib.parse.urlsplit(url)
    return urllib.parse.urlunsplit(parts._replace(path=f"/{database}"))


@pytest.fixture(scope="session")
def postgres_server_url() -> str:
    """URL of a database on the test server, used to create one database per test."""
    configured = os.environ.get("OUTBOX_TEST_DATABASE_URL")
    if configured:
        return configured
    # Not under pytest's own temporary root: pytest keeps that at mode 0700, and the
    # embedded server runs as its own system user when the tests run as root.
    return embedded_postgres_url(Path(tempfile.mkdtemp(prefix="outbox-test-postgres-")), delete_on_exit=True)


@contextlib.contextmanager
def new_database(server_url: str, prefix: str = "outbox_test", *, migrated: bool = False) -> Iterator[str]:
    """A database of its own on the test server (with the outbox schema when ``migrated``), dropped afterwards."""
    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(server_url, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    url = with_database(server_url, name)
    try:
        if migrated:
            store = OutboxStore.connect(url)
            store.migrate()
            store.close()
        yield url
    finally:
        with psycopg.connect(server_url, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def outbox_database_url(postgres_server_url: str) -> str:
    with new_database(postgres_server_url) as url:
        yield url


@pytest.fixture
def clickhouse_url(tmp_path: Path) -> str:
    return f"chdb://{tmp_path / 'clickhouse'}"


def relay_environment(outbox_database_url: str, clickhouse_url: str, state_dir: Path) -> dict[str, str]:
    """Variables of a relay on the test stores, Sentry off.

    Relay runs end with their backlog (OUTBOX_FOLLOW_SECONDS=0): a test of following a
    stream sets its own limits in the run config.
    """
    return {
        "OUTBOX_DATABASE_URL": outbox_database_url,
        "CLICKHOUSE_URL": clickhouse_url,
        "OUTBOX_STATE_DIR": str(state_dir),
        "OUTBOX_RETRY_BASE_SECONDS": "0.01",
        "OUTBOX_FOLLOW_SECONDS": "0",
        "SENTRY_CONFIG_DSN": "",
        "DEBUG": "",
    }


def prepare_relay(monkeypatch, outbox_database_url: str, clickhouse_url: str, state_dir: Path) -> dict[str, str]:
    """Set the relay's environment in this process and apply the migrations of both stores."""
    env = relay_environment(outbox_database_url, clickhouse_url, state_dir)
    for key, value in env.items():
        if value:
            monkeypatch.setenv(key, value)
        else:
            monkeypatch.delenv(key, raising=False)
    store = OutboxStore.connect(outbox_database_url)
    store.migrate()
    store.close()
    with event_log_store(clickhouse_url) as event_log:
        event_log.migrate()
    return env


@pytest.fixture
def relay_env(monkeypatch, tmp_path, outbox_database_url, clickhouse_url) -> dict[str, str]:
    """Environment of a relay on the test stores, with migrations applied."""
    return prepare_relay(monkeypatch, outbox_database_url, clickhouse_url, tmp_path / "state")


class event_log_store:
    """``with event_log_store(url) as store``: opens ClickHouse and closes it (releasing chDB)."""

    def __init__(self, url: str):
        self.url = url

    def __enter__(self) -> EventLogStore:
        self.store = EventLogStore.connect(self.url, busy_wait_seconds=30)
        return self.store

    def __exit__(self, *exc) -> None:
        self.store.close()


@pytest.fixture
def outbox(relay_env) -> OutboxStore:
    store = OutboxStore.connect(relay_env["OUTBOX_DATABASE_URL"])
    yield store
    store.close()
