"""Publishing events inside the caller's own transaction.

Call :func:`publish` with the connection your business writes use, before you
commit: the event exists if and only if your transaction commits. Works with a
psycopg 3 connection and with any DB-API connection to PostgreSQL (psycopg2,
Django's ``connection``, SQLAlchemy's ``session.connection().connection``).
Nothing here commits or rolls back.

Inside a sampled Sentry transaction each call is one ``queue.publish`` span, and
its trace headers are stored with the events (producer/tracing.py), once the
database has the columns for them: a producer deployed before `outbox-pipeline
init` upgraded the database publishes without them.
"""

from __future__ import annotations

import time
import weakref
from collections.abc import Iterable

from outbox_pipeline.config.settings import producer_settings
from outbox_pipeline.producer import tracing as publish_tracing
from outbox_pipeline.producer.events import OutboxEvent, RawEvent, outbox_rows
from outbox_pipeline.stores.event_columns import DEFAULT_TABLE
from outbox_pipeline.stores.producer_sql import (
    COPY_EVENTS_IN,
    COPY_TRACED_EVENTS_IN,
    INSERT_EVENT,
    INSERT_TRACED_EVENT,
    TRACE_COLUMNS,
    TRACE_COLUMNS_PRESENT,
)

Event = OutboxEvent | RawEvent

# Above this many events a psycopg 3 connection streams them with COPY.
_COPY_THRESHOLD = 200

_PLACEHOLDERS = {"format": "%s", "pyformat": "%s", "qmark": "?", "numeric": ":{n}"}

# Whether a connection's outbox has the trace columns, and when that was seen. Present stays
# present (versions only go forward); missing is looked at again after this long, so producers
# pick the columns up after `init` without a restart.
_RECHECK_MISSING_COLUMNS_SECONDS = 60.0
_trace_columns: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _max_event_bytes() -> int:
    return producer_settings().max_event_bytes


def publish(connection, *events: Event, destination: str = DEFAULT_TABLE) -> int:
    """Insert events in the caller's transaction; returns how many.

    ``destination`` names the queue in Sentry's Queues module (the ``queue.publish``
    span's ``messaging.destination.name``): the ClickHouse table of the relay that
    delivers the events, ``event_log`` unless you name another.
    """
    return publish_many(connection, events, destination=destination)


def publish_many(connection, events: Iterable[Event], *, destination: str = DEFAULT_TABLE) -> int:
    limit = _max_event_bytes()
    # Everything is checked before the first row is sent: a refused call writes nothing.
    rows = outbox_rows(events, max_event_bytes=limit)
    if not rows:
        return 0
    if publish_tracing.current_span() is None:
        _write_rows(connection, rows)
    else:
        with publish_tracing.publish_span(rows, destination) as headers:
            if _has_trace_columns(connection):
                _write_rows(connection, [row + headers for row in rows], traced=True)
            else:
                _write_rows(connection, rows)
    return len(rows)


def _write_rows(connection, rows: list[tuple], *, traced: bool = False) -> None:
    """Insert checked rows (``outbox_rows``, plus the trace headers when ``traced``) on the caller's connection."""
    if _is_psycopg3(connection):
        _insert_psycopg3(connection, rows, traced)
    else:
        _insert_dbapi(connection, rows, traced)


def _is_psycopg3(connection) -> bool:
    try:
        import psycopg
    except ImportError:  # pragma: no cover - psycopg is a dependency
        return False
    return isinstance(connection, psycopg.Connection)


def _insert_psycopg3(connection, rows: list[tuple], traced: bool) -> None:
    with connection.cursor() as cur:
        if len(rows) >= _COPY_THRESHOLD:
            with cur.copy(COPY_TRACED_EVENTS_IN if traced else COPY_EVENTS_IN) as copy:
                for row in rows:
                    copy.write_row(row)
        else:
            cur.executemany((INSERT_TRACED_EVENT if traced else INSERT_EVENT).format(p="%s"), rows)


def _insert_dbapi(connection, rows: list[tuple], traced: bool) -> None:
    insert = INSERT_TRACED_EVENT if traced else INSERT_EVENT
    columns = len(rows[0])
    paramstyle = _paramstyle(connection)
    if paramstyle == "numeric":
        query = insert.replace("{p}", "{}").format(*(f":{n}" for n in range(1, columns + 1)))
    elif paramstyle == "named":
        query = insert.replace("{p}", "{}").format(*(f":p{n}" for n in range(columns)))
        rows = [{f"p{n}": value for n, value in enumerate(row)} for row in rows]
    else:
        query = insert.format(p=_PLACEHOLDERS.get(paramstyle, "%s"))
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


def _has_trace_columns(connection) -> bool:
    """Whether the outbox has the trace columns (schema version 3); asked once per connection.

    A producer of this release may run against a database that `init` has not upgraded
    yet: it then publishes without the headers instead of failing the caller's transaction.
    """
    try:
        known = _trace_columns.get(connection)
    except TypeError:  # a connection object without weak references: ask every time
        known = None
    now = time.monotonic()
    if known is not None and (known[0] or now - known[1] < _RECHECK_MISSING_COLUMNS_SECONDS):
        return known[0]
    present = _count_trace_columns(connection) == len(TRACE_COLUMNS)
    try:
        _trace_columns[connection] = (present, now)
    except TypeError:
        pass
    return present


def _count_trace_columns(connection) -> int:
    if _is_psycopg3(connection):
        return connection.execute(TRACE_COLUMNS_PRESENT).fetchone()[0]
    cursor = connection.cursor()
    try:
        cursor.execute(TRACE_COLUMNS_PRESENT)
        return cursor.fetchone()[0]
    finally:
        cursor.close()
