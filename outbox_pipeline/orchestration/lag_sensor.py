"""Lag alerts: the outbox falls behind, Sentry hears of it once per incident, and of the recovery.

Every tick reads the outbox's counts and compares the age of the oldest
pending event and the number of pending events with two thresholds each
(warning, error). The worse of the two gives the level. An incident starts
when the level leaves ``ok``; Sentry gets one event when it starts, one more
if it escalates from warning to error, none while it stays, and one ``info``
event when the level is back to ``ok``. The incident lives in the sensor's
cursor, so the daemon restarting changes nothing.

Each tick also records the queue size and the lag as Sentry gauges, and while
nothing is pending sends the relay's cron monitor a heartbeat (see crons).

Settings: ``OUTBOX_LAG_WARNING_SECONDS`` (300), ``OUTBOX_LAG_ERROR_SECONDS``
(900), ``OUTBOX_QUEUE_WARNING_SIZE`` (100000), ``OUTBOX_QUEUE_ERROR_SIZE``
(1000000), ``OUTBOX_LAG_SENSOR_INTERVAL_SECONDS`` (60),
``OUTBOX_LAG_SENSOR_ENABLED`` (true). One sensor watches every relay of the code
location, each relay with an incident of its own (tagged ``outbox.relay``).
"""

import dataclasses
import json
import time
import uuid

import dagster as dg
import psycopg
import sentry_sdk
import sentry_sdk.metrics

from outbox_pipeline.config.errors import OutboxPipelineError
from outbox_pipeline.config.settings import RelaySettings
from outbox_pipeline.monitoring.crons import CronMonitor
from outbox_pipeline.monitoring.relay_report import RELAY_JOB, metric_attributes
from outbox_pipeline.monitoring.sentry_setup import flush_sentry, fresh_scope, init_sentry
from outbox_pipeline.orchestration.relay_instance import DEFAULT_RELAY, definition_name
from outbox_pipeline.stores.outbox_store import OutboxCounts
from outbox_pipeline.stores.postgres_connection import translate_postgres_error

SENSOR_NAME = "outbox_lag_sensor"
LEVELS = ("ok", "warning", "error")


@dataclasses.dataclass(frozen=True)
class LagThresholds:
    warning_seconds: float = 300.0
    error_seconds: float = 900.0
    queue_warning_size: int = 100_000
    queue_error_size: int = 1_000_000

    @classmethod
    def from_settings(cls, settings: RelaySettings) -> "LagThresholds":
        # Their order was validated with the rest of the settings.
        return cls(
            warning_seconds=settings.lag_warning_seconds,
            error_seconds=settings.lag_error_seconds,
            queue_warning_size=settings.queue_warning_size,
            queue_error_size=settings.queue_error_size,
        )

    def level(self, counts: OutboxCounts) -> tuple[str, list[str]]:
        """The level and what caused it (``age``, ``queue_size``)."""
        age = counts.oldest_pending_age_seconds or 0.0
        by_age = 2 if age >= self.error_seconds else 1 if age >= self.warning_seconds else 0
        by_size = 2 if counts.pending >= self.queue_error_size else 1 if counts.pending >= self.queue_warning_size else 0
        worst = max(by_age, by_size)
        causes = [name for name, value in (("age", by_age), ("queue_size", by_size)) if worst and value == worst]
        return LEVELS[worst], causes


@dataclasses.dataclass(frozen=True)
class LagState:
    """What the cursor keeps between ticks."""

    level: str = "ok"
    peak: str = "ok"  # the worst level reported in this incident
    incident: str | None = None
    started_at: float | None = None
    last_heartbeat: float | None = None

    @classmethod
    def from_cursor(cls, cursor: str | None) -> "LagState":
        if not cursor:
            return cls()
        try:
            data = json.loads(cursor)
            state = cls(**{f.name: data.get(f.name, f.default) for f in dataclasses.fields(cls)})
        except (ValueError, TypeError):
            return cls()  # an unreadable cursor starts over rather than stopping the alerts
        if state.level not in LEVELS or state.peak not in LEVELS:
            return cls()
        return state

    def to_cursor(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)


@dataclasses.dataclass(frozen=True)
class LagReport:
    kind: str  # "warning", "error" or "recovered"
    incident: str
    causes: tuple[str, ...] = ()
    incident_seconds: float = 0.0
    peak: str = "ok"


def evaluate_lag(state: LagState, level: str, causes: list[str], now: float) -> tuple[LagState, list[LagReport]]:
    """The next state and what to report; no I/O."""
    rank = LEVELS.index
    if level == "ok":
        if state.incident is None:
            return dataclasses.replace(state, level="ok", peak="ok"), []
        report = LagReport("recovered", state.incident, (), now - (state.started_at or now), state.peak)
        return dataclasses.replace(state, level="ok", peak="ok", incident=None, started_at=None), [report]
    if state.incident is None:
        incident = uuid.uuid4().hex[:12]
        new_state = dataclasses.replace(state, level=level, peak=level, incident=incident, started_at=now)
        return new_state, [LagReport(level, incident, tuple(causes), 0.0, level)]
    if rank(level) > rank(state.peak):
        new_state = dataclasses.replace(state, level=level, peak=level)
        return new_state, [LagReport(level, state.incident, tuple(causes), now - (state.started_at or now), level)]
    return dataclasses.replace(state, level=level), []


def _describe(counts: OutboxCounts) -> str:
    age = counts.oldest_pending_age_seconds or 0.0
    return f"{counts.pending} events pending, the oldest {age:.0f} s old"


def send_lag_report(
    report: LagReport, counts: OutboxCounts, thresholds: LagThresholds, relay_job: str = RELAY_JOB, relay_name: str = "default"
) -> str | None:
    with fresh_scope() as scope:
        scope.set_tag("outbox.lag_level", "ok" if report.kind == "recovered" else report.kind)
        scope.set_tag("outbox.incident", report.incident)
        scope.set_tag("dagster.sensor", SENSOR_NAME)
        scope.set_tag("dagster.job", relay_job)
        scope.set_tag("outbox.relay", relay_name)
        scope.set_context(
            "outbox",
            {
                "pending": counts.pending,
                "in_flight": counts.in_flight,
                "retrying": counts.retrying,
                "failed": counts.failed,
                "oldest_pending_age_seconds": counts.oldest_pending_age_seconds,
                "incident_seconds": round(report.incident_seconds, 1),
                "thresholds": dataclasses.asdict(thresholds),
            },
        )
        if report.kind == "recovered":
            scope.set_tag("outbox.lag_peak", report.peak)
            scope.fingerprint = ["outbox-lag-recovered"]
            message = f"Outbox lag recovered after {report.incident_seconds:.0f} s (peak {report.peak}): {_describe(counts)}"
            return sentry_sdk.capture_message(message, level="info")
        scope.set_tag("outbox.lag_cause", "+".join(report.causes))
        scope.fingerprint = ["outbox-lag"]
        limits = (
            f"{thresholds.warning_seconds:g} s / {thresholds.queue_warning_size} events"
            if report.kind == "warning"
            else f"{thresholds.error_seconds:g} s / {thresholds.queue_error_size} events"
        )
        message = f"Outbox lag {report.kind}: {_describe(counts)} ({report.kind} at {limits})"
        return sentry_sdk.capture_message(message, level=report.kind)


def _heartbeat_due(state: LagState, now: float, cron: CronMonitor) -> bool:
    interval = cron.interval_seconds
    every = interval / 2 if interval else 60.0
    return state.last_heartbeat is None or now - state.last_heartbeat >= every


def check_lag(
    state: LagState,
    counts: OutboxCounts,
    settings: RelaySettings,
    now: float,
    *,
    relay_job: str = RELAY_JOB,
    relay_name: str = "default",
) -> tuple[LagState, str]:
    """One tick: report what changed, record the gauges; returns the new state and a summary line."""
    thresholds = LagThresholds.from_settings(settings)
    level, causes = thresholds.level(counts)
    new_state, reports = evaluate_lag(state, level, causes, now)
    summary = f"lag {level}: {_describe(counts)}"
    if not init_sentry(settings.sentry):
        return new_state, summary + " (Sentry is off)"
    attributes = {**metric_attributes(relay_job, settings.sentry_environment), "source": SENSOR_NAME, "relay": relay_name}
    sentry_sdk.metrics.gauge("outbox.queue_size", counts.pending, attributes=attributes)
    sentry_sdk.metrics.gauge(
        "outbox.oldest_pending_age", counts.oldest_pending_age_seconds or 0.0, unit="second", attributes=attributes
    )
    for report in reports:
        send_lag_report(report, counts, thresholds, relay_job, relay_name)
        summary += f"; reported {report.kind} of incident {report.incident}"
    cron = CronMonitor.from_settings(settings, relay_name)
    if counts.pending == 0 and _heartbeat_due(new_state, now, cron):
        cron.heartbeat()
        new_state = dataclasses.replace(new_state, last_heartbeat=now)
    flush_sentry()
    return new_state, summary


def states_from_cursor(cursor: str | None, relay_names: list[str]) -> dict[str, LagState]:
    """Each relay's state; a cursor of one relay's state (as one relay's sensor kept it) is the default relay's."""
    try:
        data = json.loads(cursor) if cursor else {}
    except ValueError:
        data = {}
    if not isinstance(data, dict) or "level" in data:
        data = {DEFAULT_RELAY: data}
    return {name: LagState.from_cursor(json.dumps(data[name]) if isinstance(data.get(name), dict) else None) for name in relay_names}


def build_lag_sensor(settings: RelaySettings, relay_names: list[str]) -> dg.SensorDefinition:
    """One sensor for every relay of the code location, each relay's incident kept apart in the cursor."""
    outbox_keys = {name: definition_name("outbox", name) for name in relay_names}

    @dg.sensor(
        name=SENSOR_NAME,
        minimum_interval_seconds=settings.lag_sensor_interval_seconds,
        default_status=dg.DefaultSensorStatus.RUNNING if settings.lag_sensor_enabled else dg.DefaultSensorStatus.STOPPED,
        required_resource_keys=set(outbox_keys.values()),
        description=(
            f"Reports to Sentry when the oldest pending event or the queue size of a relay ({', '.join(relay_names)}) "
            "passes its threshold, and the recovery: one incident per relay."
        ),
    )
    def outbox_lag_sensor(context: dg.SensorEvaluationContext, **_resources):
        # (Called directly, a sensor also receives its resources as keyword arguments.)
        states = states_from_cursor(context.cursor, relay_names)
        summaries, read = [], 0
        for name, key in outbox_keys.items():
            outbox = getattr(context.resources, key)
            try:
                with outbox.short_lived_store() as store:
                    counts = store.counts(include_processed=False)
            except (psycopg.Error, OutboxPipelineError) as exc:
                # The relay's incident state is kept: the next tick that reads its outbox goes on from it.
                problem = translate_postgres_error(exc, outbox.url or "embedded") if isinstance(exc, psycopg.Error) else exc
                summaries.append(f"{name}: outbox unavailable: {problem}")
                continue
            read += 1
            states[name], summary = check_lag(
                states[name], counts, settings, time.time(), relay_job=definition_name(RELAY_JOB, name), relay_name=name
            )
            summaries.append(summary if len(relay_names) == 1 else f"{name}: {summary}")
        if not read:
            return dg.SkipReason("; ".join(summaries))
        cursor = json.dumps({name: json.loads(state.to_cursor()) for name, state in states.items()}, sort_keys=True)
        return dg.SensorResult(skip_reason="; ".join(summaries), cursor=cursor)

    return outbox_lag_sensor
