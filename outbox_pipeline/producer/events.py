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
import re
import uuid
from collections.abc import Iterable
from typing import ClassVar

import pydantic
import pydantic_core

from outbox_pipeline.config.errors import EventRejectedError
from outbox_pipeline.config.settings import producer_settings

# ClickHouse DateTime64(6) holds 1900-01-01 to 2299-12-31; anything outside would be rejected at load time.
EARLIEST_EVENT_TIME = dt.datetime(1900, 1, 1, tzinfo=dt.UTC)
LATEST_EVENT_TIME = dt.datetime(2299, 12, 31, 23, 59, 59, 999999, tzinfo=dt.UTC)
DEFAULT_MAX_EVENT_BYTES = 1_048_576

_BASE_FIELDS = {"event_id", "event_date_time", "environment", "metadata_version"}


def snake_case(name: str) -> str:
    """``UserCreated`` -> ``user_created``, ``HTTPRequestFailed`` -> ``http_request_failed``."""
    name = re.sub(r"([A-Z]+)([A-Z][a-z])", r"\1_\2", name)
    name = re.sub(r"([a-z0-9])([A-Z])", r"\1_\2", name)
    return name.lower()


def default_environment() -> str:
    return producer_settings().environment


def _utc_now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


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
        return value.astimezone(dt.UTC)

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


# PostgreSQL `integer` (the outbox column) is the narrower of the two columns; ClickHouse holds UInt32.
MAX_METADATA_VERSION = 2**31 - 1


def outbox_rows(events: Iterable[OutboxEvent | RawEvent], *, max_event_bytes: int = DEFAULT_MAX_EVENT_BYTES) -> list[tuple]:
    """The rows of one publish call, every field of every event checked before any is written.

    Raises :class:`EventRejectedError` for the first event that PostgreSQL could not store or
    ClickHouse could never load, so a refused call sends nothing to the database and leaves the
    caller's transaction as it was.
    """
    rows = []
    first_index: dict[uuid.UUID, int] = {}
    for index, event in enumerate(events):
        row = outbox_row(event, max_event_bytes=max_event_bytes, index=index)
        earlier = first_index.setdefault(row[0], index)
        if earlier != index:
            # The unique constraint would abort the caller's transaction half way through the call.
            raise _rejected(index, event, row[1], "event_id", f"is also the event_id of the event at index {earlier} of this call")
        rows.append(row)
    return rows


def outbox_row(event: OutboxEvent | RawEvent, *, max_event_bytes: int = DEFAULT_MAX_EVENT_BYTES, index: int = 0) -> tuple:
    """The row to insert for one event (``index``: its position in the call, for the message)."""
    if not isinstance(event, (OutboxEvent, RawEvent)):
        raise EventRejectedError(f"event at index {index} is a {type(event).__name__}, not an OutboxEvent or RawEvent")
    event_type = type(event).event_type if isinstance(event, OutboxEvent) else event.event_type

    def reject(field: str, problem: str) -> EventRejectedError:
        return _rejected(index, event, event_type, field, problem)

    if isinstance(event_type, str) and not event_type:
        raise reject("event_type", "is empty: name the event class or set event_type")
    for field, value in (("event_type", event_type), ("environment", event.environment)):
        problem = _text_problem(value)
        if problem:
            raise reject(field, problem)

    context = _serialized_context(event, reject)
    try:
        size = len(context.encode("utf-8"))
    except UnicodeEncodeError as exc:
        raise reject("event_context", f"is not valid UTF-8 ({exc.reason})") from None
    if size > max_event_bytes:
        raise reject(
            "event_context",
            f"is {size} bytes, over the limit of {max_event_bytes} (OUTBOX_MAX_EVENT_BYTES); store large payloads elsewhere and reference them",
        )
    if "\x00" in context:
        raise reject("event_context", _NUL_PROBLEM)

    when = event.event_date_time
    if not isinstance(when, dt.datetime) or when.tzinfo is None:
        raise reject("event_date_time", "must be a timezone-aware datetime (use datetime.now(timezone.utc))")
    if not EARLIEST_EVENT_TIME <= when <= LATEST_EVENT_TIME:
        raise reject("event_date_time", f"{when.isoformat()} is outside ClickHouse's range (1900-01-01 to 2299-12-31)")

    version = event.metadata_version
    if isinstance(version, bool) or not isinstance(version, int) or not 0 <= version <= MAX_METADATA_VERSION:
        raise reject("metadata_version", f"{version!r} is outside 0 to {MAX_METADATA_VERSION} (a PostgreSQL integer)")
    return (event.event_id, event_type, when, event.environment, context, version)


_NUL_PROBLEM = "contains a NUL character, which PostgreSQL text cannot store"


def _rejected(index: int, event: OutboxEvent | RawEvent, event_type: object, field: str, problem: str) -> EventRejectedError:
    # repr() keeps a NUL, a lone surrogate or a line break in the type readable on one line.
    return EventRejectedError(f"event at index {index} (type {event_type!r}, event_id {event.event_id}): {field} {problem}")


def _text_problem(value: object) -> str | None:
    """Why a text column could not store ``value``, or None."""
    if not isinstance(value, str):
        return f"is a {type(value).__name__}, not text"
    if "\x00" in value:
        return _NUL_PROBLEM
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        return f"is not valid UTF-8 ({exc.reason})"
    return None


def _serialized_context(event: OutboxEvent | RawEvent, reject) -> str:
    try:
        context = event.event_context()
    except pydantic_core.PydanticSerializationError as exc:
        # Name the payload field that fails (a lone surrogate in a str field, say).
        payload_fields = [name for name in type(event).model_fields if name not in _BASE_FIELDS]
        failing = next((name for name in payload_fields if not _serializes(event, name)), None)
        where = f" (field {failing!r})" if failing else ""
        reason = " ".join(str(exc).split()).removeprefix("Error serializing to JSON: ")
        raise reject("event_context", f"cannot be serialized to JSON{where}: {reason}") from None
    if not isinstance(context, str):
        raise reject("event_context", f"is a {type(context).__name__}, not text")
    return context


def _serializes(event: pydantic.BaseModel, name: str) -> bool:
    try:
        event.model_dump_json(include={name})
    except pydantic_core.PydanticSerializationError:
        return False
    return True
