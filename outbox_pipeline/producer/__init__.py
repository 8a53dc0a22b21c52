"""What applications import: event classes, ``publish``/``publish_many`` and their tracing.

May import ``config`` and ``stores``; never Dagster, so a web application pays only for
pydantic and psycopg.
"""

from outbox_pipeline.producer.events import OutboxEvent, RawEvent
from outbox_pipeline.producer.publishing import publish, publish_many

__all__ = ["OutboxEvent", "RawEvent", "publish", "publish_many"]
