"""Helpers for the operations tests: events on given days, poison events, simulated ClickHouse loss."""

from __future__ import annotations

import datetime as dt

import dagster as dg
import psycopg

from outbox_pipeline.definitions import build_resources
from outbox_pipeline.producer import publish_many
from outbox_pipeline.producer.events import RawEvent
from outbox_pipeline.stores.event_log_store import EventLogStore
from outbox_pipeline_tests.support.default_relay import cleanup_outbox, replay_outbox_events


def utc_today() -> dt.date:
    return dt.datetime.now(dt.UTC).date()


def publish_on(url: str, day: dt.date, count: int, *, event_type: str = "replayed_event") -> list[RawEvent]:
    """Events whose event_date_time falls on ``day`` (UTC), each with its own payload."""
    start = dt.datetime.combine(day, dt.time(0, 0, 1), tzinfo=dt.UTC)
    events = [
        RawEvent(
            event_type=event_type,
            context=f'{{"n": {n}, "text": "ünïcødé, \\"quoted\\", {day.isoformat()}"}}',
            event_date_time=start + dt.timedelta(seconds=17 * n, microseconds=n),
        )
        for n in range(count)
    ]
    with psycopg.connect(url) as conn:
        publish_many(conn, events)
    return events


def publish_poison(url: str, day: dt.date) -> None:
    """An event ClickHouse rejects (a negative UInt32), written as a broken producer would, bypassing the API."""
    with psycopg.connect(url) as conn:
        conn.execute(
            "INSERT INTO outbox (event_id, event_type, event_date_time, environment, event_context, metadata_version) "
            "VALUES (gen_random_uuid(), 'poison', %s, 'test', '{}', -1)",
            (dt.datetime.combine(day, dt.time(12), tzinfo=dt.UTC),),
        )


def lose_rows(event_log: EventLogStore, event_ids: list[str]) -> None:
    """Simulate data lost on the ClickHouse side (a dropped part, an older backup restored)."""
    ids = ",".join(f"'{event_id}'" for event_id in event_ids)
    event_log.client.command(f"DELETE FROM event_log WHERE event_id IN ({ids})")


def run_replay(day: dt.date | str, instance: dg.DagsterInstance | None = None, **config):
    run_config = {"ops": {"replay_outbox_day": {"config": config}}} if config else None
    return replay_outbox_events.execute_in_process(
        instance=instance,
        resources=build_resources(),
        partition_key=day if isinstance(day, str) else day.isoformat(),
        run_config=run_config,
        raise_on_error=False,
    )


def run_cleanup(instance: dg.DagsterInstance | None = None, **config):
    run_config = {"ops": {"delete_old_outbox_events": {"config": config}}} if config else None
    return cleanup_outbox.execute_in_process(
        instance=instance, resources=build_resources(), run_config=run_config, raise_on_error=False
    )


def step_failure_message(result) -> str:
    [failure] = [event for event in result.all_events if event.event_type_value == "STEP_FAILURE"]
    return failure.step_failure_data.error.message
