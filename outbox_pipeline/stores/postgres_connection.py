"""Connections to the outbox database, embedded or real, with one-line errors."""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import psycopg

from outbox_pipeline.config.errors import ConfigurationError, SchemaMissingError, StoreUnavailableError, one_line
from outbox_pipeline.config.settings import RelaySettings
from outbox_pipeline.config.urls import describe_postgres_url, validate_postgres_url

# Re-exported: the embedded server's URL is one of the ways to the outbox database.
from outbox_pipeline.stores.embedded_postgres import embedded_postgres_url, running_embedded_postgres_url

_CONNECT_TIMEOUT_SECONDS = 10


def resolve_outbox_database_url(settings: RelaySettings, *, start_embedded: bool = True) -> str:
    """OUTBOX_DATABASE_URL, else the embedded server's URL: started if need be, or only if running."""
    if settings.outbox_database_url:
        validate_postgres_url(settings.outbox_database_url)
        return settings.outbox_database_url
    data_dir = settings.embedded_postgres_dir
    if start_embedded:
        return embedded_postgres_url(data_dir)
    url = running_embedded_postgres_url(data_dir)
    if url is None:
        raise StoreUnavailableError(
            f"the embedded PostgreSQL server in {data_dir} is not running: "
            "start it with `outbox-pipeline start` (scripts/dev starts it too)"
        )
    return url


def translate_postgres_error(exc: BaseException, url: str) -> Exception:
    """Turn a psycopg error into one of ours with a one-line message that says what to do."""
    where = describe_postgres_url(url)
    text = one_line(exc)
    lowered = text.lower()
    if isinstance(exc, psycopg.errors.UndefinedTable):
        return SchemaMissingError(f"the outbox tables do not exist in {where}: run `outbox-pipeline init` first")
    if "password authentication failed" in lowered or "authentication failed" in lowered:
        return StoreUnavailableError(f"PostgreSQL at {where} rejected the credentials: check the user and password in OUTBOX_DATABASE_URL")
    if "does not exist" in lowered and "database" in lowered:
        return StoreUnavailableError(f"PostgreSQL at {where}: {text}; create the database or fix OUTBOX_DATABASE_URL")
    if isinstance(exc, psycopg.ProgrammingError) and ("invalid" in lowered or "missing" in lowered):
        return ConfigurationError(f"OUTBOX_DATABASE_URL is not a valid PostgreSQL URL ({text}); expected postgresql://user:password@host:5432/dbname")
    if isinstance(exc, psycopg.OperationalError):
        reason = _short_reason(lowered, text)
        return StoreUnavailableError(f"cannot reach PostgreSQL at {where} ({reason}): is the server running and OUTBOX_DATABASE_URL right?")
    return exc if isinstance(exc, Exception) else RuntimeError(text)


def _short_reason(lowered: str, text: str) -> str:
    for needle, reason in (
        ("connection refused", "connection refused"),
        ("timeout", "timed out"),
        ("could not translate host name", "unknown host"),
        ("name or service not known", "unknown host"),
        ("no such file or directory", "no server socket"),
        ("server closed the connection", "server closed the connection"),
        ("terminating connection", "server terminated the connection"),
    ):
        if needle in lowered:
            return reason
    return text[:200]


# The settings that shape the text of timestamps and payloads are the relay's, not the database's or the
# role's defaults: psycopg reads timestamps only in ISO style, and COPY's text is what ClickHouse reads
# (client_encoding LATIN1 would hand it Latin-1 bytes as the payload).
_SESSION_OPTIONS = "-c TimeZone=UTC -c DateStyle=ISO -c client_encoding=UTF8"


def connect_postgres(url: str, *, autocommit: bool = True, application_name: str = "outbox_pipeline") -> psycopg.Connection:
    """Open a psycopg 3 connection (UTC, ISO dates, UTF-8), translating failures into one-line errors."""
    try:
        return psycopg.connect(
            url,
            autocommit=autocommit,
            connect_timeout=_CONNECT_TIMEOUT_SECONDS,
            application_name=application_name,
            options=_SESSION_OPTIONS,
        )
    except psycopg.Error as exc:
        raise translate_postgres_error(exc, url) from None


@contextlib.contextmanager
def postgres_errors_translated(url: str | Callable[[], str]):
    """Re-raise psycopg errors raised inside the block as our one-line errors.

    ``url`` may be a function, called only when an error is raised (once the URL is known).
    """
    try:
        yield
    except psycopg.Error as exc:
        translated = translate_postgres_error(exc, url() if callable(url) else url)
        if translated is exc:
            raise
        raise translated from exc

