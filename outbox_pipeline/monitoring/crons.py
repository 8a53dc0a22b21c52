"""Sentry Crons for the relay: a check-in monitor that alerts when processing stops.

Every relay run opens a check-in (``in_progress``) and closes it with ``ok`` or
``error`` under the same check-in id. Relay runs are started by a sensor only
when events are pending, so a quiet outbox would look like a stopped relay:
the lag sensor sends a single ``ok`` check-in (a heartbeat) while nothing is
pending. Sentry therefore reports a missed check-in only when work waits and
no run finishes in time.

Settings (environment):

* ``SENTRY_CRON_MONITOR_SLUG`` (default ``outbox-relay``);
* ``SENTRY_CRON_SCHEDULE``: a crontab expression; when unset the schedule is
  an interval of ``SENTRY_CRON_INTERVAL_MINUTES`` (default 10);
* ``SENTRY_CRON_CHECKIN_MARGIN_MINUTES`` (5), ``SENTRY_CRON_MAX_RUNTIME_MINUTES``
  (30), ``SENTRY_CRON_FAILURE_THRESHOLD`` (2), ``SENTRY_CRON_RECOVERY_THRESHOLD`` (1).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any, Optional

import sentry_sdk.crons

from outbox_pipeline.settings import parse_number

DEFAULT_SLUG = "outbox-relay"


def _minutes(environ: Mapping[str, str], name: str, default: int) -> int:
    return parse_number(name, environ.get(name), default, int, 1)


def cron_monitor_slug(environ: Mapping[str, str] = os.environ) -> str:
    return (environ.get("SENTRY_CRON_MONITOR_SLUG") or "").strip() or DEFAULT_SLUG


def cron_interval_seconds(environ: Mapping[str, str] = os.environ) -> Optional[int]:
    """The check-in interval when the schedule is an interval, else None (crontab)."""
    if (environ.get("SENTRY_CRON_SCHEDULE") or "").strip():
        return None
    return 60 * _minutes(environ, "SENTRY_CRON_INTERVAL_MINUTES", 10)


def cron_monitor_config(environ: Mapping[str, str] = os.environ) -> dict[str, Any]:
    """The monitor's configuration; sent with every opening check-in, so Sentry
    creates or updates the monitor without a click."""
    crontab = (environ.get("SENTRY_CRON_SCHEDULE") or "").strip()
    if crontab:
        if len(crontab.split()) != 5:
            raise ValueError(f"SENTRY_CRON_SCHEDULE={crontab!r} is not a 5-field crontab expression")
        schedule: dict[str, Any] = {"type": "crontab", "value": crontab}
    else:
        schedule = {"type": "interval", "value": _minutes(environ, "SENTRY_CRON_INTERVAL_MINUTES", 10), "unit": "minute"}
    return {
        "schedule": schedule,
        "checkin_margin": _minutes(environ, "SENTRY_CRON_CHECKIN_MARGIN_MINUTES", 5),
        "max_runtime": _minutes(environ, "SENTRY_CRON_MAX_RUNTIME_MINUTES", 30),
        "failure_issue_threshold": _minutes(environ, "SENTRY_CRON_FAILURE_THRESHOLD", 2),
        "recovery_threshold": _minutes(environ, "SENTRY_CRON_RECOVERY_THRESHOLD", 1),
        "timezone": "UTC",
    }


def open_check_in() -> Optional[str]:
    """``in_progress`` for a starting run; returns the check-in id to close it with."""
    return sentry_sdk.crons.capture_checkin(
        monitor_slug=cron_monitor_slug(), status="in_progress", monitor_config=cron_monitor_config()
    )


def close_check_in(check_in_id: Optional[str], ok: bool, duration: Optional[float] = None) -> None:
    sentry_sdk.crons.capture_checkin(
        monitor_slug=cron_monitor_slug(),
        check_in_id=check_in_id,
        status="ok" if ok else "error",
        duration=duration,
    )


def idle_heartbeat() -> Optional[str]:
    """A single ``ok`` check-in: nothing is pending, so nothing is late."""
    return sentry_sdk.crons.capture_checkin(
        monitor_slug=cron_monitor_slug(), status="ok", monitor_config=cron_monitor_config()
    )
