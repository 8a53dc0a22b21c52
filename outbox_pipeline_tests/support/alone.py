"""``@pytest.mark.alone``: under pytest-xdist, no other test of the run goes on while this one runs (pytest plugin).

For tests that measure a time on the machine they share (scripts/dev stops within 15 s): other workers'
tests would be measured with them. Every test holds a shared lock on a file of this test run from its
setup to its teardown; an ``alone`` test holds it exclusively, so it starts once the tests in progress on
the other workers have ended, and theirs wait until it ends. Each test passes a second lock (a turnstile)
before it takes its shared one, and a waiting ``alone`` test holds that one: new tests do not keep it waiting.
``alone`` tests are collected first, while the other workers are on their first tests.
Without xdist (``-n 0``) nothing is locked.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path

import pytest


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "alone: no other test runs beside this one under pytest-xdist (it measures a time)")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    items.sort(key=lambda item: item.get_closest_marker("alone") is None)  # stable: the order is otherwise kept


@contextlib.contextmanager
def _held(directory: Path, *, alone: bool) -> Iterator[None]:
    with open(directory / "tests.turnstile", "a") as turnstile, open(directory / "tests.lock", "a") as lock:
        fcntl.flock(turnstile, fcntl.LOCK_EX)
        try:
            fcntl.flock(lock, fcntl.LOCK_EX if alone else fcntl.LOCK_SH)
        finally:
            fcntl.flock(turnstile, fcntl.LOCK_UN)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None):
    if "PYTEST_XDIST_WORKER" not in os.environ:
        return (yield)
    # The workers' temporary directories share this run's one (pytest-of-<user>/pytest-<n>), which pytest cleans up.
    directory = item.config._tmp_path_factory.getbasetemp().parent
    with _held(directory, alone=item.get_closest_marker("alone") is not None):
        return (yield)
