"""Errors the relay raises on purpose, each with a one-line message that says what to do."""

from __future__ import annotations


def one_line(error: BaseException | str, limit: int | None = None) -> str:
    """The message on one line (whitespace collapsed), the exception's type name if it has none; cut at ``limit``."""
    text = " ".join(str(error).split()) or (type(error).__name__ if isinstance(error, BaseException) else "")
    return text[:limit] if limit else text


class OutboxPipelineError(Exception):
    """Base class: ``str(error)`` is a complete, user-facing, one-line message."""


class ConfigurationError(OutboxPipelineError, ValueError):
    """A setting or URL is missing or malformed."""


class StoreUnavailableError(OutboxPipelineError):
    """A store cannot be reached or refused us; retrying later may succeed."""


class SchemaMissingError(OutboxPipelineError):
    """The tables do not exist yet: ``outbox-pipeline init`` creates them."""


class SchemaOutdatedError(SchemaMissingError):
    """The tables are at another schema version than this release needs: ``outbox-pipeline init`` upgrades them."""


class StoreBusyError(OutboxPipelineError):
    """The embedded ClickHouse directory is held by another process."""


class EventRejectedError(OutboxPipelineError, ValueError):
    """The producer API refuses an event that could never be loaded."""


class RetriesExhaustedError(StoreUnavailableError):
    """A transient error persisted through every retry attempt."""


class LeaseLostError(OutboxPipelineError):
    """Another run took the batch over: this one stops sending it (never retried)."""
