"""Sentry configuration and start-up for the outbox pipeline.

Deliberately free of Dagster imports: the Dagster hooks, sensors and the CLI
all call :func:`init_sentry` / :func:`flush_sentry`, and so can any script.

What leaves the process is limited on purpose:

* no default integrations (no argv, modules list, stdlib HTTP spans ...);
  logging only as breadcrumbs (``event_level=None``), because a failure
  already reported by a hook would otherwise come back as a second event
  from Dagster's own ERROR log line;
* no frame local variables, no default PII (see ``sentry_init_options``);
* every event, transaction, check-in, breadcrumb, metric and log passes
  through :mod:`outbox_pipeline.monitoring.scrubbing`; the relay's event
  payload field ``event_context`` is dropped unless explicitly allowed; the
  one value kept is the DSN's public key in the envelope header's trace
  context, which Sentry needs;
* the HTTP transport gives up a request after the flush timeout, so a slow
  or unreachable Sentry never holds a run longer than that.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import threading
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import sentry_sdk
from sentry_sdk.integrations.atexit import AtexitIntegration
from sentry_sdk.integrations.dedupe import DedupeIntegration
from sentry_sdk.integrations.logging import LoggingIntegration
from sentry_sdk.transport import HttpTransport

from outbox_pipeline.config.settings import SentrySettings, default_release
from outbox_pipeline.monitoring.scrubbing import SECRET_ENV_VARS, configured_secrets, scrub

__all__ = [
    "EVENT_PAYLOAD_KEY",
    "BoundedHttpTransport",
    "SentrySettings",
    "default_release",
    "flush_sentry",
    "fresh_scope",
    "init_sentry",
    "sentry_init_options",
]

logger = logging.getLogger(__name__)

# Field of a relayed outbox event that holds its (possibly personal) payload.
EVENT_PAYLOAD_KEY = "event_context"


class BoundedHttpTransport(HttpTransport):
    """sentry-sdk's HTTP transport with a short request timeout.

    Sending happens on the SDK's background thread and ``flush`` already
    waits at most its timeout, but the stock 30 s request timeout keeps a
    stalled request (and everything queued behind it) alive long after the
    flush gave up. Bounding each request by the flush budget keeps the
    queue moving. ``TIMEOUT`` is the transport's own per-request timeout
    (a public class attribute of ``HttpTransport``).
    """

    TIMEOUT: float = 2.0

    @classmethod
    def with_timeout(cls, seconds: float) -> type[BoundedHttpTransport]:
        # The SDK instantiates the transport class itself (with its options),
        # so the timeout travels as a class attribute of a subclass.
        return type(cls.__name__, (cls,), {"TIMEOUT": float(seconds)})


@functools.lru_cache(maxsize=16)
def _secrets_for(values: tuple[str | None, ...]) -> tuple[str, ...]:
    return configured_secrets({}, extra=values)


def _current_secrets(settings: SentrySettings) -> tuple[str, ...]:
    # Read on every call so secrets configured after start-up (CLI, tests)
    # are covered; the parsing is cached per distinct set of values.
    values = tuple(os.environ.get(name) for name in SECRET_ENV_VARS) + (settings.dsn,)
    return _secrets_for(values)


def _make_scrubber(settings: SentrySettings) -> Callable[[Any], Any]:
    drop_keys = () if settings.send_event_payloads else (EVENT_PAYLOAD_KEY,)

    def scrub_payload(payload: Any) -> Any:
        return scrub(payload, _current_secrets(settings), drop_keys=drop_keys)

    return scrub_payload


def _sampling_context(event: Any) -> dict[str, Any] | None:
    """The dynamic sampling context of an event, which the SDK moves into the
    envelope header's ``trace`` when it sends the event."""
    contexts = event.get("contexts") if isinstance(event, Mapping) else None
    trace = contexts.get("trace") if isinstance(contexts, Mapping) else None
    dsc = trace.get("dynamic_sampling_context") if isinstance(trace, Mapping) else None
    return dsc if isinstance(dsc, dict) else None


def _make_event_scrubber(settings: SentrySettings) -> Callable[[Any], Any]:
    scrub_payload = _make_scrubber(settings)

    def scrub_event(event: Any) -> Any:
        # The DSN's public key is a configured secret part, but the sampling context
        # must carry it for Sentry to use that context; it is no secret there (the
        # SDK sends it with every request). Everything else in the context is scrubbed.
        original = _sampling_context(event)
        public_key = original.get("public_key") if original is not None else None
        scrubbed = scrub_payload(event)
        dsc = _sampling_context(scrubbed)
        if isinstance(public_key, str) and dsc is not None and "public_key" in dsc:
            dsc["public_key"] = public_key
        return scrubbed

    return scrub_event


def _log_line_key(crumb: Any) -> Any:
    """What identifies the log line behind a breadcrumb (None for other breadcrumbs)."""
    if crumb.get("type") != "log":
        return None
    meta = (crumb.get("data") or {}).get("dagster_meta") or {}
    return meta.get("log_message_id") or (crumb.get("category"), crumb.get("level"), crumb.get("message"))


def sentry_init_options(settings: SentrySettings) -> dict[str, Any]:
    """Keyword arguments for ``sentry_sdk.init`` for these settings."""
    scrub_payload = _make_scrubber(settings)
    scrub_event = _make_event_scrubber(settings)

    def before_send(event: Any, hint: Any) -> Any:
        # Errors, messages and (in sentry-sdk 2.x) cron check-ins.
        return scrub_event(event)

    def before_send_transaction(event: Any, hint: Any) -> Any:
        return scrub_event(event)

    last_crumb = threading.local()

    def before_breadcrumb(crumb: Any, hint: Any) -> Any:
        # Dagster hands each log line to its log manager and then to its
        # console logger (a line logged through get_dagster_logger is a record
        # of its own first, under another logger name): keep one breadcrumb.
        key = _log_line_key(crumb)
        if key is not None and getattr(last_crumb, "key", None) == key:
            return None
        last_crumb.key = key
        return scrub_payload(crumb)

    def before_send_metric(metric: Any, hint: Any) -> Any:
        # trace_metric items bypass before_send; this is their only hook.
        return scrub_payload(metric)

    def before_send_log(log: Any, hint: Any) -> Any:
        # Only relevant if enable_logs is ever switched on.
        return scrub_payload(log)

    timeout = settings.flush_timeout_seconds
    return {
        "dsn": settings.dsn,
        "environment": settings.environment,
        "release": settings.release,
        "default_integrations": False,
        "integrations": [
            LoggingIntegration(level=logging.INFO, event_level=None),
            # Bounded flush at interpreter exit (default_integrations=False
            # would otherwise drop whatever is still queued), without the
            # "Sentry is attempting to send ..." message on stderr.
            AtexitIntegration(callback=lambda pending, timeout: None),
            # The same exception object is reported once, whoever captures it.
            DedupeIntegration(),
        ],
        # No default PII. sentry-sdk 2.75 deprecates `send_default_pii`
        # (a DeprecationWarning even for False) in favour of `data_collection`;
        # leaving both unset resolves exactly like send_default_pii=False and
        # keeps the SDK's default EventScrubber, which an explicit
        # `data_collection` would switch off.
        "include_local_variables": False,
        "traces_sample_rate": settings.traces_sample_rate,
        "before_send": before_send,
        "before_send_transaction": before_send_transaction,
        "before_breadcrumb": before_breadcrumb,
        "before_send_metric": before_send_metric,
        "before_send_log": before_send_log,
        "shutdown_timeout": timeout,
        # Never shorter than 1 s: a sub-second flush budget must not make
        # every ordinary request to Sentry fail.
        "transport": BoundedHttpTransport.with_timeout(max(timeout, 1.0)),
    }


_lock = threading.Lock()
# (settings, client) of the last init_sentry() call that started Sentry.
_started: tuple[SentrySettings, Any] | None = None


def init_sentry(settings: SentrySettings | None = None) -> bool:
    """Start Sentry if enabled; return whether it is running.

    Idempotent: with the same settings and our client still installed it
    does nothing. After the SDK was reset (or another client installed) it
    initializes again; with different settings it replaces its own client.
    """
    global _started
    if settings is None:
        settings = SentrySettings.from_env()
    if not settings.enabled:
        return False
    with _lock:
        client = sentry_sdk.get_client()
        if _started is not None and _started[1] is client and client.is_active():
            if _started[0] == settings:
                return True
            # Replacing our own client: deliver what it holds, bounded.
            client.close(timeout=_started[0].flush_timeout_seconds)
        sentry_sdk.init(**sentry_init_options(settings))
        _started = (settings, sentry_sdk.get_client())
    return True


def flush_sentry(timeout: float | None = None) -> None:
    """Send queued Sentry data, waiting at most ``timeout`` seconds (default:
    the configured flush timeout). A no-op when Sentry is not running."""
    client = sentry_sdk.get_client()
    if not client.is_active():
        return
    if timeout is None:
        started = _started
        if started is not None and started[1] is client:
            timeout = started[0].flush_timeout_seconds
        else:
            timeout = float(client.options.get("shutdown_timeout") or 2.0)
    try:
        sentry_sdk.flush(timeout=timeout)
    except Exception:  # monitoring must never fail the caller
        logger.debug("Sentry flush failed", exc_info=True)


@contextlib.contextmanager
def fresh_scope() -> Iterator[Any]:
    """A scope for one report from a long-lived process (the code server's
    sensors): no breadcrumbs or tags left over from earlier work."""
    with sentry_sdk.isolation_scope() as isolation:
        isolation.clear_breadcrumbs()
        with sentry_sdk.new_scope() as scope:
            yield scope
