"""A Django request that publishes an event and the relay run that delivers it: one Sentry trace.

The Django application (support/django_app.py, django_urls.py) runs in this process with
sentry-sdk's Django integration, started as an application starts it; the relay runs
with the project's own Sentry set-up. Both report to the same recording server.

Django's test client calls Django's request handling below its WSGI entry point, which is
what the SDK's Django integration instruments (a request through the test client has no
transaction). So the request goes through Django's WSGI application itself, as a WSGI
server calls it, with the environ Django's RequestFactory builds.
"""

from __future__ import annotations

import json

import dagster as dg
import sentry_sdk

from outbox_pipeline_tests.conftest import prepare_relay
from outbox_pipeline_tests.monitoring.envelopes import PUBLIC_KEY, trace, transactions
from outbox_pipeline_tests.monitoring.queue_tracing_tests import by_message_id, ours, process_span
from outbox_pipeline_tests.support.relay_runs import run_relay


def wsgi_post(path: str) -> tuple[str, bytes]:
    from django.core.wsgi import get_wsgi_application
    from django.test import RequestFactory

    statuses: list[str] = []

    def start_response(status, headers, exc_info=None):
        statuses.append(status)

    body = b"".join(get_wsgi_application()(RequestFactory().post(path).environ, start_response))
    return statuses[0], body


def test_a_django_view_that_publishes_and_the_relay_run_that_delivers_share_one_trace(
    django_outbox_url, clickhouse_url, tmp_path, recorder, monkeypatch
):
    from sentry_sdk.integrations.django import DjangoIntegration

    sentry_sdk.init(dsn=recorder.dsn, integrations=[DjangoIntegration()], traces_sample_rate=1.0, environment="web")

    status, body = wsgi_post("/orders/42/pay/")

    assert status == "200 OK", body
    event_id = json.loads(body)["event_id"]
    sentry_sdk.flush()
    [request] = recorder.wait_for(lambda r: [t for t in transactions(r) if trace(t).get("op") == "http.server"])
    assert request["transaction"] == "/orders/{order_id}/pay/"
    [publish] = [span for span in request["spans"] if span["op"] == "queue.publish"]
    assert ours(publish["data"]) == {
        "messaging.system": "outbox_pipeline",
        "messaging.destination.name": "event_log",
        "messaging.message.id": event_id,
        "messaging.message.body.size": len('{"order_id":42,"amount":"9.90","currency":"EUR","email":"someone@example.com"}'),
    }

    prepare_relay(monkeypatch, django_outbox_url, clickhouse_url, tmp_path / "state")
    monkeypatch.setenv("SENTRY_CONFIG_DSN", recorder.dsn)  # prepare_relay turns Sentry off
    result = run_relay(dg.DagsterInstance.ephemeral())

    assert result.success
    delivered = recorder.wait_for(lambda r: by_message_id(r).get(event_id))
    assert trace(delivered)["trace_id"] == trace(request)["trace_id"]
    assert trace(delivered)["parent_span_id"] == publish["span_id"]
    data = process_span(delivered)["data"]
    assert data["messaging.destination.name"] == "event_log"
    assert data["messaging.message.receive.latency"] > 0
    assert data["messaging.message.retry.count"] == 0
    # The run's own transaction is a trace of its own.
    [run] = [t for t in transactions(recorder) if t["transaction"] == "process_outbox_events"]
    assert trace(run)["trace_id"] != trace(request)["trace_id"]
    # No payload, and the DSN's key only where Sentry needs it.
    text = recorder.raw_text_without_trace_key()
    assert "someone@example.com" not in text and PUBLIC_KEY not in text
