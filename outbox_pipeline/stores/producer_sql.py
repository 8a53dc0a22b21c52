"""The statements producers run: one INSERT per event, or COPY for many (see producer.py)."""

from outbox_pipeline.stores.event_columns import EVENT_COLUMNS

# Written only by a publish inside a traced Sentry transaction (schema version 3).
TRACE_COLUMNS = ("sentry_trace", "sentry_baggage")


def _insert(columns: tuple[str, ...]) -> str:
    # ``{p}`` is the driver's placeholder (``%s``, ``?``, …), filled in by the producer.
    return f"INSERT INTO outbox ({', '.join(columns)}) VALUES ({', '.join(['{p}'] * len(columns))})"


INSERT_EVENT = _insert(EVENT_COLUMNS)
COPY_EVENTS_IN = f"COPY outbox ({', '.join(EVENT_COLUMNS)}) FROM STDIN"
INSERT_TRACED_EVENT = _insert(EVENT_COLUMNS + TRACE_COLUMNS)
COPY_TRACED_EVENTS_IN = f"COPY outbox ({', '.join(EVENT_COLUMNS + TRACE_COLUMNS)}) FROM STDIN"

# Whether the outbox the connection sees (by its search_path, as the INSERT does) has the trace columns:
# a producer may be deployed before `outbox-pipeline init` has upgraded the database. No parameters,
# so it runs unchanged on every driver's placeholder style.
TRACE_COLUMNS_PRESENT = (
    "SELECT count(*) FROM pg_attribute WHERE attrelid = to_regclass('outbox') AND NOT attisdropped "
    f"AND attname IN ({', '.join(repr(column) for column in TRACE_COLUMNS)})"
)
