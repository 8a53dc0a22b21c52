"""The statements producers run: one INSERT per event, or COPY for many (see producer.py)."""

from outbox_pipeline.event_columns import EVENT_COLUMNS

_COLUMNS = ", ".join(EVENT_COLUMNS)

# ``{p}`` is the driver's placeholder (``%s``, ``?``, …), filled in by the producer.
INSERT_EVENT = f"INSERT INTO outbox ({_COLUMNS}) VALUES ({', '.join(['{p}'] * len(EVENT_COLUMNS))})"
COPY_EVENTS_IN = f"COPY outbox ({_COLUMNS}) FROM STDIN"
