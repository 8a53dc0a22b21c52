"""Fixtures and readers for tests that check what reaches the recording Sentry server."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from outbox_pipeline_tests.support.sentry_recorder import SentryRecorder

# Distinctive, so a grep over the raw bodies cannot match by accident.
PUBLIC_KEY = "7c1d9e2f4a6b48d0b3e5f7a9c2d4e6f8"
ENVIRONMENT = "ci-monitoring"

SENTRY_VARIABLES = (
    "SENTRY_CONFIG_DSN",
    "SENTRY_CONFIG_ENVIRONMENT",
    "DEBUG",
    "SENTRY_TRACES_SAMPLE_RATE",
    "SENTRY_SEND_EVENT_PAYLOADS",
    "SENTRY_FLUSH_TIMEOUT_SECONDS",
    "SENTRY_CRON_MONITOR_SLUG",
    "SENTRY_CRON_SCHEDULE",
    "SENTRY_CRON_INTERVAL_MINUTES",
    "OUTBOX_LAG_WARNING_SECONDS",
    "OUTBOX_LAG_ERROR_SECONDS",
    "OUTBOX_QUEUE_WARNING_SIZE",
    "OUTBOX_QUEUE_ERROR_SIZE",
)


@pytest.fixture
def recorder(reset_sentry: None, monkeypatch: pytest.MonkeyPatch) -> Iterator[SentryRecorder]:
    """A recording Sentry server; the environment names it as the DSN (set before the run)."""
    for name in SENTRY_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    with SentryRecorder(public_key=PUBLIC_KEY) as rec:
        monkeypatch.setenv("SENTRY_CONFIG_DSN", rec.dsn)
        monkeypatch.setenv("SENTRY_CONFIG_ENVIRONMENT", ENVIRONMENT)
        monkeypatch.setenv("SENTRY_FLUSH_TIMEOUT_SECONDS", "2")
        yield rec


def transactions(rec: SentryRecorder) -> list[dict[str, Any]]:
    return rec.payloads("transaction")


def errors(rec: SentryRecorder) -> list[dict[str, Any]]:
    return rec.payloads("event")


def check_ins(rec: SentryRecorder) -> list[dict[str, Any]]:
    return rec.payloads("check_in")


def metrics(rec: SentryRecorder) -> list[dict[str, Any]]:
    """Every metric of every trace_metric item, with attributes flattened to plain values."""
    out = []
    for batch in rec.payloads("trace_metric"):
        for item in batch["items"]:
            out.append({**item, "attributes": {k: v.get("value") for k, v in item.get("attributes", {}).items()}})
    return out


def metrics_named(rec: SentryRecorder, name: str) -> list[dict[str, Any]]:
    return [m for m in metrics(rec) if m["name"] == name]


def trace(transaction: dict[str, Any]) -> dict[str, Any]:
    return transaction["contexts"]["trace"]
