"""Connections to ClickHouse from one URL, and what its errors mean to the relay.

``CLICKHOUSE_URL`` is ``http(s)://user:password@host:port/database`` for a server or
``chdb:///absolute/path`` for the embedded engine (chDB). Only one process can
open a chDB directory, so we hold an advisory lock beside it while a client is
open: a second process gets a one-line "busy" error instead of chDB's own.
"""

from __future__ import annotations

import contextlib
import enum
import fcntl
import os
import threading
import time
import urllib.parse
from pathlib import Path

from outbox_pipeline.config.errors import ConfigurationError, StoreBusyError, StoreUnavailableError, one_line
from outbox_pipeline.config.urls import describe_clickhouse_url, validate_clickhouse_url


def chdb_path(url: str) -> Path | None:
    parsed = urllib.parse.urlsplit(url)
    return Path(parsed.path) if parsed.scheme == "chdb" else None


# A waiting process touches this file beside the directory; a relay run that follows a
# stream (and so would hold the directory for many minutes) lets go when it sees it.
_WANTED_FRESH_SECONDS = 5.0


def _wanted_marker(directory: Path) -> Path:
    return directory.with_name(directory.name + ".wanted")


def chdb_directory_wanted(url: str) -> bool:
    """Whether another process is waiting for the embedded ClickHouse directory of ``url`` right now."""
    directory = chdb_path(url)
    if directory is None:
        return False
    try:
        return time.time() - _wanted_marker(directory.resolve()).stat().st_mtime < _WANTED_FRESH_SECONDS
    except OSError:
        return False


class _ChdbDirectoryLock:
    """A process-wide, reference-counted flock on ``<dir>.lock``.

    flock conflicts between two open files even inside one process, so every
    client of this process shares one lock file descriptor. While it waits, a
    process keeps ``<dir>.wanted`` fresh, so a long-running holder that looks for it
    (a following relay run) releases the directory between two loads.
    """

    _lock = threading.Lock()
    _held: dict[Path, tuple[int, int]] = {}

    @classmethod
    def acquire(cls, directory: Path, wait_seconds: float) -> None:
        directory = directory.resolve()
        with cls._lock:
            if directory in cls._held:
                fd, count = cls._held[directory]
                cls._held[directory] = (fd, count + 1)
                return
            directory.parent.mkdir(parents=True, exist_ok=True)
            lock_path = directory.with_name(directory.name + ".lock")
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
            deadline = time.monotonic() + wait_seconds
            wanted = _wanted_marker(directory)
            waited = False
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() >= deadline:
                        if waited:
                            wanted.unlink(missing_ok=True)
                        holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
                        os.close(fd)
                        raise StoreBusyError(
                            f"the embedded ClickHouse directory {directory} is in use by another process (pid {holder}); "
                            "only one process can open it: wait for the running relay to finish, or stop `dagster dev` first"
                        ) from None
                    wanted.touch()
                    waited = True
                    time.sleep(0.1)
            if waited:
                wanted.unlink(missing_ok=True)
            os.ftruncate(fd, 0)
            os.pwrite(fd, str(os.getpid()).encode(), 0)
            cls._held[directory] = (fd, 1)

    @classmethod
    def release(cls, directory: Path) -> None:
        directory = directory.resolve()
        with cls._lock:
            fd, count = cls._held[directory]
            if count > 1:
                cls._held[directory] = (fd, count - 1)
                return
            del cls._held[directory]
            os.close(fd)  # releases the flock; the engine itself stays loaded in this process


@contextlib.contextmanager
def clickhouse_client(url: str, *, busy_wait_seconds: float = 0.0):
    """A clickhouse-connect client for ``url``; for chDB, holding the directory lock."""
    client = open_clickhouse_client(url, busy_wait_seconds=busy_wait_seconds)
    try:
        yield client
    finally:
        close_clickhouse_client(client, url)


# The user's settings profile on a server may cut reads short (`limit`, `max_result_rows` with
# `result_overflow_mode = 'break'`, ...): a lookup of what ClickHouse holds that silently returns part
# of it would send rows a second time. Every query of the relay's connections reads whole results, or
# fails if an administrator's limit is in the way.
WHOLE_RESULTS = {
    "limit": 0,
    "offset": 0,
    "max_result_rows": 0,
    "result_overflow_mode": "throw",
    "read_overflow_mode": "throw",
    "timeout_overflow_mode": "throw",
}


def known_settings(client, settings: dict) -> dict:
    """``settings`` without those the server does not know (older versions), so pinning one never breaks a query.

    Asked as one aggregated row: a profile's row limit also cuts the driver's own list of the server's settings.
    """
    [(known,)] = client.query(
        "SELECT groupArray(name) FROM system.settings WHERE has({names:Array(String)}, name)", parameters={"names": list(settings)}
    ).result_rows
    return {name: value for name, value in settings.items() if name in set(known)}


def open_clickhouse_client(url: str, *, busy_wait_seconds: float = 0.0):
    client = _open_client(url, busy_wait_seconds)
    for name, value in known_settings(client, WHOLE_RESULTS).items():
        client.set_client_setting(name, value)
    return client


def _open_client(url: str, busy_wait_seconds: float):
    import clickhouse_connect

    validate_clickhouse_url(url)
    directory = chdb_path(url)
    if directory is not None:
        _ChdbDirectoryLock.acquire(directory, busy_wait_seconds)
    try:
        if directory is not None:
            directory.mkdir(parents=True, exist_ok=True)
        if directory is not None:
            return clickhouse_connect.get_client(dsn=url)
        # The relay owns its retries (with backoff, counted); the driver's own would hide them.
        return clickhouse_connect.get_client(dsn=url, connect_timeout=10, send_receive_timeout=300, query_retries=0)
    except Exception as exc:
        if directory is not None:
            _ChdbDirectoryLock.release(directory)
        raise translate_clickhouse_error(exc, url) from None


def close_clickhouse_client(client, url: str) -> None:
    try:
        client.close()
    finally:
        directory = chdb_path(url)
        if directory is not None:
            _ChdbDirectoryLock.release(directory)


class ErrorKind(enum.Enum):
    TRANSIENT = "transient"  # retry with backoff
    REJECTED_DATA = "rejected_data"  # the rows themselves: isolate the bad events
    FATAL = "fatal"  # configuration or schema: fail the run, retrying will not help


# ClickHouse error codes (src/Common/ErrorCodes.cpp).
_TRANSIENT_CODES = {
    3, 32, 159, 164, 202, 209, 210, 236, 241, 242, 252, 285, 319, 394, 425, 439, 999, 1000,
}
_FATAL_CODES = {8, 16, 36, 47, 60, 62, 81, 115, 192, 193, 194, 497, 516}
_REJECTED_DATA_CODES = {6, 26, 27, 38, 41, 53, 69, 70, 72, 117, 131, 321, 376, 395, 469, 691}


def classify_clickhouse_error(exc: BaseException) -> ErrorKind:
    from clickhouse_connect.driver import exceptions as ch

    code = getattr(exc, "code", None)
    if code in _REJECTED_DATA_CODES:
        return ErrorKind.REJECTED_DATA
    if code in _FATAL_CODES:
        return ErrorKind.FATAL
    if isinstance(exc, (ch.OperationalError, ConnectionError, TimeoutError, OSError, StoreBusyError)):
        return ErrorKind.TRANSIENT
    if code in _TRANSIENT_CODES:
        return ErrorKind.TRANSIENT
    if isinstance(exc, ch.ProgrammingError):
        return ErrorKind.FATAL
    # Unknown server errors and HTTP 5xx from proxies: assume they pass; if they
    # persist the run fails after its retries and every event stays pending.
    return ErrorKind.TRANSIENT


def translate_clickhouse_error(exc: BaseException, url: str) -> Exception:
    if isinstance(exc, (StoreBusyError, ConfigurationError)):
        return exc
    where = describe_clickhouse_url(url)
    text = one_line(exc)
    code = getattr(exc, "code", None)
    if code in (192, 193, 194, 516) or "authentication failed" in text.lower():
        return StoreUnavailableError(f"ClickHouse at {where} rejected the credentials: check the user and password in CLICKHOUSE_URL")
    if code == 81:
        return StoreUnavailableError(f"ClickHouse at {where}: the database does not exist; create it or fix CLICKHOUSE_URL")
    if "Error initializing EmbeddedServer" in text or "already" in text.lower() and "chdb" in text.lower():
        return StoreBusyError(f"the embedded ClickHouse directory {where} is in use by another process; stop it and try again")
    lowered = text.lower()
    if "connection refused" in lowered or "max retries exceeded" in lowered or "name or service not known" in lowered:
        return StoreUnavailableError(f"cannot reach ClickHouse at {where} (connection refused): is the server running and CLICKHOUSE_URL right?")
    if "timed out" in lowered or "timeout" in lowered:
        return StoreUnavailableError(f"cannot reach ClickHouse at {where} (timed out): is the server running and CLICKHOUSE_URL right?")
    return StoreUnavailableError(f"ClickHouse at {where} failed: {text[:300]}")
