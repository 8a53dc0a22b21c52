"""Kept at its old path for applications: the event classes live in ``outbox_pipeline.producer.events``."""

from outbox_pipeline.producer.events import OutboxEvent, RawEvent, outbox_row, outbox_rows

__all__ = ["OutboxEvent", "RawEvent", "outbox_row", "outbox_rows"]
