"""The outbox schema's versions and how a database is brought to the latest one.

The schema lives in numbered files shipped with the package,
``outbox_pipeline/sql/0001_….sql``, ``0002_….sql``, …; a file never changes once
released. ``outbox_schema_version`` records the versions a database has. Applying
the missing ones (``outbox-pipeline init``):

* holds a session-level advisory lock for the whole upgrade, so two ``init`` at
  once take turns and the second finds nothing left to do;
* runs each file in its own transaction together with recording its version, so
  an interrupted upgrade stops between versions, never inside one;
* runs a file again, after a pause, when it gave up waiting for a lock (a file that
  needs an exclusive lock on the outbox sets a short ``lock_timeout``, so producers
  never queue behind it for long), and stops with one line after many tries.

Relays check the version before their first statement and refuse to work on a
database that is behind (or ahead of) this release.
"""

from __future__ import annotations

import re
import time
from importlib import resources

import psycopg

from outbox_pipeline.config.errors import SchemaMissingError, SchemaOutdatedError, StoreUnavailableError

# The key `init` has always locked, so an older release's `init` and this one take turns too.
ADVISORY_LOCK_KEY = 7245100101
_FILE_NAME = re.compile(r"(\d{4})_[a-z0-9_]+\.sql")
# A version that gave up waiting for a lock is tried again this often, this long apart (about a minute).
LOCK_ATTEMPTS = 60
LOCK_RETRY_PAUSE_SECONDS = 1.0


def migration_files() -> list[tuple[int, str, str]]:
    """(version, file name, SQL) of every shipped migration, in version order."""
    found = []
    for entry in (resources.files("outbox_pipeline") / "sql").iterdir():
        match = _FILE_NAME.fullmatch(entry.name)
        if match:
            found.append((int(match.group(1)), entry.name, entry.read_text(encoding="utf-8")))
    found.sort()
    if [version for version, _, _ in found] != list(range(1, len(found) + 1)):
        names = [name for _, name, _ in found]
        raise RuntimeError(f"outbox_pipeline/sql holds migrations {names}: versions must run 1, 2, 3, … without gaps")
    return found


LATEST_VERSION = len(migration_files())


def applied_versions(conn: psycopg.Connection) -> list[int]:
    """Versions recorded in this database; empty when the schema was never created."""
    (exists,) = conn.execute("SELECT to_regclass('outbox_schema_version') IS NOT NULL").fetchone()
    if not exists:
        return []
    return [row[0] for row in conn.execute("SELECT version FROM outbox_schema_version ORDER BY version").fetchall()]


def apply_migrations(conn: psycopg.Connection, *, up_to: int | None = None) -> list[int]:
    """Bring the database to LATEST_VERSION (or ``up_to``); returns the versions applied now (empty if none was missing)."""
    conn.execute("SELECT pg_advisory_lock(%s)", (ADVISORY_LOCK_KEY,))
    try:
        done = set(applied_versions(conn))  # read under the lock: another `init` may just have finished
        applied = []
        for version, name, sql in migration_files():
            if version in done or (up_to is not None and version > up_to):
                continue
            _apply(conn, version, name, sql)
            applied.append(version)
        return applied
    finally:
        conn.execute("SELECT pg_advisory_unlock(%s)", (ADVISORY_LOCK_KEY,))


def _apply(conn: psycopg.Connection, version: int, name: str, sql: str) -> None:
    for attempt in range(1, LOCK_ATTEMPTS + 1):
        try:
            with conn.transaction():
                conn.execute(sql)
                conn.execute("INSERT INTO outbox_schema_version (version) VALUES (%s) ON CONFLICT DO NOTHING", (version,))
            return
        except psycopg.errors.LockNotAvailable:
            # Rolled back whole: nothing of this version is left behind. Producers ran on meanwhile.
            if attempt == LOCK_ATTEMPTS:
                raise StoreUnavailableError(
                    f"upgrading the outbox to schema version {version} ({name}) needs a brief lock on the outbox table, "
                    f"and transactions that hold it kept it for {LOCK_ATTEMPTS} tries in a row; nothing of version {version} "
                    "was applied: find them with `SELECT pid, xact_start, state, query FROM pg_stat_activity "
                    "WHERE xact_start IS NOT NULL ORDER BY xact_start` and run `outbox-pipeline init` again"
                ) from None
            time.sleep(LOCK_RETRY_PAUSE_SECONDS)


# Every table the numbered migrations create (the partitions go with outbox).
SCHEMA_TABLES = (
    "outbox", "outbox_batch", "outbox_failure", "outbox_relay_cursor", "outbox_installation", "outbox_schema_version",
    "outbox_partitioning",
)


def drop_outbox_schema(conn: psycopg.Connection) -> None:
    """Remove the outbox schema with every event in it (benches and tests start over with it)."""
    with conn.transaction():
        conn.execute(f"DROP TABLE IF EXISTS {', '.join(SCHEMA_TABLES)} CASCADE")
        conn.execute("DROP FUNCTION IF EXISTS outbox_create_partitions(date, date), outbox_drop_delivered_partitions(timestamptz)")


def check_version(conn: psycopg.Connection, where: str) -> None:
    """Raise SchemaMissingError or SchemaOutdatedError unless the database is at LATEST_VERSION."""
    versions = applied_versions(conn)
    if not versions:
        raise SchemaMissingError(f"the outbox tables do not exist in {where}: run `outbox-pipeline init` first")
    current = versions[-1]
    if current < LATEST_VERSION:
        raise SchemaOutdatedError(
            f"the outbox database is at schema version {current} but this release of outbox_pipeline needs version "
            f"{LATEST_VERSION}: run `outbox-pipeline init` to upgrade it"
        )
    if current > LATEST_VERSION:
        raise SchemaOutdatedError(
            f"the outbox database is at schema version {current}, newer than this release of outbox_pipeline knows "
            f"({LATEST_VERSION}): upgrade outbox_pipeline"
        )


# Producers' commits wake the low-latency relay through this channel. Not a numbered
# migration: it costs every producer commit a little, so only the low-latency mode installs it.
NOTIFY_CHANNEL = "outbox_pipeline_events"
COMMIT_NOTIFICATIONS = f"""
CREATE OR REPLACE FUNCTION outbox_notify_commit() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    -- Delivered at commit, once per transaction however many rows it inserted.
    PERFORM pg_notify('{NOTIFY_CHANNEL}', '');
    RETURN NULL;
END $$;
CREATE OR REPLACE TRIGGER outbox_notify_commit AFTER INSERT ON outbox
    FOR EACH STATEMENT EXECUTE FUNCTION outbox_notify_commit();
"""


def install_commit_notifications(conn: psycopg.Connection) -> None:
    # Once installed (by the owner, say), a relay role without DDL rights finds it there.
    installed = conn.execute(
        "SELECT 1 FROM pg_trigger WHERE tgname = 'outbox_notify_commit' AND tgrelid = to_regclass('outbox')"
    ).fetchone()
    if installed:
        return
    with conn.transaction():
        conn.execute(COMMIT_NOTIFICATIONS)
