"""pytest fixtures for tests that talk to Sentry through the real transport.

The test suite's conftest registers this module as a plugin, so every test can ask for the fixtures.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import sentry_sdk
import sentry_sdk.scope

from outbox_pipeline_tests.support.sentry_recorder import SentryRecorder

__all__ = ["reset_sentry", "reset_sentry_sdk", "sentry_recorder"]


def reset_sentry_sdk() -> None:
    """Drop the active Sentry client and all scope state.

    Through the public scope API: the global, isolation and current scopes lose
    their client and their data, so the next ``sentry_sdk.init`` starts from
    nothing. The old client is closed without waiting so its
    background threads stop and nothing stale reaches the next test's
    server. Integrations stay installed: their ``setup_once`` patches are
    process-wide and look up the *current* client, which is what makes
    re-initialising per test work.
    """
    client = sentry_sdk.get_client()
    if client.is_active():
        try:
            client.close(timeout=0)
        except Exception:  # a broken client must not break teardown
            pass
    for scope in (sentry_sdk.get_global_scope(), sentry_sdk.get_isolation_scope(), sentry_sdk.get_current_scope()):
        scope.set_client(None)
        scope.clear()


@pytest.fixture
def reset_sentry() -> Iterator[None]:
    """Start and end the test with no Sentry client and clean scopes."""
    reset_sentry_sdk()
    try:
        yield
    finally:
        reset_sentry_sdk()


@pytest.fixture
def sentry_recorder(reset_sentry: None) -> Iterator[SentryRecorder]:
    """A running :class:`SentryRecorder`; Sentry is reset before and after
    (the reset runs after the server stops, so no late envelope leaks)."""
    with SentryRecorder() as recorder:
        yield recorder
