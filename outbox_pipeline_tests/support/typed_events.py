"""The demo's event classes published and counted for the typed-table tests."""

from __future__ import annotations

import collections
import dataclasses
import datetime as dt
import decimal

import psycopg

from outbox_pipeline.producer.demo_events import sample_events
from outbox_pipeline.producer.event_registry import load_event_classes
from outbox_pipeline.producer.publishing import publish_many
from outbox_pipeline.stores.event_log_store import EventLogStore

DEMO_CLASSES = load_event_classes(["outbox_pipeline.producer.demo_events"])
TYPED_TABLES = ("order_paid", "order_shipped", "payment_refunded", "user_created")


@dataclasses.dataclass
class Published:
    per_type: dict[str, int]
    order_paid_amount: decimal.Decimal
    event_ids: list[str]


def publish_demo(url: str, count: int, *, seed: int = 7, day: dt.date | None = None) -> Published:
    """``count`` demo events (on ``day``, UTC, if given), published through the producer API."""
    events = list(sample_events(count, seed=seed))
    if day is not None:
        start = dt.datetime.combine(day, dt.time(0, 0, 1), tzinfo=dt.UTC)
        events = [event.model_copy(update={"event_date_time": start + dt.timedelta(seconds=11 * n)}) for n, event in enumerate(events)]
    with psycopg.connect(url) as conn:
        publish_many(conn, events)
    return Published(
        per_type=dict(collections.Counter(type(event).event_type for event in events)),
        order_paid_amount=sum((event.amount for event in events if type(event).event_type == "order_paid"), decimal.Decimal(0)),
        event_ids=[str(event.event_id) for event in events],
    )


def typed_store(url: str) -> EventLogStore:
    return EventLogStore.connect(url, busy_wait_seconds=30, event_classes=DEMO_CLASSES)


def typed_counts(url: str) -> dict[str, tuple[int, int]]:
    """(count(), uniqExact(event_id)) of each demo typed table, read without FINAL."""
    store = typed_store(url)
    try:
        return {
            table: tuple(int(v) for v in store.client.query(f"SELECT count(), uniqExact(event_id) FROM {table}").result_rows[0])
            for table in TYPED_TABLES
        }
    finally:
        store.close()


def expected_counts(published: Published) -> dict[str, tuple[int, int]]:
    return {table: (published.per_type.get(table, 0), published.per_type.get(table, 0)) for table in TYPED_TABLES}


def csv_of(events) -> bytes:
    """Events as the outbox hands them to ClickHouse (CSV in event_log column order)."""
    import csv
    import io

    from outbox_pipeline.producer.events import outbox_row

    buffer = io.StringIO()
    writer = csv.writer(buffer)
    for event_id, event_type, when, environment, context, version in map(outbox_row, events):
        writer.writerow([event_id, event_type, when.strftime("%Y-%m-%d %H:%M:%S.%f+00"), environment, context, version])
    return buffer.getvalue().encode()
