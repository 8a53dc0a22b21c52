"""Typed domain events.

Subclass :class:`OutboxEvent` and declare the payload fields::

    class UserCreated(OutboxEvent):
        user_id: int
        email: str

``UserCreated(user_id=1, email="a@example.com").event_type == "user_created"`` and its
context is the JSON of the payload fields, serialized once and stored byte for byte.
"""

from __future__ import annotations

import datetime as dt
import os
import re
import uuid
from typing import ClassVar

import pydantic

from outbox_pipeline.errors import EventRejectedError

# ClickHouse DateTime64(6) holds 1900-01-01 to 2299-12-31; anything outside would be rejected at load time.
EARLIEST_EVENT_TIME = dt.datetime(1900, 1, 1, tzinfo=dt.timezone.utc)
LATEST_EVENT_TIME = dt.datetime(2299, 12, 31, 23, 59, 59, 999999, tzinfo=dt.timezone.utc)
DEFAULT_MAX_EVENT_BYTES = 1_048_576

_BASE_FIELDS = {"event_id", "event_date_time", "environment", "metadata_version"}


def snake_case(name: str) -> str:
    """``UserCreated`` -> ``user_created``, ``HTTPRequestFailed`` -> ``http_request_failed``."""
    name = re.sub(r"([A-Z]+)([A-Z][a-z])", r"\1_\2", name)
    name = re.sub(r"([a-z0-9])([A-Z])", r"\1_\2", name)
    return name.lower()


def default_environment() -> str:
    return os.environ.get("OUTBOX_ENVIRONMENT") or os.environ.get("SENTRY_CONFIG_ENVIRONMENT") or "development"


def _utc_now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


class OutboxEvent(pydantic.BaseModel):
    """Base class of every event; subclasses add the payload fields."""

    model_config = pydantic.ConfigDict(frozen=True, extra="forbid")

    # Override to keep a stable name when a class is renamed.
    event_type: ClassVar[str] = ""

    event_id: uuid.UUID = pydantic.Field(default_factory=uuid.uuid4)
    event_date_time: dt.datetime = pydantic.Field(default_factory=_utc_now)
    environment: str = pydantic.Field(default_factory=default_environment)
    metadata_version: int = 1

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if not cls.__dict__.get("event_type"):
            cls.event_type = snake_case(cls.__name__)

    @pydantic.field_validator("event_date_time")
    @classmethod
    def _aware_utc(cls, value: dt.datetime) -> dt.datetime:
        if value.tzinfo is None:
            raise ValueError("event_date_time must be timezone-aware (use datetime.now(timezone.utc))")
        return value.astimezone(dt.timezone.utc)

    def event_context(self) -> str:
        """The payload as JSON: every field except the envelope fields."""
        return self.model_dump_json(exclude=_BASE_FIELDS)


class RawEvent(pydantic.BaseModel):
    """An event whose type and serialized context are given as they are (imports, replays, tests)."""

    model_config = pydantic.ConfigDict(frozen=True, extra="forbid")

    event_type: str
    context: str
    event_id: uuid.UUID = pydantic.Field(default_factory=uuid.uuid4)
    event_date_time: dt.datetime = pydantic.Field(default_factory=_utc_now)
    environment: str = pydantic.Field(default_factory=default_environment)
    metadata_version: int = 1

    def event_context(self) -> str:
        return self.context


def outbox_row(event: OutboxEvent | RawEvent, *, max_event_bytes: int = DEFAULT_MAX_EVENT_BYTES) -> tuple:
    """The row to insert, after refusing what ClickHouse could never load."""
    event_type = type(event).event_type if isinstance(event, OutboxEvent) else event.event_type
    if not event_type:
        raise EventRejectedError("event_type is empty: name the event class or set event_type")
    context = event.event_context()
    try:
        size = len(context.encode("utf-8"))
    except UnicodeEncodeError as exc:
        raise EventRejectedError(f"{event_type} {event.event_id}: event_context is not valid UTF-8 ({exc.reason})") from None
    if size > max_event_bytes:
        raise EventRejectedError(
            f"{event_type} {event.event_id}: event_context is {size} bytes, over the limit of {max_event_bytes} "
            "(OUTBOX_MAX_EVENT_BYTES); store large payloads elsewhere and reference them"
        )
    if "\x00" in context:
        raise EventRejectedError(f"{event_type} {event.event_id}: event_context contains a NUL character, which PostgreSQL text cannot store")
    when = event.event_date_time
    if when.tzinfo is None:
        raise EventRejectedError(f"{event_type} {event.event_id}: event_date_time must be timezone-aware")
    if not EARLIEST_EVENT_TIME <= when <= LATEST_EVENT_TIME:
        raise EventRejectedError(
            f"{event_type} {event.event_id}: event_date_time {when.isoformat()} is outside ClickHouse's range (1900-01-01 to 2299-12-31)"
        )
    if not 0 <= event.metadata_version <= 4_294_967_295:
        raise EventRejectedError(f"{event_type} {event.event_id}: metadata_version must fit in UInt32")
    return (event.event_id, event_type, when, event.environment, context, event.metadata_version)
