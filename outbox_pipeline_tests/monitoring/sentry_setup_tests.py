"""Sentry set-up, exercised through sentry-sdk's real HTTP transport against a
local recording server (see outbox_pipeline_tests/support/sentry_recorder.py)."""

from __future__ import annotations

import gzip
import json
import logging
import time
import urllib.request
import warnings
import zlib

import pytest
import sentry_sdk
import sentry_sdk.crons
import sentry_sdk.metrics

from outbox_pipeline.config import settings as config_settings
from outbox_pipeline.monitoring.scrubbing import (
    FILTERED,
    configured_secrets,
    scrub,
    scrub_text,
    secret_parts,
)
from outbox_pipeline.monitoring.sentry_setup import (
    BoundedHttpTransport,
    SentrySettings,
    flush_sentry,
    init_sentry,
)
from outbox_pipeline_tests.support.sentry_fixtures import reset_sentry_sdk
from outbox_pipeline_tests.support.sentry_recorder import (
    SentryRecorder,
    parse_envelope,
    unreachable_dsn,
)

DB_URL = "postgresql://app:s3cretpw@db:5432/x"
# Distinctive so a grep over the raw bodies cannot match by accident.
PUBLIC_KEY = "5f0c1e2d3a4b49c8a7e6d5c4b3a29180"

log = logging.getLogger("outbox_pipeline.tests.sentry")


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in (
        "SENTRY_CONFIG_DSN",
        "SENTRY_CONFIG_ENVIRONMENT",
        "DEBUG",
        "SENTRY_TRACES_SAMPLE_RATE",
        "SENTRY_SEND_EVENT_PAYLOADS",
        "SENTRY_FLUSH_TIMEOUT_SECONDS",
        "OUTBOX_DATABASE_URL",
        "CLICKHOUSE_URL",
        "SENTRY_PRINT_ENVELOPES",
    ):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def recorder(reset_sentry: None):  # noqa: F811 - fixture from sentry_fixtures
    with SentryRecorder(public_key=PUBLIC_KEY) as rec:
        yield rec


def settings_for(dsn: str | None, **overrides) -> SentrySettings:
    values = {"dsn": dsn, "environment": "test", "flush_timeout_seconds": 2.0}
    values.update(overrides)
    return SentrySettings(**values)


def raise_and_capture(message: str) -> None:
    try:
        raise RuntimeError(message)
    except RuntimeError:
        sentry_sdk.capture_exception()


def assert_no_leak(rec: SentryRecorder, *secrets: str) -> None:
    # The envelope header's trace.public_key is the DSN's public key by design.
    text = rec.raw_text_without_trace_key()
    assert text, "nothing was received"
    for secret in secrets:
        assert secret not in text


# -- settings ------------------------------------------------------------------


def test_settings_defaults_from_empty_environment() -> None:
    settings = SentrySettings.from_env(environ={})
    assert settings.dsn is None
    assert settings.environment == "development"
    assert settings.debug is False
    assert settings.traces_sample_rate == 1.0
    assert settings.send_event_payloads is False
    assert settings.flush_timeout_seconds == 2.0
    assert settings.release.startswith("outbox-pipeline@")
    assert settings.enabled is False


def test_settings_read_all_variables() -> None:
    settings = SentrySettings.from_env(
        environ={
            "SENTRY_CONFIG_DSN": "https://key@o1.ingest.sentry.io/7",
            "SENTRY_CONFIG_ENVIRONMENT": "prod",
            "DEBUG": "no",
            "SENTRY_TRACES_SAMPLE_RATE": "0.25",
            "SENTRY_SEND_EVENT_PAYLOADS": "Yes",
            "SENTRY_FLUSH_TIMEOUT_SECONDS": "0.5",
        }
    )
    assert settings.dsn == "https://key@o1.ingest.sentry.io/7"
    assert settings.environment == "prod"
    assert settings.traces_sample_rate == 0.25
    assert settings.send_event_payloads is True
    assert settings.flush_timeout_seconds == 0.5
    assert settings.enabled is True
    assert "key@" not in repr(settings)


@pytest.mark.parametrize("value", ["1", "true", "TRUE", "yes", "On"])
def test_debug_disables_sentry(value: str) -> None:
    settings = SentrySettings.from_env(
        environ={"SENTRY_CONFIG_DSN": "https://key@o1.ingest.sentry.io/7", "DEBUG": value}
    )
    assert settings.debug is True
    assert settings.enabled is False


def test_release_falls_back_when_package_not_installed(monkeypatch) -> None:
    def not_installed(name: str) -> str:
        raise config_settings.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(config_settings.metadata, "version", not_installed)
    assert config_settings.default_release() == "outbox-pipeline@0.0.0+unknown"


def test_invalid_values_are_rejected() -> None:
    with pytest.raises(ValueError, match="SENTRY_TRACES_SAMPLE_RATE"):
        SentrySettings.from_env(environ={"SENTRY_TRACES_SAMPLE_RATE": "lots"})
    with pytest.raises(ValueError, match="SENTRY_TRACES_SAMPLE_RATE=.1.5.: Input should be less than or equal to 1"):
        SentrySettings.from_env(environ={"SENTRY_TRACES_SAMPLE_RATE": "1.5"})
    with pytest.raises(ValueError, match="DEBUG"):
        SentrySettings.from_env(environ={"DEBUG": "maybe"})


# -- enabling / idempotency ----------------------------------------------------


def test_nothing_sent_without_dsn(recorder: SentryRecorder) -> None:
    assert init_sentry(SentrySettings.from_env(environ={})) is False
    assert init_sentry() is False  # from os.environ, where no DSN is set
    assert not sentry_sdk.get_client().is_active()
    raise_and_capture("nobody listens")
    flush_sentry()
    time.sleep(0.3)
    assert recorder.envelopes == []


def test_nothing_sent_in_debug(recorder: SentryRecorder, monkeypatch) -> None:
    monkeypatch.setenv("SENTRY_CONFIG_DSN", recorder.dsn)
    monkeypatch.setenv("DEBUG", "true")
    assert init_sentry() is False
    assert not sentry_sdk.get_client().is_active()
    raise_and_capture("debug mode")
    log.error("debug mode error log")
    flush_sentry()
    time.sleep(0.3)
    assert recorder.envelopes == []


def test_init_from_environment_sends(recorder: SentryRecorder, monkeypatch) -> None:
    monkeypatch.setenv("SENTRY_CONFIG_DSN", recorder.dsn)
    monkeypatch.setenv("SENTRY_CONFIG_ENVIRONMENT", "staging")
    assert init_sentry() is True
    raise_and_capture("hello")
    flush_sentry()
    event = recorder.wait_for(lambda r: r.payloads("event"))[0]
    assert event["environment"] == "staging"
    assert event["release"].startswith("outbox-pipeline@")
    # The real transport compresses; the recorder decoded it.
    assert recorder.envelopes[0].content_encoding in ("gzip", "br")


def test_init_options_limit_collected_data(recorder: SentryRecorder) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        assert init_sentry(settings_for(recorder.dsn)) is True
    options = sentry_sdk.get_client().options
    assert options["default_integrations"] is False
    assert set(sentry_sdk.get_client().integrations) == {"logging", "atexit", "dedupe"}
    # send_default_pii left unset resolves to "no PII"; frame vars are off.
    assert options["send_default_pii"] is None
    assert options["data_collection"]["user_info"] is False
    assert options["data_collection"]["stack_frame_variables"] is False
    assert options["include_local_variables"] is False
    assert options["event_scrubber"] is not None
    assert options["shutdown_timeout"] == 2.0
    transport = sentry_sdk.get_client().transport
    assert isinstance(transport, BoundedHttpTransport) and transport.TIMEOUT == 2.0


def test_init_is_idempotent_and_works_again_after_reset(recorder: SentryRecorder) -> None:
    settings = settings_for(recorder.dsn)
    assert init_sentry(settings) is True
    client = sentry_sdk.get_client()
    assert init_sentry(settings) is True
    assert sentry_sdk.get_client() is client

    reset_sentry_sdk()
    assert not sentry_sdk.get_client().is_active()
    assert init_sentry(settings) is True
    assert sentry_sdk.get_client() is not client
    raise_and_capture("after reset")
    flush_sentry()
    recorder.wait_for(lambda r: r.payloads("event"))


def test_init_with_other_settings_replaces_client(recorder: SentryRecorder) -> None:
    assert init_sentry(settings_for(recorder.dsn, environment="a")) is True
    first = sentry_sdk.get_client()
    assert init_sentry(settings_for(recorder.dsn, environment="b")) is True
    assert sentry_sdk.get_client() is not first
    raise_and_capture("second")
    flush_sentry()
    event = recorder.wait_for(lambda r: r.payloads("event"))[0]
    assert event["environment"] == "b"


def test_flush_is_safe_without_init(reset_sentry: None) -> None:  # noqa: F811
    flush_sentry()
    flush_sentry(timeout=0.1)


# -- scrubbing through the real transport --------------------------------------


def test_exception_and_log_breadcrumb_are_redacted(recorder: SentryRecorder, caplog) -> None:
    caplog.set_level(logging.INFO, logger=log.name)  # root defaults to WARNING
    assert init_sentry(settings_for(recorder.dsn)) is True

    log.info("connecting to %s", DB_URL)
    log.warning("retrying with PGPASSWORD=s3cretpw psql")
    # event_level=None: an ERROR log line is a breadcrumb, never an event.
    log.error("relay failed for %s", DB_URL)
    sentry_sdk.set_extra("dsn", DB_URL)
    sentry_sdk.set_tag("target", DB_URL)
    raise_and_capture(f"could not connect to {DB_URL}")
    flush_sentry()

    events = recorder.wait_for(lambda r: r.payloads("event"))
    time.sleep(0.2)
    assert len(recorder.payloads("event")) == 1, "a log line must not create an event"
    event = events[0]

    [exc] = event["exception"]["values"]
    assert exc["value"] == "could not connect to postgresql://app:[Filtered]@db:5432/x"
    messages = [c.get("message") for c in event["breadcrumbs"]["values"]]
    assert "connecting to postgresql://app:[Filtered]@db:5432/x" in messages
    assert "retrying with PGPASSWORD=[Filtered] psql" in messages
    assert "relay failed for postgresql://app:[Filtered]@db:5432/x" in messages
    assert event["extra"]["dsn"] == "postgresql://app:[Filtered]@db:5432/x"
    assert event["tags"]["target"] == "postgresql://app:[Filtered]@db:5432/x"
    # Frame locals are not collected at all.
    frames = exc["stacktrace"]["frames"]
    assert frames and all("vars" not in f for f in frames)

    assert_no_leak(recorder, "s3cretpw", PUBLIC_KEY)


def test_configured_secret_values_are_redacted_anywhere(
    recorder: SentryRecorder, monkeypatch, caplog
) -> None:
    caplog.set_level(logging.INFO, logger=log.name)
    # Secrets that do not look like a URL password in the message itself.
    monkeypatch.setenv("OUTBOX_DATABASE_URL", "host=db user=app password='Pw0rd with space'")
    monkeypatch.setenv("CLICKHOUSE_URL", "http://default:Ch%40ckH0use@ch:8123/")
    # (A conninfo string is no valid OUTBOX_DATABASE_URL, so Sentry starts from explicit settings here.)
    assert init_sentry(settings_for(recorder.dsn)) is True

    log.info("bad credentials: Pw0rd with space / Ch@ckH0use")
    raise_and_capture("server said: Ch@ckH0use rejected; dsn " + recorder.dsn)
    flush_sentry()
    event = recorder.wait_for(lambda r: r.payloads("event"))[0]
    assert event["exception"]["values"][0]["value"] == (
        f"server said: {FILTERED} rejected; dsn {FILTERED}"
    )
    [crumb] = event["breadcrumbs"]["values"]
    assert crumb["message"] == f"bad credentials: {FILTERED} / {FILTERED}"
    assert_no_leak(recorder, "Pw0rd with space", "Ch@ckH0use", "Ch%40ckH0use", PUBLIC_KEY)


def test_transaction_span_data_is_redacted(recorder: SentryRecorder) -> None:
    assert init_sentry(settings_for(recorder.dsn)) is True
    with sentry_sdk.start_transaction(op="process_events", name="process_outbox_events") as tx:
        tx.set_data("source", DB_URL)
        with sentry_sdk.start_span(op="db.query", name=f"claim from {DB_URL}") as span:
            span.set_data("db.url", DB_URL)
            span.set_data("conninfo", "host=db password=s3cretpw dbname=x")
        tx.set_status("ok")
    flush_sentry()

    tx_event = recorder.wait_for(lambda r: r.payloads("transaction"))[0]
    assert tx_event["transaction"] == "process_outbox_events"
    assert tx_event["contexts"]["trace"]["data"]["source"] == (
        "postgresql://app:[Filtered]@db:5432/x"
    )
    [span] = tx_event["spans"]
    assert span["description"] == "claim from postgresql://app:[Filtered]@db:5432/x"
    assert span["data"]["db.url"] == "postgresql://app:[Filtered]@db:5432/x"
    assert span["data"]["conninfo"] == "host=db password=[Filtered] dbname=x"
    assert_no_leak(recorder, "s3cretpw", PUBLIC_KEY)


def test_envelope_trace_header_keeps_the_public_key(recorder: SentryRecorder, caplog) -> None:
    # Sentry needs the public key in the dynamic sampling context it reads from the
    # envelope header; the key is not a secret (the SDK sends it with every request).
    caplog.set_level(logging.INFO, logger=log.name)
    assert init_sentry(settings_for(recorder.dsn)) is True
    log.info("reporting to %s", recorder.dsn)
    with sentry_sdk.start_transaction(op="process_events", name="process_outbox_events"):
        raise_and_capture(f"key {PUBLIC_KEY} refused by {recorder.dsn}")
    sentry_sdk.crons.capture_checkin(monitor_slug="outbox-relay", status="ok")
    flush_sentry()

    def envelopes_of(item_type: str):
        return recorder.wait_for(lambda r: [e for e in r.envelopes if e.items_of(item_type)])

    for item_type in ("event", "transaction", "check_in"):
        [envelope] = envelopes_of(item_type)
        assert envelope.headers["trace"]["public_key"] == PUBLIC_KEY, item_type
    # Everywhere else the key and the DSN stay filtered.
    event = recorder.payloads("event")[0]
    assert event["exception"]["values"][0]["value"] == f"key {FILTERED} refused by {FILTERED}"
    [crumb] = event["breadcrumbs"]["values"]
    assert crumb["message"] == f"reporting to {FILTERED}"
    assert_no_leak(recorder, PUBLIC_KEY)


def event_with_payload() -> None:
    payload = {"user_email": "someone@example.com", "amount": 12}
    sentry_sdk.set_context("outbox_event", {"id": 7, "event_context": payload})
    sentry_sdk.set_extra("event", {"event_type": "order.created", "event_context": payload})
    with sentry_sdk.start_transaction(op="process_events", name="process_outbox_events"):
        with sentry_sdk.start_span(op="relay") as span:
            span.set_data("event_context", payload)
        raise_and_capture("bad event")


def test_event_context_dropped_by_default(recorder: SentryRecorder) -> None:
    assert init_sentry(settings_for(recorder.dsn)) is True
    event_with_payload()
    flush_sentry()
    event = recorder.wait_for(lambda r: r.payloads("event"))[0]
    tx_event = recorder.wait_for(lambda r: r.payloads("transaction"))[0]
    assert event["contexts"]["outbox_event"] == {"id": 7}
    assert event["extra"]["event"] == {"event_type": "order.created"}
    assert "event_context" not in tx_event["spans"][0].get("data", {})
    assert "someone@example.com" not in recorder.raw_text()


def test_event_context_kept_when_enabled(recorder: SentryRecorder) -> None:
    assert init_sentry(settings_for(recorder.dsn, send_event_payloads=True)) is True
    event_with_payload()
    flush_sentry()
    event = recorder.wait_for(lambda r: r.payloads("event"))[0]
    tx_event = recorder.wait_for(lambda r: r.payloads("transaction"))[0]
    expected = {"user_email": "someone@example.com", "amount": 12}
    assert event["contexts"]["outbox_event"]["event_context"] == expected
    assert event["extra"]["event"]["event_context"] == expected
    assert tx_event["spans"][0]["data"]["event_context"] == expected


def test_check_ins_and_metrics_are_redacted(recorder: SentryRecorder) -> None:
    # Check-ins go through before_send; trace_metric items only through
    # before_send_metric.
    assert init_sentry(settings_for(recorder.dsn)) is True
    check_in_id = sentry_sdk.crons.capture_checkin(
        monitor_slug="outbox-relay", status="in_progress"
    )
    sentry_sdk.crons.capture_checkin(
        monitor_slug="outbox-relay", check_in_id=check_in_id, status="ok", duration=0.1
    )
    sentry_sdk.metrics.count("outbox.events_relayed", 3, attributes={"source": DB_URL})
    sentry_sdk.metrics.gauge("outbox.backlog", 10, attributes={"password": "s3cretpw"})
    flush_sentry()

    check_ins = recorder.wait_for(lambda r: len(r.payloads("check_in")) == 2 and r.payloads("check_in"))
    assert [c["status"] for c in check_ins] == ["in_progress", "ok"]
    [batch] = recorder.wait_for(lambda r: r.payloads("trace_metric"))
    metrics = {m["name"]: m for m in batch["items"]}
    assert metrics["outbox.events_relayed"]["attributes"]["source"]["value"] == (
        "postgresql://app:[Filtered]@db:5432/x"
    )
    assert metrics["outbox.backlog"]["attributes"]["password"] == {
        "value": FILTERED,
        "type": "string",
    }
    assert_no_leak(recorder, "s3cretpw", PUBLIC_KEY)


# -- a slow or absent Sentry must not hold up the pipeline ---------------------


def test_slow_sentry_does_not_block_flush_beyond_timeout(recorder: SentryRecorder) -> None:
    recorder.delay_seconds = 10
    assert init_sentry(settings_for(recorder.dsn, flush_timeout_seconds=1.0)) is True

    started = time.monotonic()
    raise_and_capture("first")
    raise_and_capture("second")
    captured = time.monotonic() - started
    flush_sentry()
    flushed = time.monotonic() - started

    assert captured < 0.5, "capturing must not wait for the network"
    assert flushed < 1.0 + 0.75, f"flush took {flushed:.2f}s"
    # The server got the first envelope and is only slow to answer. The
    # transport gives up on that request after the flush timeout instead of
    # the SDK's stock 30 s, so the second envelope follows well before the
    # server would have answered.
    recorder.wait_for(lambda r: len(r.payloads("event")) >= 2, timeout=3)
    assert time.monotonic() - started < 5

    # A later flush is bounded as well, even while the server still stalls.
    started = time.monotonic()
    raise_and_capture("third")
    flush_sentry(timeout=0.5)
    assert time.monotonic() - started < 0.5 + 0.5


def test_unreachable_sentry_does_not_raise(reset_sentry: None) -> None:  # noqa: F811
    dsn = unreachable_dsn(public_key=PUBLIC_KEY)
    assert init_sentry(settings_for(dsn, flush_timeout_seconds=1.0)) is True
    started = time.monotonic()
    raise_and_capture("into the void")
    log.error("still fine")
    with sentry_sdk.start_transaction(op="process_events", name="process_outbox_events"):
        pass
    flush_sentry()
    assert time.monotonic() - started < 1.0 + 0.75


# -- scrubbing functions -------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (DB_URL, "postgresql://app:[Filtered]@db:5432/x"),
        ("postgres://u:p@h/x", "postgres://u:[Filtered]@h/x"),
        ("clickhouse://default:pw@ch:9000", "clickhouse://default:[Filtered]@ch:9000"),
        ("chdb://u:pw@/tmp/x", "chdb://u:[Filtered]@/tmp/x"),
        ("https://u:pw@example.com/a?b", "https://u:[Filtered]@example.com/a?b"),
        ("redis://:pw@cache:6379/0", "redis://:[Filtered]@cache:6379/0"),
        ("x http://u:p@ss@h/y", "x http://u:[Filtered]@h/y"),
        ("https://abc123@o1.ingest.sentry.io/42", "https://[Filtered]@o1.ingest.sentry.io/42"),
        ("postgresql://app@db/x", "postgresql://app@db/x"),
        ("host=db password=secret dbname=x", "host=db password=[Filtered] dbname=x"),
        ("host=db password='a b\\'c' port=1", "host=db password='[Filtered]' port=1"),
        ("PGPASSWORD=hunter2 psql", "PGPASSWORD=[Filtered] psql"),
        ("?user=a&password=zz&x=1", "?user=a&password=[Filtered]&x=1"),
        ("{'password': 'abc', 'user': 'u'}", "{'password': '[Filtered]', 'user': 'u'}"),
        ('{"passwd": "d e"}', '{"passwd": "[Filtered]"}'),
        ("password authentication failed", "password authentication failed"),
        ("no secrets here", "no secrets here"),
    ],
)
def test_scrub_text_patterns(text: str, expected: str) -> None:
    assert scrub_text(text, secrets=()) == expected


def test_scrub_text_is_idempotent() -> None:
    once = scrub_text(f"{DB_URL} https://k@h/1 password=x", secrets=())
    assert scrub_text(once, secrets=()) == once


def test_secret_parts_of_urls_and_conninfo() -> None:
    assert set(secret_parts("postgresql://app:p%40ss@db/x")) == {
        "postgresql://app:p%40ss@db/x",
        "p%40ss",
        "p@ss",
    }
    assert "publickey" in secret_parts("http://publickey@127.0.0.1:1/1")
    assert "Pw0rd with space" in secret_parts("host=db password='Pw0rd with space'")
    assert "abc" not in secret_parts("postgresql://app:abc@db/x")  # too short to match anywhere
    assert secret_parts(None) == [] and secret_parts("  ") == []


def test_configured_secrets_read_environment_values() -> None:
    secrets = configured_secrets(
        {"OUTBOX_DATABASE_URL": DB_URL, "UNRELATED": "postgresql://a:zzzzzz@b/c"}
    )
    assert "s3cretpw" in secrets and DB_URL in secrets
    assert "zzzzzz" not in secrets


def test_scrub_nested_structures() -> None:
    data = {
        "list": [DB_URL, ("x", "password=1234")],
        "db_password": "hunter2",
        "attributes": {"password": {"value": "hunter2", "type": "string"}},
        "nested": {"event_context": {"pii": 1}, "n": 5, "none": None},
        DB_URL: "key is a url",
    }
    out = scrub(data, secrets=("hunter2",), drop_keys={"event_context"})
    assert out == {
        "list": ["postgresql://app:[Filtered]@db:5432/x", ("x", "password=[Filtered]")],
        "db_password": FILTERED,
        "attributes": {"password": {"value": FILTERED, "type": "string"}},
        "nested": {"n": 5, "none": None},
        "postgresql://app:[Filtered]@db:5432/x": "key is a url",
    }
    assert data["nested"]["event_context"] == {"pii": 1}, "input is not modified"


# -- the recorder itself -------------------------------------------------------


def _post(url: str, body: bytes, encoding: str | None) -> int:
    headers = {"Content-Type": "application/x-sentry-envelope"}
    if encoding:
        headers["Content-Encoding"] = encoding
    req = urllib.request.Request(url, data=body, headers=headers, method="POST")
    with urllib.request.urlopen(req, timeout=5) as resp:
        return resp.status


@pytest.mark.parametrize("encoding", [None, "gzip", "deflate"])
def test_recorder_decodes_and_parses_envelopes(encoding: str | None) -> None:
    payload = json.dumps({"message": "hi\nthere"}).encode()
    body = (
        b'{"event_id":"abc"}\n'
        + b'{"type":"event","length":%d}\n' % len(payload)
        + payload
        + b"\n"
        + b'{"type":"attachment"}\n'
        + b"not json\n"
    )
    encoded = {None: body, "gzip": gzip.compress(body), "deflate": zlib.compress(body)}[encoding]
    with SentryRecorder() as rec:
        assert _post(f"http://127.0.0.1:{rec.port}/api/1/envelope/", encoded, encoding) == 200
        [envelope] = rec.wait_for(lambda r: r.envelopes)
        assert envelope.headers == {"event_id": "abc"}
        assert envelope.project_id == "1"
        assert rec.payloads("event") == [{"message": "hi\nthere"}]
        [attachment] = rec.items("attachment")
        assert attachment.payload is None and attachment.raw == b"not json"
        assert rec.raw_bodies == [body]
        rec.clear()
        assert rec.envelopes == [] and rec.raw_bodies == []
    assert parse_envelope(body)[0] == {"event_id": "abc"}


def test_recorder_wait_for_times_out() -> None:
    with SentryRecorder() as rec:
        with pytest.raises(TimeoutError):
            rec.wait_for(lambda r: r.items("event"), timeout=0.2)
