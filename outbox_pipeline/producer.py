"""Publishing events inside the caller's own transaction.

Call :func:`publish` with the connection your business writes use, before you
commit: the event exists if and only if your transaction commits. Works with a
psycopg 3 connection and with any DB-API connection to PostgreSQL (psycopg2,
Django's ``connection``, SQLAlchemy's ``session.connection().connection``).
Nothing here commits or rolls back.
"""

from __future__ import annotations

from collections.abc import Iterable

from outbox_pipeline.settings import producer_settings
from outbox_pipeline.events import OutboxEvent, RawEvent, outbox_rows
from outbox_pipeline.stores.outbox_store import COPY_EVENTS_IN, INSERT_EVENT

Event = OutboxEvent | RawEvent

# Above this many events a psycopg 3 connection streams them with COPY.
_COPY_THRESHOLD = 200

_PLACEHOLDERS = {"format": "%s", "pyformat": "%s", "qmark": "?", "numeric": ":{n}"}


def _max_event_bytes() -> int:
    return producer_settings().max_event_bytes


def publish(connection, *events: Event) -> int:
    """Insert events in the caller's transaction; returns how many."""
    return publish_many(connection, events)


def publish_many(connection, events: Iterable[Event]) -> int:
    limit = _max_event_bytes()
    # Everything is checked before the first row is sent: a refused call writes nothing.
    rows = outbox_rows(events, max_event_bytes=limit)
    if not rows:
        return 0
    if _is_psycopg3(connection):
        _insert_psycopg3(connection, rows)
    else:
        _insert_dbapi(connection, rows)
    return len(rows)


def _is_psycopg3(connection) -> bool:
    try:
        import psycopg
    except ImportError:  # pragma: no cover - psycopg is a dependency
        return False
    return isinstance(connection, psycopg.Connection)


def _insert_psycopg3(connection, rows: list[tuple]) -> None:
    with connection.cursor() as cur:
        if len(rows) >= _COPY_THRESHOLD:
            with cur.copy(COPY_EVENTS_IN) as copy:
                for row in rows:
                    copy.write_row(row)
        else:
            cur.executemany(INSERT_EVENT.format(p="%s"), rows)


def _insert_dbapi(connection, rows: list[tuple]) -> None:
    paramstyle = _paramstyle(connection)
    if paramstyle == "numeric":
        query = INSERT_EVENT.replace("{p}", "{}").format(*(f":{n}" for n in range(1, 7)))
    elif paramstyle == "named":
        query = INSERT_EVENT.replace("{p}", "{}").format(*(f":p{n}" for n in range(6)))
        rows = [{f"p{n}": value for n, value in enumerate(row)} for row in rows]
    else:
        query = INSERT_EVENT.format(p=_PLACEHOLDERS.get(paramstyle, "%s"))
    # DB-API drivers differ on uuid.UUID; text converts in PostgreSQL either way.
    rows = [(str(row[0]), *row[1:]) for row in rows] if not isinstance(rows[0], dict) else rows
    cursor = connection.cursor()
    try:
        cursor.executemany(query, rows)
    finally:
        cursor.close()


def _paramstyle(connection) -> str:
    module = type(connection).__module__.split(".")[0]
    try:
        return getattr(__import__(module), "paramstyle", "format")
    except ImportError:
        return "format"
