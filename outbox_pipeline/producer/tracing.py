"""Sentry's Queues module on the producer side: one ``queue.publish`` span per publish call.

When :func:`~outbox_pipeline.producer.publishing.publish` runs inside a sampled Sentry
transaction (a Django request, a Celery task, …), the call is wrapped in a span
with op ``queue.publish`` and the data Sentry's Queues module reads, and the
span's ``sentry-trace`` and ``baggage`` headers are stored with each event of the
call, so the relay can continue the trace when it delivers the events.

Everywhere else a publish costs one dictionary lookup more: ``sentry_sdk`` is
never imported from here (an application that has not imported it has no
transaction running), and with it imported, one look at the current span.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator, Sequence
from typing import Any

# ``messaging.system`` of both sides: the outbox is the queue.
MESSAGING_SYSTEM = "outbox_pipeline"
PUBLISH_OP = "queue.publish"
# Event rows are outbox_rows() tuples: (event_id, event_type, event_date_time, environment, event_context, metadata_version).
_EVENT_ID, _CONTEXT = 0, 4


def current_span() -> Any:
    """The caller's active and sampled Sentry span, or None (no Sentry, no transaction, not sampled)."""
    sentry_sdk = sys.modules.get("sentry_sdk")
    if sentry_sdk is None:
        return None
    span = sentry_sdk.get_current_span()
    # An unsampled trace is never sent: its headers would only take room in the outbox.
    if span is None or not getattr(span, "sampled", False):
        return None
    return span


@contextlib.contextmanager
def publish_span(rows: Sequence[tuple], destination: str) -> Iterator[tuple[str | None, str | None]]:
    """A ``queue.publish`` span around one publish call; yields the (sentry-trace, baggage) headers it propagates.

    Ids and sizes only: no payload, no connection details.
    """
    import sentry_sdk

    with sentry_sdk.start_span(op=PUBLISH_OP, name=destination) as span:
        span.set_data("messaging.system", MESSAGING_SYSTEM)
        span.set_data("messaging.destination.name", destination)
        span.set_data("messaging.message.id", str(rows[0][_EVENT_ID]))
        if len(rows) > 1:
            span.set_data("messaging.batch.message_count", len(rows))
        span.set_data("messaging.message.body.size", sum(_utf8_size(row[_CONTEXT]) for row in rows))
        # Read with the publish span current: the relay's spans become its children.
        yield sentry_sdk.get_traceparent(), sentry_sdk.get_baggage()


def _utf8_size(text: str) -> int:
    # isascii() is O(1) in CPython; only non-ASCII payloads are encoded again.
    return len(text) if text.isascii() else len(text.encode("utf-8"))
