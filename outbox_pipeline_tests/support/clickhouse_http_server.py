"""A ClickHouse-HTTP-compatible test server backed by chDB.

chDB is the real ClickHouse engine, but in-process, and only one process at a
time may open a chDB data directory. This server owns one data directory in
its own subprocess and speaks enough of the ClickHouse HTTP interface for
clickhouse-connect's HTTP client, so several processes (several relay runs, a
test and the code under test, ...) can share one ClickHouse the way they would
share a real server.

Run it directly::

    python -m outbox_pipeline_tests.support.clickhouse_http_server --path /abs/dir --port 0

It prints ``LISTENING host:port`` as the first stdout line once it accepts
requests. From Python, use ``running_clickhouse_http_server`` (a context
manager yielding an ``http://default:@127.0.0.1:PORT/default`` URL) or
``ClickHouseHttpServerProcess``.

Fault injection for tests is driven by CLI flags and, at run time, by
``GET/POST/DELETE /__faults`` (JSON); see ``FAULT_FIELDS``. ``--profile-setting
NAME=VALUE`` gives the user a settings profile, as a server's users.xml would.
"""

from __future__ import annotations

import argparse
import base64
import collections
import contextlib
import email.parser
import email.policy
import fcntl
import gzip
import http.server
import json
import logging
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
import zlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from email.utils import formatdate
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

FAULTS_PATH = "/__faults"

# Runtime-adjustable fault knobs and their defaults.
#   fail_next_n          answer the next N matching requests with fail_status
#   fail_status          HTTP status used by fail_next_n (503 like an overloaded proxy)
#   delay_seconds        sleep this long before handling every matching request
#   reset_next_n         drop the connection (TCP RST, no response) on the next N matching requests
#   reset_after_execute  with reset_next_n: run the query first, then drop the connection
#                        (the client cannot tell whether its write happened)
#   match                only requests whose SQL matches this regular expression (re.search,
#                        case-insensitive) are affected; None matches every request, /ping too
FAULT_FIELDS: dict[str, Any] = {
    "fail_next_n": 0,
    "fail_status": 503,
    "delay_seconds": 0.0,
    "reset_next_n": 0,
    "reset_after_execute": False,
    "match": None,
}

# HTTP status per ClickHouse error code, as the server's exceptionCodeToHTTPStatus maps them.
_HTTP_STATUS_BY_CODE: dict[int, int] = {
    194: 401,  # REQUIRED_PASSWORD
    **dict.fromkeys((192, 193, 497, 512, 516), 403),  # UNKNOWN_USER .. AUTHENTICATION_FAILED
    # BAD_ARGUMENTS, CANNOT_PARSE_*, SYNTAX_ERROR, INCORRECT_DATA, TYPE_MISMATCH, ...
    **dict.fromkeys(
        (36, 427, 6, 25, 26, 38, 41, 72, 441, 675, 676, 27, 376, 15, 44, 37, 123, 8, 167, 168, 223, 62, 117, 53, 321),
        400,
    ),
    # UNKNOWN_TABLE, UNKNOWN_IDENTIFIER, UNKNOWN_DATABASE, UNKNOWN_SETTING, ...
    **dict.fromkeys((60, 46, 47, 50, 56, 81, 115, 152, 63, 73, 336, 78, 511), 404),
    229: 413,  # QUERY_IS_TOO_LARGE
    48: 501,  # NOT_IMPLEMENTED
    209: 503,  # SOCKET_TIMEOUT
    76: 503,  # CANNOT_OPEN_FILE
    439: 503,  # CANNOT_SCHEDULE_TASK
    381: 411,  # HTTP_LENGTH_REQUIRED
    159: 408,  # TIMEOUT_EXCEEDED
    779: 415,  # UNSUPPORTED_MEDIA_TYPE
}

# URL parameters the HTTP layer consumes; every other non-param_ parameter is a setting.
_TRANSPORT_PARAMS = frozenset(
    {
        "query",
        "database",
        "default_format",
        "user",
        "password",
        "quota_key",
        "stacktrace",
        "role",
        "query_id",
        "session_id",
        "session_timeout",
        "session_check",
        "close_session",
        "compress",
        "decompress",
        "buffer_size",
        "wait_end_of_query",
        "client_protocol_version",
    }
)

# Statements that produce a result set, so the response names its format.
_RESULT_KEYWORDS = frozenset({"SELECT", "WITH", "SHOW", "DESCRIBE", "DESC", "EXISTS", "EXPLAIN", "CHECK", "VALUES", "("})

_SETTING_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_ERROR_CODE_RE = re.compile(r"Code: (\d+)\.")
_DEFAULT_SESSION_TIMEOUT = 60
_MAX_SESSION_TIMEOUT = 3600


# ---------------------------------------------------------------------------
# Errors


class ClickHouseError(Exception):
    """A ClickHouse exception: numeric code plus the `Code: N. DB::Exception: ...` text."""

    def __init__(self, code: int, message: str):
        super().__init__(message)
        self.code = code
        self.message = message

    @classmethod
    def make(cls, code: int, name: str, text: str) -> ClickHouseError:
        return cls(code, f"Code: {code}. DB::Exception: {text}. ({name})")

    @classmethod
    def from_engine(cls, exc: BaseException) -> ClickHouseError:
        text = str(exc)
        # chdb wrappers prefix their own context ("Streaming insert ... failed: ")
        start = text.find("Code: ")
        if start >= 0:
            text = text[start:].strip()
            match = _ERROR_CODE_RE.match(text)
            if match:
                return cls(int(match.group(1)), text)
        return cls.make(1001, "STD_EXCEPTION", text.strip() or type(exc).__name__)


# ---------------------------------------------------------------------------
# SQL shape: just enough lexing to split `INSERT ... FORMAT x` from its data


@dataclass
class _SqlShape:
    keyword: str = ""
    output_format: str | None = None
    multi_statement: bool = False
    # Set for INSERT ... FORMAT <fmt> followed by inline data
    insert_format: str | None = None
    infile_at: int = 0  # where `FROM INFILE` must be spliced into the statement
    head_end: int = 0  # end of the format name
    data_start: int = 0


_TOKEN_RE = re.compile(
    rb"""
      (?P<space>\s+)
    | (?P<comment>--[^\n]*|\#[ !][^\n]*|/\*.*?(?:\*/|\Z))
    | (?P<quoted>'(?:[^'\\]|\\.|'')*(?:'|\Z)|"(?:[^"\\]|\\.|"")*(?:"|\Z)|`(?:[^`\\]|\\.|``)*(?:`|\Z))
    | (?P<number>[0-9][0-9A-Za-z_.]*)
    | (?P<word>[A-Za-z_\x80-\xff][0-9A-Za-z_\x80-\xff]*)
    | (?P<punct>.)
    """,
    re.VERBOSE | re.DOTALL,
)


def _tokens(sql: bytes) -> Iterator[tuple[str, bytes, int, int]]:
    """Yield (kind, text, start, end) for words, quoted literals, numbers and punctuation.
    Lazy, so a caller can stop before binary INSERT data."""
    for match in _TOKEN_RE.finditer(sql):
        kind = match.lastgroup or "punct"
        if kind not in ("space", "comment"):
            yield kind, match.group(), match.start(), match.end()


def _analyze_sql(sql: bytes) -> _SqlShape:
    shape = _SqlShape()
    tokens = _tokens(sql)
    first = next(tokens, None)
    if first is None:
        return shape
    shape.keyword = first[1].decode("ascii", "replace").upper() if first[0] == "word" else first[1].decode("ascii", "replace")
    depth = 1 if first[1] == b"(" else 0
    if shape.keyword == "INSERT":
        settings_at = None
        for kind, text, start, _end in tokens:
            if kind == "punct":
                depth += {b"(": 1, b")": -1}.get(text, 0)
                continue
            if kind != "word" or depth:
                continue
            word = text.upper()
            if word in (b"SELECT", b"WITH", b"VALUES", b"INFILE"):
                return shape  # no inline data to split off; the engine runs it as is
            if word == b"SETTINGS" and settings_at is None:
                settings_at = start
            elif word == b"FORMAT":
                name = next(tokens, None)
                if name is None or name[0] != "word":
                    return shape
                shape.insert_format = name[1].decode("ascii", "replace")
                shape.infile_at = start if settings_at is None else settings_at
                shape.head_end = name[3]
                # As ClickHouse does: data starts after trailing blanks and at most one line break
                data = name[3]
                while sql[data : data + 1] in (b" ", b"\t", b"\f"):
                    data += 1
                if sql[data : data + 1] == b"\r":
                    data += 1
                if sql[data : data + 1] == b"\n":
                    data += 1
                shape.data_start = data
                return shape
        return shape
    # Anything else: note the output FORMAT clause and reject a second statement
    top_level: list[bytes] = []
    ended = False
    for kind, text, _start, _end in tokens:
        if ended:
            if text != b";":
                shape.multi_statement = True
                break
            continue
        if kind == "punct":
            depth += {b"(": 1, b")": -1}.get(text, 0)
            if text == b";" and depth <= 0:
                ended = True
                continue
        if depth == 0:
            top_level.append(text if kind == "word" else b"")
    # `FORMAT name` counts only when it ends the query or precedes SETTINGS
    for i in range(len(top_level) - 1):
        follower = top_level[i + 2].upper() if i + 2 < len(top_level) else b"SETTINGS"
        if top_level[i].upper() == b"FORMAT" and top_level[i + 1] and follower == b"SETTINGS":
            shape.output_format = top_level[i + 1].decode("ascii", "replace")
    return shape


# ---------------------------------------------------------------------------
# Request bodies


def _decompress_lz4(data: bytes) -> bytes:
    import lz4.frame

    # clickhouse-connect sends one complete LZ4 frame per block
    out = []
    rest = data
    while rest:
        decompressor = lz4.frame.LZ4FrameDecompressor()
        out.append(decompressor.decompress(rest))
        if not decompressor.eof:
            raise ValueError("truncated lz4 frame")
        rest = decompressor.unused_data
    return b"".join(out)


def _zstd_module() -> Any:
    if sys.version_info >= (3, 14):
        from compression import zstd
    else:
        from backports import zstd
    return zstd


def _decompress_body(data: bytes, encoding: str) -> bytes:
    encoding = encoding.strip().lower()
    if encoding in ("", "identity"):
        return data
    try:
        if encoding == "gzip":
            return gzip.decompress(data)
        if encoding == "deflate":
            return zlib.decompress(data)
        if encoding == "zstd":
            return _zstd_module().decompress(data)
        if encoding == "lz4":
            return _decompress_lz4(data)
        if encoding == "br":
            import brotli

            return brotli.decompress(data)
    except ImportError as ex:
        raise ClickHouseError.make(89, "UNKNOWN_COMPRESSION_METHOD", f"Compression method {encoding} is unavailable: {ex}") from ex
    except Exception as ex:
        raise ClickHouseError.make(271, "CANNOT_DECOMPRESS", f"Cannot decompress {encoding} request body: {ex}") from ex
    raise ClickHouseError.make(89, "UNKNOWN_COMPRESSION_METHOD", f"Unknown compression method '{encoding}'")


def _choose_response_encoding(accept: str) -> str | None:
    # ClickHouse's preference order (chooseHTTPCompressionMethod), limited to what is importable here
    accept = accept.lower()
    for name in ("zstd", "br", "lz4", "gzip", "deflate"):
        if name not in accept:
            continue
        try:
            if name == "zstd":
                _zstd_module()
            elif name == "br":
                import brotli  # noqa: F401
            elif name == "lz4":
                import lz4.frame  # noqa: F401
        except ImportError:
            continue
        return name
    return None


def _compress_body(data: bytes, encoding: str) -> bytes:
    if encoding == "zstd":
        return _zstd_module().compress(data)
    if encoding == "br":
        import brotli

        return brotli.compress(data)
    if encoding == "lz4":
        import lz4.frame

        return lz4.frame.compress(data)
    if encoding == "gzip":
        return gzip.compress(data, compresslevel=1)
    return zlib.compress(data)


def _parse_multipart(content_type: str, body: bytes) -> dict[str, str]:
    """Form fields of a multipart/form-data body (query and param_* fields)."""
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
        b"Content-Type: " + content_type.encode("latin-1") + b"\r\nMIME-Version: 1.0\r\n\r\n" + body
    )
    fields: dict[str, str] = {}
    for part in message.iter_parts():
        if part.get_filename() is not None:
            raise ClickHouseError.make(48, "NOT_IMPLEMENTED", "External data is not supported by the test server")
        name = part.get_param("name", header="content-disposition")
        payload = part.get_payload(decode=True) or b""
        if name:
            fields[str(name)] = payload.decode("utf-8", "replace")
    return fields


# ---------------------------------------------------------------------------
# Engine


@dataclass
class QueryRequest:
    sql: bytes
    database: str | None = None
    settings: dict[str, str] = field(default_factory=dict)
    bind_params: dict[str, str] = field(default_factory=dict)
    default_format: str = "TabSeparated"
    session_id: str | None = None
    session_timeout: int = _DEFAULT_SESSION_TIMEOUT
    session_check: bool = False


@dataclass
class QueryOutcome:
    body: bytes
    result_format: str | None
    summary: dict[str, str]


@dataclass
class _Session:
    conn: Any
    timeout: int
    last_used: float = field(default_factory=time.monotonic)
    busy: bool = False
    # Database the handle is on; None once the session ran its own USE
    database: str | None = "default"
    # Set once the session ran its own SET: URL settings must then be restored
    # to snapshotted values rather than to DEFAULT
    dirty: bool = False
    broken: bool = False


def _quote(value: str) -> str:
    return "'" + str(value).replace("\\", "\\\\").replace("'", "\\'") + "'"


def _quote_identifier(name: str) -> str:
    return "`" + name.replace("\\", "\\\\").replace("`", "\\`") + "`"


class ChdbEngine:
    """Runs ClickHouse HTTP requests against one chDB data directory.

    Requests without a session get a fresh chdb connection handle (cheap once
    the engine is open) so URL settings never leak between requests. A
    session keeps its handle, which holds its SET/USE state and temporary
    tables, and has URL settings applied and restored around each query.
    Separate handles run concurrently in chdb; ``serialize`` forces one engine
    call at a time anyway.
    """

    def __init__(self, path: str, serialize: bool = False, profile: Mapping[str, str] | None = None):
        import chdb

        self._chdb = chdb
        self.path = os.path.realpath(path)
        # The user's settings profile, as a server's users.xml gives it: every handle starts with it
        self.profile = dict(profile or {})
        os.makedirs(self.path, exist_ok=True)
        # Keeps the engine open for the server's lifetime
        self._anchor = chdb.connect(self.path)
        version, tz = self._anchor.query("SELECT version(), timezone()", "TabSeparated").bytes().decode().strip().split("\t")
        self.version = version
        self.timezone = tz
        # The server-level default, which a URL parameter can override per request
        self.http_compression_default = self._anchor.query(
            "SELECT value FROM system.settings WHERE name = 'enable_http_compression'", "TabSeparated"
        ).bytes().strip() in (b"1", b"true")
        self._handle_lock = threading.Lock()
        self._exec_lock: contextlib.AbstractContextManager[Any] = threading.Lock() if serialize else contextlib.nullcontext()
        self._sessions: dict[str, _Session] = {}
        self._sessions_lock = threading.Lock()
        self._infile_dir = tempfile.mkdtemp(prefix="ch-http-insert-")
        self._closed = False

    # -- handles and sessions

    def _open_handle(self) -> Any:
        with self._handle_lock:
            if self._closed:
                raise ClickHouseError.make(210, "NETWORK_ERROR", "Server is shutting down")
            conn = self._chdb.connect(self.path)
        if self.profile:
            self._query(conn, "SET " + ", ".join(f"{k} = {_quote(v)}" for k, v in self.profile.items()))
        return conn

    def _close_handle(self, conn: Any) -> None:
        with self._handle_lock:
            with contextlib.suppress(Exception):
                conn.close()

    def _acquire_session(self, request: QueryRequest) -> _Session:
        session_id = request.session_id or ""
        now = time.monotonic()
        with self._sessions_lock:
            for key, idle in list(self._sessions.items()):
                if not idle.busy and now - idle.last_used > idle.timeout:
                    del self._sessions[key]
                    self._close_handle(idle.conn)
            session = self._sessions.get(session_id)
            if session is None:
                if request.session_check:
                    raise ClickHouseError.make(372, "SESSION_NOT_FOUND", f"Session {session_id} not found")
                session = _Session(conn=self._open_handle(), timeout=request.session_timeout)
                self._sessions[session_id] = session
            elif session.busy:
                raise ClickHouseError.make(373, "SESSION_IS_LOCKED", f"Session {session_id} is locked by a concurrent client")
            session.busy = True
            session.timeout = request.session_timeout
            return session

    def _release_session(self, session_id: str, session: _Session) -> None:
        with self._sessions_lock:
            session.busy = False
            session.last_used = time.monotonic()
            if session.broken:
                self._sessions.pop(session_id, None)
                self._close_handle(session.conn)

    # -- settings

    def _apply_settings(self, conn: Any, session: _Session | None, settings: Mapping[str, str]) -> Callable[[], None] | None:
        if not settings:
            return None
        for name in settings:
            if not _SETTING_NAME_RE.match(name):
                raise ClickHouseError.make(115, "UNKNOWN_SETTING", f"Unknown setting '{name}'")
        snapshot: dict[str, tuple[str, bool]] | None = None
        if session is not None and session.dirty:
            snapshot = self._snapshot_settings(conn, settings)
        # A multi-assignment SET is all-or-nothing, so a failure needs no restore
        self._query(conn, "SET " + ", ".join(f"{k} = {_quote(v)}" for k, v in settings.items()))
        if session is None:
            return None

        def restore() -> None:
            if snapshot is None:  # back to the profile's value, or the engine's default
                statement = "SET " + ", ".join(
                    f"{name} = {_quote(self.profile[name])}" if name in self.profile else f"{name} = DEFAULT" for name in settings
                )
            else:
                parts = []
                for name, (value, changed) in snapshot.items():
                    if not changed:
                        parts.append(f"{name} = DEFAULT")
                    elif len(value) >= 2 and value[0] == value[-1] == "'":
                        parts.append(f"{name} = {value}")  # expression defaults such as 'auto(4)'
                    else:
                        parts.append(f"{name} = {_quote(value)}")
                statement = "SET " + ", ".join(parts)
            try:
                self._query(conn, statement)
            except ClickHouseError:
                # e.g. readonly=1 arrived as a URL setting: the handle cannot be reset, drop it
                logger.warning("Could not restore session settings; discarding the session handle", exc_info=True)
                session.broken = True

        return restore

    def _snapshot_settings(self, conn: Any, settings: Mapping[str, str]) -> dict[str, tuple[str, bool]]:
        names = ", ".join(_quote(name) for name in settings)
        raw = self._query(conn, f"SELECT name, value, changed FROM system.settings WHERE name IN ({names})", "JSONEachRow").bytes()
        snapshot = dict.fromkeys(settings, ("", False))
        for line in raw.splitlines():
            row = json.loads(line)
            snapshot[row["name"]] = (row["value"], bool(row["changed"]))
        return snapshot

    # -- execution

    def _query(self, conn: Any, sql: str, fmt: str = "TabSeparated", params: Mapping[str, str] | None = None) -> Any:
        try:
            return conn.query(sql, fmt, params=dict(params or {}))
        except Exception as ex:
            raise ClickHouseError.from_engine(ex) from ex

    def execute(self, request: QueryRequest) -> QueryOutcome:
        shape = _analyze_sql(request.sql)
        if not shape.keyword:
            raise ClickHouseError.make(62, "SYNTAX_ERROR", "Empty query")
        if shape.multi_statement:
            raise ClickHouseError.make(62, "SYNTAX_ERROR", "Multi-statements are not allowed")
        session = self._acquire_session(request) if request.session_id else None
        conn = session.conn if session is not None else self._open_handle()
        try:
            with self._exec_lock:
                database = request.database or None
                if session is not None:
                    if database and session.database != database:
                        self._query(conn, f"USE {_quote_identifier(database)}")
                        session.database = database
                elif database and database != "default":
                    self._query(conn, f"USE {_quote_identifier(database)}")
                if session is not None and shape.keyword in ("SET", "USE"):
                    # Session state changes are the session's own, outside the URL settings dance
                    outcome = self._run(conn, shape, request)
                    if shape.keyword == "SET":
                        session.dirty = True
                    else:
                        session.database = None
                    return outcome
                restore = self._apply_settings(conn, session, request.settings)
                try:
                    return self._run(conn, shape, request)
                finally:
                    if restore is not None:
                        restore()
        finally:
            if session is not None:
                self._release_session(request.session_id or "", session)
            else:
                self._close_handle(conn)

    def _run(self, conn: Any, shape: _SqlShape, request: QueryRequest) -> QueryOutcome:
        sql = request.sql
        if shape.insert_format is not None:
            return self._insert_with_data(conn, shape, sql)
        text = sql.decode("utf-8", "replace")
        result = self._query(conn, text, request.default_format, request.bind_params)
        body = result.bytes() or b""
        result_format = shape.output_format or request.default_format
        if not body and shape.keyword not in _RESULT_KEYWORDS:
            result_format = None
        summary = {
            "read_rows": str(result.rows_read()),
            "read_bytes": str(result.bytes_read()),
            "written_rows": str(result.rows_written()),
            "written_bytes": str(result.bytes_written()),
            "total_rows_to_read": str(result.rows_read()),
            "result_rows": "0",
            "result_bytes": str(len(body)),
            "elapsed_ns": str(int(result.elapsed() * 1e9)),
        }
        return QueryOutcome(body, result_format, summary)

    def _insert_with_data(self, conn: Any, shape: _SqlShape, sql: bytes) -> QueryOutcome:
        # Inline data cannot go to the engine as query text (chdb's query()
        # stops at the first NUL byte), and chdb's send_insert() reported
        # success for a CHECK-violating block that never landed. A file read
        # with FROM INFILE behaves like a server INSERT, as in
        # clickhouse-connect's own chdb backend.
        fd, path = tempfile.mkstemp(dir=self._infile_dir, suffix=".data")
        try:
            with os.fdopen(fd, "wb") as file:
                file.write(memoryview(sql)[shape.data_start :])
            head = sql[: shape.infile_at].decode("utf-8", "replace")
            tail = sql[shape.infile_at : shape.head_end].decode("utf-8", "replace")
            result = self._query(conn, f"{head} FROM INFILE {_quote(path)} {tail}")
        finally:
            with contextlib.suppress(OSError):
                os.unlink(path)
        written = str(result.rows_written() or result.rows_read())
        summary = {
            "read_rows": written,
            "read_bytes": str(result.bytes_read()),
            "written_rows": written,
            "written_bytes": str(result.bytes_written() or result.bytes_read()),
            "total_rows_to_read": "0",
            "result_rows": written,
            "result_bytes": str(result.bytes_written() or result.bytes_read()),
            "elapsed_ns": str(int(result.elapsed() * 1e9)),
        }
        return QueryOutcome(b"", None, summary)

    def close(self) -> None:
        with self._sessions_lock:
            sessions = list(self._sessions.values())
            self._sessions.clear()
        for session in sessions:
            self._close_handle(session.conn)
        with self._handle_lock:
            self._closed = True
            with contextlib.suppress(Exception):
                self._anchor.close()
        shutil.rmtree(self._infile_dir, ignore_errors=True)


# ---------------------------------------------------------------------------
# Faults


class FaultState:
    def __init__(self, **initial: Any):
        self._lock = threading.Lock()
        self._values = dict(FAULT_FIELDS)
        self.requests = 0
        self.injected = {"fail": 0, "reset": 0, "delay": 0}
        self.update(initial)

    def update(self, changes: Mapping[str, Any]) -> dict[str, Any]:
        unknown = set(changes) - set(FAULT_FIELDS)
        if unknown:
            raise ValueError(f"unknown fault fields: {sorted(unknown)}")
        parsed: dict[str, Any] = {}
        for key, value in changes.items():
            default = FAULT_FIELDS[key]
            if key == "match":
                parsed[key] = None if value in (None, "") else str(value)
                if parsed[key] is not None:
                    re.compile(parsed[key])  # a bad pattern fails here (re.error is a ValueError)
            elif isinstance(default, bool):
                parsed[key] = bool(value)
            else:
                parsed[key] = type(default)(value)
        with self._lock:
            self._values.update(parsed)
        return self.snapshot()

    def clear(self) -> dict[str, Any]:
        with self._lock:
            self._values = dict(FAULT_FIELDS)
        return self.snapshot()

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return {**self._values, "requests": self.requests, "injected": dict(self.injected)}

    def decide(self, sql_text: str | None) -> tuple[float, str | None]:
        """Count one request and return (delay_seconds, action) where action is
        None, "fail", "reset" or "reset_after"."""
        with self._lock:
            self.requests += 1
            match = self._values["match"]
            if match is not None and (sql_text is None or not re.search(match, sql_text, re.IGNORECASE)):
                return 0.0, None
            delay = float(self._values["delay_seconds"])
            if delay > 0:
                self.injected["delay"] += 1
            if self._values["reset_next_n"] > 0:
                self._values["reset_next_n"] -= 1
                self.injected["reset"] += 1
                return delay, "reset_after" if self._values["reset_after_execute"] else "reset"
            if self._values["fail_next_n"] > 0:
                self._values["fail_next_n"] -= 1
                self.injected["fail"] += 1
                return delay, "fail"
            return delay, None

    @property
    def fail_status(self) -> int:
        with self._lock:
            return int(self._values["fail_status"])


# ---------------------------------------------------------------------------
# HTTP


_CONTENT_TYPES = (
    (("TabSeparated", "TSV"), "text/tab-separated-values; charset=UTF-8"),
    (("CSV",), "text/csv; charset=UTF-8; header=absent"),
    (("JSON",), "application/json; charset=UTF-8"),
    (("Native", "RowBinary", "Parquet", "Arrow", "ORC", "Avro"), "application/octet-stream"),
)


def _content_type(fmt: str | None) -> str:
    if fmt:
        for prefixes, content_type in _CONTENT_TYPES:
            if fmt.startswith(prefixes):
                return content_type
    return "text/plain; charset=UTF-8"


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128

    def __init__(
        self,
        address: tuple[str, int],
        engine: ChdbEngine,
        faults: FaultState,
        *,
        user: str | None,
        password: str | None,
        keep_alive_timeout: float,
        verbose: bool,
    ):
        self.engine = engine
        self.faults = faults
        self.user = user
        self.password = password
        self.keep_alive_timeout = keep_alive_timeout
        self.verbose = verbose
        self.display_name = socket.gethostname()
        self._inflight = 0
        self._inflight_cond = threading.Condition()
        super().__init__(address, _Handler)

    def handle_error(self, request: Any, client_address: Any) -> None:
        if isinstance(sys.exc_info()[1], (ConnectionError, TimeoutError)):
            return
        super().handle_error(request, client_address)

    @contextlib.contextmanager
    def inflight(self) -> Iterator[None]:
        with self._inflight_cond:
            self._inflight += 1
        try:
            yield
        finally:
            with self._inflight_cond:
                self._inflight -= 1
                self._inflight_cond.notify_all()

    def wait_idle(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        with self._inflight_cond:
            while self._inflight and time.monotonic() < deadline:
                self._inflight_cond.wait(max(0.0, deadline - time.monotonic()))


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def setup(self) -> None:
        # Small responses go out in one write; for large ones, keep the second
        # write from stalling on a delayed ACK
        self.request.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.timeout = self.server.keep_alive_timeout
        super().setup()

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        if self.server.verbose:
            sys.stderr.write(f"{self.address_string()} - {format % args}\n")

    def do_GET(self) -> None:  # noqa: N802
        self._dispatch()

    def do_POST(self) -> None:  # noqa: N802
        self._dispatch()

    def do_DELETE(self) -> None:  # noqa: N802
        self._dispatch()

    # -- plumbing

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            parts = []
            while True:
                line = self.rfile.readline(65537)
                if not line:
                    raise ConnectionError("connection closed inside a chunked body")
                size = int(line.split(b";", 1)[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline(65537) not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    return b"".join(parts)
                chunk = self.rfile.read(size)
                if len(chunk) != size:
                    raise ConnectionError("connection closed inside a chunk")
                parts.append(chunk)
                self.rfile.readline(3)
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        if len(body) != length:
            raise ConnectionError("connection closed inside the request body")
        return body

    def _send(self, status: int, body: bytes, headers: Mapping[str, str] | None = None, reason: str | None = None) -> None:
        if reason is None:
            reason = self.responses.get(status, ("",))[0] or "Error"
        lines = [
            f"{self.protocol_version} {status} {reason}",
            f"Date: {formatdate(usegmt=True)}",
            f"Content-Length: {len(body)}",
        ]
        if self.close_connection:
            lines.append("Connection: Close")
        else:
            lines.append("Connection: Keep-Alive")
            lines.append(f"Keep-Alive: timeout={int(self.server.keep_alive_timeout)}")
        for key, value in (headers or {}).items():
            lines.append(f"{key}: {value}")
        head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        self.wfile.write(head + body if len(body) < 65536 else head)
        if len(body) >= 65536:
            self.wfile.write(body)
        self.log_request(status, len(body))

    def _reset_connection(self) -> None:
        # SO_LINGER 0 turns close() into a TCP RST: no response, no FIN
        self.close_connection = True
        with contextlib.suppress(OSError):
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.connection.close()

    def _send_error(self, error: ClickHouseError, query_id: str) -> None:
        message = error.message
        if "(version " not in message:
            message = f"{message} (version {self.server.engine.version} (official build))"
        self._send(
            _HTTP_STATUS_BY_CODE.get(error.code, 500),
            (message + "\n").encode("utf-8"),
            {
                "Content-Type": "text/plain; charset=UTF-8",
                "X-ClickHouse-Server-Display-Name": self.server.display_name,
                "X-ClickHouse-Query-Id": query_id,
                "X-ClickHouse-Exception-Code": str(error.code),
            },
        )

    # -- routing

    def _dispatch(self) -> None:
        url = urllib.parse.urlsplit(self.path)
        route = url.path.rstrip("/") or "/"
        params = dict(urllib.parse.parse_qsl(url.query, keep_blank_values=True))
        try:
            body = self._read_body()
        except (ConnectionError, ValueError):
            self.close_connection = True
            return
        if route == FAULTS_PATH:
            self._handle_faults(body)
            return
        with self.server.inflight():
            self._handle_clickhouse(route, params, body)

    def _handle_faults(self, body: bytes) -> None:
        faults = self.server.faults
        try:
            if self.command == "GET":
                state = faults.snapshot()
            elif self.command == "DELETE":
                state = faults.clear()
            else:
                changes = json.loads(body or b"{}")
                if not isinstance(changes, dict):
                    raise ValueError("expected a JSON object")
                state = faults.update(changes)
        except (ValueError, TypeError) as ex:
            self._send(400, json.dumps({"error": str(ex)}).encode(), {"Content-Type": "application/json"})
            return
        self._send(200, json.dumps(state).encode(), {"Content-Type": "application/json"})

    def _handle_clickhouse(self, route: str, params: dict[str, str], body: bytes) -> None:
        query_id = params.get("query_id") or str(uuid.uuid4())
        request: QueryRequest | None = None
        parse_error: ClickHouseError | None = None
        if route == "/":
            try:
                request = self._build_request(params, body)
            except ClickHouseError as ex:
                parse_error = ex
        sql_text = request.sql[:65536].decode("utf-8", "replace") if request is not None else None
        delay, action = self.server.faults.decide(sql_text)
        if delay > 0:
            time.sleep(delay)
        if action == "reset":
            self._reset_connection()
            return
        if action == "fail":
            status = self.server.faults.fail_status
            reason = self.responses.get(status, ("Service Unavailable",))[0]
            self._send(status, f"{reason}\n".encode(), {"Content-Type": "text/plain; charset=UTF-8"}, reason)
            return

        if route in ("/ping", "/replicas_status") or (route == "/" and request is None and parse_error is None):
            if action == "reset_after":
                self._reset_connection()
            else:
                self._send(200, b"Ok.\n", {"Content-Type": "text/html; charset=UTF-8"})
            return
        if route != "/":
            message = f"There is no handle {route}\n\nUse / or /ping for health checks.\n"
            self._send(404, message.encode(), {"Content-Type": "text/plain; charset=UTF-8"})
            return
        try:
            self._authenticate(params)
            if parse_error is not None:
                raise parse_error
            assert request is not None
            outcome = self.server.engine.execute(request)
        except ClickHouseError as ex:
            if action == "reset_after":
                self._reset_connection()
            else:
                self._send_error(ex, query_id)
            return
        except Exception as ex:  # keep the server up; report like an unexpected server error
            logger.exception("Unexpected error executing request")
            self._send_error(ClickHouseError.make(1001, "STD_EXCEPTION", f"{type(ex).__name__}: {ex}"), query_id)
            return
        if action == "reset_after":
            self._reset_connection()
            return
        self._send_outcome(outcome, params, query_id)

    def _build_request(self, params: dict[str, str], body: bytes) -> QueryRequest | None:
        content_type = self.headers.get("Content-Type", "")
        if content_type.lower().startswith("multipart/form-data"):
            fields = _parse_multipart(content_type, body)
            params = {**params, **fields}
            body = b""
        else:
            body = _decompress_body(body, self.headers.get("Content-Encoding", ""))
        query_param = params.get("query", "")
        if not query_param and not body:
            return None
        # As in ClickHouse: the query parameter, a line break, then the body
        sql = (query_param.encode("utf-8") + b"\n" + body) if query_param else body
        session_timeout = _DEFAULT_SESSION_TIMEOUT
        if "session_timeout" in params:
            raw = params["session_timeout"]
            if not raw.isdigit() or int(raw) > _MAX_SESSION_TIMEOUT:
                raise ClickHouseError.make(374, "INVALID_SESSION_TIMEOUT", f"Invalid session timeout: '{raw}'")
            session_timeout = int(raw)
        settings = {}
        bind_params = {}
        for key, value in params.items():
            if key.startswith("param_"):
                bind_params[key[6:]] = value
            elif key not in _TRANSPORT_PARAMS:
                settings[key] = value
        return QueryRequest(
            sql=sql,
            database=params.get("database") or None,
            settings=settings,
            bind_params=bind_params,
            default_format=params.get("default_format") or "TabSeparated",
            session_id=params.get("session_id") or None,
            session_timeout=session_timeout,
            session_check=params.get("session_check") in ("1", "true"),
        )

    def _authenticate(self, params: Mapping[str, str]) -> None:
        user = self.headers.get("X-ClickHouse-User") or params.get("user") or ""
        password = self.headers.get("X-ClickHouse-Key") or params.get("password") or ""
        auth = self.headers.get("Authorization", "")
        if auth.lower().startswith("basic "):
            with contextlib.suppress(ValueError):
                user, _, password = base64.b64decode(auth[6:].strip()).decode("utf-8").partition(":")
        user = user or "default"
        expected_user = self.server.user
        expected_password = self.server.password
        if (expected_user is not None and user != expected_user) or (expected_password is not None and password != expected_password):
            raise ClickHouseError.make(
                516,
                "AUTHENTICATION_FAILED",
                f"{user}: Authentication failed: password is incorrect, or there is no user with such name",
            )

    def _send_outcome(self, outcome: QueryOutcome, params: Mapping[str, str], query_id: str) -> None:
        headers = {
            "X-ClickHouse-Server-Display-Name": self.server.display_name,
            "X-ClickHouse-Query-Id": query_id,
            "X-ClickHouse-Summary": json.dumps(outcome.summary, separators=(",", ":")),
            "Content-Type": _content_type(outcome.result_format),
        }
        if outcome.result_format is not None:
            headers["X-ClickHouse-Format"] = outcome.result_format
            headers["X-ClickHouse-Timezone"] = self.server.engine.timezone
        body = outcome.body
        compression_enabled = params.get("enable_http_compression")
        if compression_enabled is None:
            enabled = self.server.engine.http_compression_default
        else:
            enabled = compression_enabled.lower() in ("1", "true")
        if body and enabled:
            encoding = _choose_response_encoding(self.headers.get("Accept-Encoding", ""))
            if encoding is not None:
                body = _compress_body(body, encoding)
                headers["Content-Encoding"] = encoding
        self._send(200, body, headers)


# ---------------------------------------------------------------------------
# Entry point


def _lock_directory(path: str) -> int:
    """Hold ``<dir>.lock`` like outbox_pipeline's chdb:// clients do, so a process
    opening the directory directly gets their "busy" error instead of a second engine."""
    directory = Path(path).resolve()
    directory.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(directory.with_name(directory.name + ".lock"), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise SystemExit(f"chDB directory {directory} is in use by another process (pid {holder})") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, str(os.getpid()).encode(), 0)
    return fd


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--path", required=True, help="chDB data directory owned by this server")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--user", default=None, help="require this user name (default: accept any)")
    parser.add_argument("--password", default=None, help="require this password (default: accept any)")
    parser.add_argument("--fail-next-n", type=int, default=0)
    parser.add_argument("--fail-status", type=int, default=503)
    parser.add_argument("--delay-seconds", type=float, default=0.0)
    parser.add_argument("--reset-next-n", type=int, default=0)
    parser.add_argument("--reset-after-execute", action="store_true")
    parser.add_argument("--fault-match", default=None)
    parser.add_argument("--serialize-engine", action="store_true", help="run one engine call at a time")
    parser.add_argument(
        "--profile-setting", action="append", default=[], metavar="NAME=VALUE",
        help="a setting of the user's profile: every query starts with it unless the request overrides it (repeatable)",
    )
    parser.add_argument("--keep-alive-timeout", type=float, default=30.0)
    parser.add_argument("--stop-on-stdin-eof", action="store_true", help="exit when stdin closes (parent died)")
    parser.add_argument("--verbose", action="store_true", help="log every request to stderr")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    faults = FaultState(
        fail_next_n=args.fail_next_n,
        fail_status=args.fail_status,
        delay_seconds=args.delay_seconds,
        reset_next_n=args.reset_next_n,
        reset_after_execute=args.reset_after_execute,
        match=args.fault_match,
    )
    lock_fd = _lock_directory(args.path)
    profile = dict(setting.split("=", 1) for setting in args.profile_setting)
    engine = ChdbEngine(args.path, serialize=args.serialize_engine, profile=profile)
    try:
        server = _Server(
            (args.host, args.port),
            engine,
            faults,
            user=args.user,
            password=args.password,
            keep_alive_timeout=args.keep_alive_timeout,
            verbose=args.verbose,
        )
    except BaseException:
        engine.close()
        raise
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    if args.stop_on_stdin_eof:

        def watch_stdin() -> None:
            # os.read, not sys.stdin: a buffered reader blocked in a daemon thread aborts interpreter shutdown
            with contextlib.suppress(OSError):
                while os.read(sys.stdin.fileno(), 4096):
                    pass
            stop.set()

        threading.Thread(target=watch_stdin, name="stdin-watch", daemon=True).start()

    serve_thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.2}, name="http-serve", daemon=True)
    serve_thread.start()
    host, port = server.server_address[:2]
    sys.stdout.write(f"LISTENING {host}:{port}\n")
    sys.stdout.flush()
    while not stop.wait(0.5):
        pass
    server.shutdown()
    server.server_close()
    # Let requests that are running finish before the engine goes away
    server.wait_idle(timeout=10.0)
    engine.close()
    os.close(lock_fd)
    return 0


# ---------------------------------------------------------------------------
# Test-side helpers (no chdb import needed in the calling process)


def _base_url(url: str) -> str:
    parts = urllib.parse.urlsplit(url)
    return f"{parts.scheme}://{parts.hostname}:{parts.port}"


def _fault_request(url: str, method: str, payload: Mapping[str, Any] | None = None, timeout: float = 10.0) -> dict[str, Any]:
    data = json.dumps(dict(payload)).encode() if payload is not None else None
    request = urllib.request.Request(_base_url(url) + FAULTS_PATH, data=data, method=method, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as ex:
        raise ValueError(ex.read().decode("utf-8", "replace")) from ex


def set_faults(url: str, **faults: Any) -> dict[str, Any]:
    """Merge fault settings (see FAULT_FIELDS) into the running server; returns the new state."""
    return _fault_request(url, "POST", faults)


def get_faults(url: str) -> dict[str, Any]:
    """Current fault settings plus counters: requests, injected{fail,reset,delay}."""
    return _fault_request(url, "GET")


def clear_faults(url: str) -> dict[str, Any]:
    """Reset every fault setting to its default (counters are kept)."""
    return _fault_request(url, "DELETE")


class ClickHouseHttpServerProcess:
    """The server in a subprocess. ``start()`` returns the client URL once it is ready."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        user: str | None = None,
        password: str | None = None,
        faults: Mapping[str, Any] | None = None,
        serialize_engine: bool = False,
        profile: Mapping[str, Any] | None = None,
        verbose: bool = False,
        startup_timeout: float = 60.0,
        python: str = sys.executable,
    ):
        self.path = os.path.realpath(os.fspath(path))
        self.host = host
        self.port = port
        self.user = user
        self.password = password
        self.faults = dict(faults or {})
        self.serialize_engine = serialize_engine
        self.profile = {name: str(value) for name, value in (profile or {}).items()}
        self.verbose = verbose
        self.startup_timeout = startup_timeout
        self.python = python
        self.url: str | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._exit_code: int | None = None
        self._stderr_tail: collections.deque[str] = collections.deque(maxlen=200)

    def _command(self) -> list[str]:
        module = __spec__.name if __name__ == "__main__" and __spec__ else __name__
        cmd = [self.python, "-m", module, "--path", self.path, "--host", self.host, "--port", str(self.port), "--stop-on-stdin-eof"]
        if self.user is not None:
            cmd += ["--user", self.user]
        if self.password is not None:
            cmd += ["--password", self.password]
        if self.serialize_engine:
            cmd.append("--serialize-engine")
        for name, value in self.profile.items():
            cmd += ["--profile-setting", f"{name}={value}"]
        if self.verbose:
            cmd.append("--verbose")
        flags = {
            "fail_next_n": "--fail-next-n",
            "fail_status": "--fail-status",
            "delay_seconds": "--delay-seconds",
            "reset_next_n": "--reset-next-n",
            "match": "--fault-match",
        }
        for key, value in self.faults.items():
            if key == "reset_after_execute":
                if value:
                    cmd.append("--reset-after-execute")
            elif key in flags:
                cmd += [flags[key], str(value)]
            else:
                raise ValueError(f"unknown fault field {key!r}")
        return cmd

    def _drain(self, stream: Any, sink: Callable[[str], None]) -> None:
        for raw in iter(stream.readline, b""):
            sink(raw.decode("utf-8", "replace").rstrip("\n"))

    def _on_stderr(self, line: str) -> None:
        self._stderr_tail.append(line)
        sys.stderr.write(f"[clickhouse-http-server] {line}\n")

    @property
    def log_tail(self) -> str:
        return "\n".join(self._stderr_tail)

    def start(self) -> str:
        if self._proc is not None:
            raise RuntimeError("server already started")
        # The package root must be importable whatever the caller's cwd is
        root = str(Path(__file__).resolve().parents[2])
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
        self._proc = subprocess.Popen(self._command(), stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
        stderr_reader = threading.Thread(target=self._drain, args=(self._proc.stderr, self._on_stderr), daemon=True)
        stderr_reader.start()
        first_line: list[str] = []
        ready = threading.Event()
        stdout = self._proc.stdout

        def read_first_line() -> None:
            first_line.append(stdout.readline().decode("utf-8", "replace").strip())
            ready.set()
            self._drain(stdout, lambda _line: None)

        threading.Thread(target=read_first_line, daemon=True).start()
        if not ready.wait(self.startup_timeout) or not first_line[0].startswith("LISTENING "):
            self.stop()
            stderr_reader.join(timeout=5)
            raise RuntimeError(f"ClickHouse HTTP test server did not start (path {self.path}):\n{self.log_tail}")
        host, _, port = first_line[0].split(" ", 1)[1].rpartition(":")
        self.host, self.port = host, int(port)
        self.url = f"http://{urllib.parse.quote(self.user or 'default')}:{urllib.parse.quote(self.password or '')}@{host}:{port}/default"
        return self.url

    def stop(self, timeout: float = 20.0) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self._exit_code = proc.returncode
        for stream in (proc.stdin, proc.stdout, proc.stderr):
            with contextlib.suppress(Exception):
                stream.close()

    @property
    def returncode(self) -> int | None:
        """None while running; the exit status once stopped (0 after a clean shutdown)."""
        return self._exit_code if self._proc is None else self._proc.poll()

    def set_faults(self, **faults: Any) -> dict[str, Any]:
        return set_faults(self._require_url(), **faults)

    def get_faults(self) -> dict[str, Any]:
        return get_faults(self._require_url())

    def clear_faults(self) -> dict[str, Any]:
        return clear_faults(self._require_url())

    def _require_url(self) -> str:
        if self.url is None:
            raise RuntimeError("server not started")
        return self.url

    def __enter__(self) -> ClickHouseHttpServerProcess:
        self.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()


@contextlib.contextmanager
def running_clickhouse_http_server(path: str | os.PathLike[str], **options: Any) -> Iterator[str]:
    """Run the server on ``path`` and yield ``http://user:password@host:port/default``.

    ``options`` are those of :class:`ClickHouseHttpServerProcess` (host, port, user,
    password, faults, serialize_engine, verbose, startup_timeout).
    """
    server = ClickHouseHttpServerProcess(path, **options)
    url = server.start()
    try:
        yield url
    finally:
        server.stop()


def closed_port_url() -> str:
    """A ClickHouse URL on a local port nothing listens on: every connection is refused."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://default:@127.0.0.1:{port}/default"


if __name__ == "__main__":
    sys.exit(main())
