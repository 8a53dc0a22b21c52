"""Helpers to publish events and run the relay job in tests."""

from __future__ import annotations

import dagster as dg
import psycopg

from outbox_pipeline.definitions import build_resources
from outbox_pipeline.producer import publish_many
from outbox_pipeline.producer.events import RawEvent
from outbox_pipeline_tests.support.default_relay import process_outbox_events


def publish_raw(url: str, count: int, *, event_type: str = "test_event", start: int = 0) -> list[RawEvent]:
    events = [RawEvent(event_type=event_type, context=f'{{"n": {n}}}') for n in range(start, start + count)]
    with psycopg.connect(url) as conn:
        publish_many(conn, events)
    return events


def run_relay(
    instance: dg.DagsterInstance | None = None, *, run_config: dict | None = None, follow: dict | None = None, **overrides
):
    """Execute process_outbox_events in process with the project's resources built from the environment.

    ``run_config`` configures the backlog (extract_outbox_batches), ``follow`` the following of the stream.
    """
    resources = {**build_resources(), **overrides}
    ops = {}
    if run_config:
        ops["extract_outbox_batches"] = {"config": run_config}
    if follow:
        ops["follow_outbox"] = {"config": follow}
    return process_outbox_events.execute_in_process(
        instance=instance, resources=resources, run_config={"ops": ops} if ops else None, raise_on_error=False
    )
