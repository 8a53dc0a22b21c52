"""Sentry Crons for the relay: a check-in monitor that alerts when processing stops.

Every relay run opens a check-in (``in_progress``) and closes it with ``ok`` or
``error`` under the same check-in id. Relay runs are started by a sensor only
when events are pending, so a quiet outbox would look like a stopped relay:
the lag sensor sends a single ``ok`` check-in (a heartbeat) while nothing is
pending, and a run that follows a steady stream for many minutes sends one
after every materialization window it records. Sentry therefore reports a
missed check-in only when work waits and no run finishes or keeps up in time.

Each relay of a code location has its own monitor: ``SENTRY_CRON_MONITOR_SLUG``
(default ``outbox-relay``) for the default relay, ``<slug>-<relay>`` for the
others. The schedule is ``SENTRY_CRON_SCHEDULE`` (crontab) or else an interval
of ``SENTRY_CRON_INTERVAL_MINUTES``; see docs/sentry.md for the other settings.
"""

from __future__ import annotations

from typing import Any

import dagster as dg
import sentry_sdk.crons

from outbox_pipeline.config.settings import RelaySettings


class CronMonitor(dg.Config):
    """One relay's Crons monitor (also the ``cron`` part of the run monitor's resource configuration)."""

    slug: str = "outbox-relay"
    schedule: str | None = None  # a crontab; None: an interval of interval_minutes
    interval_minutes: int = 10
    checkin_margin_minutes: int = 5
    max_runtime_minutes: int = 30
    failure_threshold: int = 2
    recovery_threshold: int = 1

    @classmethod
    def from_settings(cls, settings: RelaySettings, relay_name: str = "default") -> CronMonitor:
        slug = settings.cron_monitor_slug.strip() or "outbox-relay"
        return cls(
            slug=slug if relay_name == "default" else f"{slug}-{relay_name}",
            schedule=settings.cron_schedule,
            interval_minutes=settings.cron_interval_minutes,
            checkin_margin_minutes=settings.cron_checkin_margin_minutes,
            max_runtime_minutes=settings.cron_max_runtime_minutes,
            failure_threshold=settings.cron_failure_threshold,
            recovery_threshold=settings.cron_recovery_threshold,
        )

    @property
    def interval_seconds(self) -> int | None:
        """The check-in interval when the schedule is an interval, else None (crontab)."""
        return None if self.schedule else 60 * self.interval_minutes

    def monitor_config(self) -> dict[str, Any]:
        """Sent with every opening check-in, so Sentry creates or updates the monitor without a click."""
        if self.schedule:
            schedule: dict[str, Any] = {"type": "crontab", "value": self.schedule}
        else:
            schedule = {"type": "interval", "value": self.interval_minutes, "unit": "minute"}
        return {
            "schedule": schedule,
            "checkin_margin": self.checkin_margin_minutes,
            "max_runtime": self.max_runtime_minutes,
            "failure_issue_threshold": self.failure_threshold,
            "recovery_threshold": self.recovery_threshold,
            "timezone": "UTC",
        }

    def open_check_in(self) -> str | None:
        """``in_progress`` for a starting run; returns the check-in id to close it with."""
        return sentry_sdk.crons.capture_checkin(
            monitor_slug=self.slug, status="in_progress", monitor_config=self.monitor_config()
        )

    def close_check_in(self, check_in_id: str | None, ok: bool, duration: float | None = None) -> None:
        sentry_sdk.crons.capture_checkin(
            monitor_slug=self.slug, check_in_id=check_in_id, status="ok" if ok else "error", duration=duration
        )

    def heartbeat(self) -> str | None:
        """A single ``ok`` check-in: nothing is late (nothing is pending, or a following run keeps up)."""
        return sentry_sdk.crons.capture_checkin(monitor_slug=self.slug, status="ok", monitor_config=self.monitor_config())
