"""Helpers to publish events and run the relay job in tests."""

from __future__ import annotations

import dagster as dg
import psycopg

from outbox_pipeline.definitions import build_resources
from outbox_pipeline.events import RawEvent
from outbox_pipeline_tests.support.default_relay import process_outbox_events
from outbox_pipeline.producer import publish_many


def publish_raw(url: str, count: int, *, event_type: str = "test_event", start: int = 0) -> list[RawEvent]:
    events = [RawEvent(event_type=event_type, context=f'{{"n": {n}}}') for n in range(start, start + count)]
    with psycopg.connect(url) as conn:
        publish_many(conn, events)
    return events


def run_relay(instance: dg.DagsterInstance | None = None, *, run_config: dict | None = None, **overrides):
    """Execute process_outbox_events in process with the project's resources built from the environment."""
    resources = {**build_resources(), **overrides}
    config = {"ops": {"extract_outbox_batches": {"config": run_config}}} if run_config else None
    return process_outbox_events.execute_in_process(
        instance=instance, resources=resources, run_config=config, raise_on_error=False
    )
