"""A local stand-in for a Sentry ingest endpoint, for tests.

The real sentry-sdk HTTP transport posts envelopes to
``/api/<project_id>/envelope/`` (gzip-encoded by default in sentry-sdk 2.x,
brotli when the ``brotli`` module is installed or requested). This server
accepts exactly that, decodes the body and records every envelope parsed into
its headers and items, so tests exercise the same serialization and network
path as production instead of a swapped-out transport.
"""

from __future__ import annotations

import gzip
import json
import re
import socket
import threading
import time
import zlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, TypeVar

try:  # brotli is optional for sentry-sdk; decode it when the client used it
    import brotli  # type: ignore[import-not-found]
except ImportError:  # pragma: no cover - depends on the environment
    brotli = None

__all__ = [
    "EnvelopeParseError",
    "RecordedEnvelope",
    "RecordedItem",
    "SentryRecorder",
    "decode_body",
    "parse_envelope",
    "unreachable_dsn",
]

T = TypeVar("T")

_ENVELOPE_PATH = re.compile(r"^/api/(?P<project_id>[^/]+)/envelope/?$")


class EnvelopeParseError(ValueError):
    """The request body is not a well-formed Sentry envelope."""


@dataclass(frozen=True)
class RecordedItem:
    """One envelope item: its header line and its payload."""

    headers: Mapping[str, Any]
    raw: bytes
    # Parsed JSON, or None when the payload is not JSON (attachments, etc.).
    payload: Any = None

    @property
    def type(self) -> str | None:
        return self.headers.get("type")


@dataclass(frozen=True)
class RecordedEnvelope:
    """One POSTed envelope, decoded and parsed."""

    project_id: str
    path: str
    request_headers: Mapping[str, str]
    content_encoding: str | None
    headers: Mapping[str, Any]
    items: tuple[RecordedItem, ...]
    raw: bytes  # decoded body, exactly as serialized by the SDK

    def items_of(self, item_type: str | None = None) -> list[RecordedItem]:
        return [i for i in self.items if item_type is None or i.type == item_type]


def decode_body(body: bytes, content_encoding: str | None) -> bytes:
    """Undo the HTTP Content-Encoding the SDK applied (gzip, br, deflate)."""
    encodings = [
        e.strip().lower() for e in (content_encoding or "").split(",") if e.strip()
    ]
    # Encodings are listed in the order applied; undo them in reverse.
    for encoding in reversed(encodings):
        if encoding in ("identity",):
            continue
        if encoding in ("gzip", "x-gzip"):
            body = gzip.decompress(body)
        elif encoding == "deflate":
            try:
                body = zlib.decompress(body)
            except zlib.error:  # some clients send raw deflate without zlib header
                body = zlib.decompress(body, -zlib.MAX_WBITS)
        elif encoding == "br":
            if brotli is None:
                raise EnvelopeParseError(
                    "body is brotli-encoded but the brotli module is not installed"
                )
            body = brotli.decompress(body)
        else:
            raise EnvelopeParseError(f"unsupported Content-Encoding {encoding!r}")
    return body


def _try_json(raw: bytes) -> Any:
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return None


def parse_envelope(data: bytes) -> tuple[dict[str, Any], list[RecordedItem]]:
    """Parse the Sentry envelope format.

    ``<envelope headers JSON>\\n`` followed by items, each
    ``<item headers JSON>\\n<payload>\\n``. The payload is ``length`` bytes when
    the item header says so, otherwise it runs to the next newline.
    """
    pos = 0

    def read_line() -> bytes:
        nonlocal pos
        end = data.find(b"\n", pos)
        if end == -1:
            line, pos = data[pos:], len(data)
        else:
            line, pos = data[pos:end], end + 1
        return line

    first = read_line()
    try:
        headers = json.loads(first) if first.strip() else {}
    except ValueError as exc:
        raise EnvelopeParseError(f"bad envelope header line: {first[:200]!r}") from exc

    items: list[RecordedItem] = []
    while pos < len(data):
        header_line = read_line()
        if not header_line.strip():
            continue  # tolerate trailing newlines
        try:
            item_headers = json.loads(header_line)
        except ValueError as exc:
            raise EnvelopeParseError(
                f"bad item header line: {header_line[:200]!r}"
            ) from exc
        length = item_headers.get("length")
        if length is not None:
            raw = data[pos : pos + int(length)]
            if len(raw) != int(length):
                raise EnvelopeParseError("item payload shorter than its length header")
            pos += int(length)
            if data[pos : pos + 1] == b"\n":
                pos += 1
        else:
            raw = read_line()
        items.append(RecordedItem(headers=item_headers, raw=raw, payload=_try_json(raw)))
    return headers, items


def _free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def unreachable_dsn(public_key: str = "publickey", project_id: int | str = 1) -> str:
    """A DSN pointing at a local port that nothing listens on.

    The port is bound and released again, so connecting to it is refused
    (barring a very unlikely reuse by another process in between).
    """
    return f"http://{public_key}@127.0.0.1:{_free_port()}/{project_id}"


class _Handler(BaseHTTPRequestHandler):
    server: _RecorderHTTPServer
    protocol_version = "HTTP/1.1"  # keep-alive, like real Relay

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        pass  # keep test output clean

    def _read_body(self) -> bytes:
        if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";", 1)[0].strip(), 16)
                if size == 0:
                    # trailers end with an empty line
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    break
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            return b"".join(chunks)
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _reply(self, status: int, body: bytes) -> None:
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up waiting (e.g. a timed-out transport)

    def do_POST(self) -> None:  # noqa: N802 - http.server naming
        recorder = self.server.recorder
        body = self._read_body()
        match = _ENVELOPE_PATH.match(self.path.split("?", 1)[0])
        if match is None:
            recorder._record_unexpected(self.command, self.path)
            self._reply(404, b'{"detail":"not found"}')
            return
        envelope_id = recorder._record(
            match.group("project_id"), self.path, dict(self.headers.items()), body
        )
        # Answer late on purpose to emulate a slow Sentry; the envelope is
        # already recorded so a test can tell "received" from "answered".
        delay = recorder.delay_seconds
        if delay > 0:
            recorder._stopping.wait(delay)
        self._reply(recorder.response_status, json.dumps({"id": envelope_id}).encode())

    def do_GET(self) -> None:  # noqa: N802
        self.server.recorder._record_unexpected(self.command, self.path)
        self._reply(404, b'{"detail":"not found"}')


class _RecorderHTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    # Do not join handler threads on close: a slow handler would stall teardown.
    block_on_close = False
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], recorder: SentryRecorder) -> None:
        self.recorder = recorder
        self._connections: set[socket.socket] = set()
        self._connections_lock = threading.Lock()
        super().__init__(address, _Handler)

    # The SDK's urllib3 pool keeps connections alive; track them so stop()
    # can end their handler threads instead of leaving them blocked on read.
    def process_request(self, request: Any, client_address: Any) -> None:
        with self._connections_lock:
            self._connections.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        with self._connections_lock:
            self._connections.discard(request)
        super().shutdown_request(request)

    def close_connections(self) -> None:
        with self._connections_lock:
            connections = list(self._connections)
        for conn in connections:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


class SentryRecorder:
    """Records what the real sentry-sdk HTTP transport sends.

    Use as a context manager (or ``start()``/``stop()``)::

        with SentryRecorder() as rec:
            sentry_sdk.init(dsn=rec.dsn)
            ...
            sentry_sdk.flush()
            event = rec.wait_for(lambda r: r.payloads("event"))[0]

    ``delay_seconds`` makes every answer late (the envelope is recorded
    first); it may be changed while the server runs. ``response_status`` lets
    a test emulate rejections (e.g. 429 or 500).
    """

    def __init__(
        self,
        *,
        public_key: str = "publickey",
        project_id: int | str = 1,
        delay_seconds: float = 0.0,
        response_status: int = 200,
        host: str = "127.0.0.1",
    ) -> None:
        self.public_key = public_key
        self.project_id = str(project_id)
        self.delay_seconds = float(delay_seconds)
        self.response_status = int(response_status)
        self.host = host
        self._envelopes: list[RecordedEnvelope] = []
        self._errors: list[str] = []
        self._unexpected: list[tuple[str, str]] = []
        self._cond = threading.Condition()
        self._stopping = threading.Event()
        self._server: _RecorderHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle -------------------------------------------------------------

    def start(self) -> SentryRecorder:
        if self._server is not None:
            return self
        self._stopping.clear()
        self._server = _RecorderHTTPServer((self.host, 0), self)
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.05},
            name=f"sentry-recorder:{self.port}",
            daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        server, thread = self._server, self._thread
        if server is None:
            return
        self._stopping.set()  # wakes handlers sleeping for delay_seconds
        server.shutdown()
        server.server_close()
        server.close_connections()
        if thread is not None:
            thread.join(timeout=5)
        self._server = self._thread = None

    def __enter__(self) -> SentryRecorder:
        return self.start()

    def __exit__(self, *exc_info: Any) -> None:
        self.stop()

    # -- addresses -------------------------------------------------------------

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("SentryRecorder is not started")
        return self._server.server_address[1]

    @property
    def dsn(self) -> str:
        return f"http://{self.public_key}@{self.host}:{self.port}/{self.project_id}"

    @staticmethod
    def unreachable_dsn(public_key: str = "publickey", project_id: int | str = 1) -> str:
        return unreachable_dsn(public_key, project_id)

    # -- recording (called from handler threads) -------------------------------

    def _record(
        self, project_id: str, path: str, request_headers: dict[str, str], body: bytes
    ) -> str | None:
        encoding = request_headers.get("Content-Encoding") or request_headers.get(
            "content-encoding"
        )
        try:
            decoded = decode_body(body, encoding)
            headers, items = parse_envelope(decoded)
        except Exception as exc:  # keep serving; tests can assert on .errors
            with self._cond:
                self._errors.append(f"{type(exc).__name__}: {exc}")
                self._cond.notify_all()
            return None
        envelope = RecordedEnvelope(
            project_id=project_id,
            path=path,
            request_headers=request_headers,
            content_encoding=encoding,
            headers=headers,
            items=tuple(items),
            raw=decoded,
        )
        with self._cond:
            self._envelopes.append(envelope)
            self._cond.notify_all()
        return headers.get("event_id")

    def _record_unexpected(self, method: str, path: str) -> None:
        with self._cond:
            self._unexpected.append((method, path))
            self._cond.notify_all()

    # -- inspection ------------------------------------------------------------

    @property
    def envelopes(self) -> list[RecordedEnvelope]:
        with self._cond:
            return list(self._envelopes)

    @property
    def raw_bodies(self) -> list[bytes]:
        """Every decoded request body received, for grepping for leaks."""
        with self._cond:
            return [e.raw for e in self._envelopes]

    @property
    def errors(self) -> list[str]:
        """Bodies that could not be decoded or parsed."""
        with self._cond:
            return list(self._errors)

    @property
    def unexpected_requests(self) -> list[tuple[str, str]]:
        with self._cond:
            return list(self._unexpected)

    def raw_text(self) -> str:
        """All decoded bodies as one string (undecodable bytes escaped)."""
        return "\n".join(b.decode("utf-8", "backslashreplace") for b in self.raw_bodies)

    def raw_text_without_trace_key(self) -> str:
        """:meth:`raw_text` with ``public_key`` taken out of each envelope header's ``trace``
        (the dynamic sampling context), the one place the DSN's public key is meant to be
        sent: for asserting that a key appears nowhere else."""
        bodies = []
        for envelope in self.envelopes:
            headers = dict(envelope.headers)
            if isinstance(headers.get("trace"), dict):
                headers["trace"] = {k: v for k, v in headers["trace"].items() if k != "public_key"}
            items = envelope.raw.partition(b"\n")[2]
            bodies.append(json.dumps(headers) + "\n" + items.decode("utf-8", "backslashreplace"))
        return "\n".join(bodies)

    def items(self, item_type: str | None = None) -> list[RecordedItem]:
        """Items of one type ('event', 'transaction', 'check_in', 'trace_metric',
        'log', 'client_report', ...) across all envelopes, in arrival order."""
        return [i for e in self.envelopes for i in e.items_of(item_type)]

    def payloads(self, item_type: str | None = None) -> list[Any]:
        """Parsed JSON payloads of the items of one type."""
        return [i.payload for i in self.items(item_type)]

    def item_types(self) -> list[str | None]:
        return [i.type for i in self.items()]

    def __iter__(self) -> Iterator[RecordedEnvelope]:
        return iter(self.envelopes)

    def __len__(self) -> int:
        with self._cond:
            return len(self._envelopes)

    def clear(self) -> None:
        with self._cond:
            self._envelopes.clear()
            self._errors.clear()
            self._unexpected.clear()

    def wait_for(
        self, predicate: Callable[[SentryRecorder], T], timeout: float = 5.0
    ) -> T:
        """Wait until ``predicate(self)`` is truthy and return its value.

        Raises TimeoutError (listing what did arrive) when it stays falsy.
        """
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                # The condition's lock is an RLock, so the predicate may use
                # the accessors, which take it again.
                result = predicate(self)
                if result:
                    return result
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._cond.wait(min(remaining, 0.1))
        raise TimeoutError(
            f"condition not met within {timeout}s; received item types "
            f"{self.item_types()!r}, parse errors {self.errors!r}"
        )
