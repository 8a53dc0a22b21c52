"""Checking and describing the two stores' URLs: the settings validate them once, messages name them without credentials."""

from __future__ import annotations

import urllib.parse

from outbox_pipeline.config.errors import ConfigurationError


def describe_postgres_url(url: str) -> str:
    """host:port/dbname without credentials, for messages."""
    try:
        parsed = urllib.parse.urlsplit(url)
    except ValueError:
        return "<unparseable URL>"
    if parsed.scheme not in ("postgres", "postgresql"):
        return "<not a postgresql:// URL>"
    query = urllib.parse.parse_qs(parsed.query)
    host = parsed.hostname or (query.get("host") or ["localhost"])[0]
    port = parsed.port if _safe_port(parsed) else None
    database = parsed.path.lstrip("/") or "postgres"
    return f"{host}{':' + str(port) if port else ''}/{database}"


def _safe_port(parsed: urllib.parse.SplitResult) -> bool:
    try:
        _ = parsed.port  # raises on a malformed port
    except ValueError:
        return False
    return True


def validate_postgres_url(url: str, variable: str = "OUTBOX_DATABASE_URL") -> None:
    try:
        parsed = urllib.parse.urlsplit(url)
    except ValueError as exc:
        raise ConfigurationError(f"{variable} is not a valid URL ({exc}); expected postgresql://user:password@host:5432/dbname") from None
    if parsed.scheme not in ("postgres", "postgresql"):
        raise ConfigurationError(
            f"{variable} must start with postgresql:// (got {parsed.scheme or 'no scheme'}://); "
            "expected postgresql://user:password@host:5432/dbname"
        )
    if not _safe_port(parsed):
        raise ConfigurationError(f"{variable} has an invalid port; expected postgresql://user:password@host:5432/dbname")


_URL_HELP = "expected http(s)://user:password@host:8123/database or chdb:///absolute/path"


def describe_clickhouse_url(url: str) -> str:
    """The URL without credentials, for messages."""
    try:
        parsed = urllib.parse.urlsplit(url)
    except ValueError:
        return "<unparseable URL>"
    if parsed.scheme == "chdb":
        return f"chdb://{parsed.path}"
    host = parsed.hostname or "?"
    try:
        port = parsed.port
    except ValueError:
        port = None
    return f"{parsed.scheme}://{host}{':' + str(port) if port else ''}{parsed.path}"


def validate_clickhouse_url(url: str) -> None:
    try:
        parsed = urllib.parse.urlsplit(url)
        _ = parsed.port  # raises on a malformed port
    except ValueError as exc:
        raise ConfigurationError(f"CLICKHOUSE_URL is not a valid URL ({exc}); {_URL_HELP}") from None
    if parsed.scheme == "chdb":
        if parsed.netloc or not parsed.path.startswith("/"):
            raise ConfigurationError(
                f"CLICKHOUSE_URL must name an absolute path, as chdb:///absolute/path (got {describe_clickhouse_url(url)})"
            )
        return
    if parsed.scheme not in ("http", "https"):
        raise ConfigurationError(f"CLICKHOUSE_URL must start with http://, https:// or chdb:// (got {parsed.scheme or 'no scheme'}://); {_URL_HELP}")
    if not parsed.hostname:
        raise ConfigurationError(f"CLICKHOUSE_URL has no host; {_URL_HELP}")
