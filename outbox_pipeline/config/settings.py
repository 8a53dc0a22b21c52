"""Every setting of the project, read from the environment and validated in one place (12-factor).

Each variable has a default that runs on a laptop with nothing installed: the
outbox lives in an embedded PostgreSQL server and ClickHouse is chDB, both under
``OUTBOX_STATE_DIR``. ``load_settings()`` reads the environment once per code
location; what it returns is handed to the relay instances, their resources,
ops and sensors, which never read ``os.environ`` themselves. An invalid value
raises :class:`ConfigurationError` with one line naming the variable.
"""

from __future__ import annotations

import datetime as dt
import functools
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, Self

import pydantic
from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from outbox_pipeline.config.errors import ConfigurationError

PACKAGE_NAME = "outbox-pipeline"
UNKNOWN_VERSION = "0.0.0+unknown"


def default_release() -> str:
    try:
        version = metadata.version(PACKAGE_NAME)
    except metadata.PackageNotFoundError:
        version = UNKNOWN_VERSION
    return f"{PACKAGE_NAME}@{version}"


@dataclass(frozen=True)
class SentrySettings:
    # repr=False: the DSN carries the project key; settings get logged.
    dsn: str | None = field(default=None, repr=False)
    environment: str = "development"
    release: str = field(default_factory=default_release)
    debug: bool = False
    traces_sample_rate: float = 1.0
    send_event_payloads: bool = False
    flush_timeout_seconds: float = 2.0

    def __post_init__(self) -> None:
        if not 0.0 <= self.traces_sample_rate <= 1.0:
            raise ValueError(f"traces_sample_rate must be within [0, 1], got {self.traces_sample_rate}")
        if self.flush_timeout_seconds <= 0:
            raise ValueError(f"flush_timeout_seconds must be > 0, got {self.flush_timeout_seconds}")

    @property
    def enabled(self) -> bool:
        """Sentry runs only with a DSN and never in DEBUG (local development)."""
        return bool(self.dsn) and not self.debug

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> SentrySettings:
        """The Sentry part of the project's settings (one parser for every variable)."""
        return load_settings(environ).sentry


def validate_cron(variable: str, value: str) -> str:
    """A five-field cron expression as Dagster accepts it, or one line naming the variable."""
    import dagster as dg

    error = f"{variable}={value!r} is not a cron expression of five fields, such as '*/5 * * * *'"
    if len(value.split()) != 5:
        raise ConfigurationError(error)
    try:
        # Dagster's own validation, through its public API.
        dg.ScheduleDefinition(name="cron_validation", cron_schedule=value, job_name="cron_validation")
    except dg.DagsterInvalidDefinitionError:
        raise ConfigurationError(error) from None
    return value


def _env(name: str, default: Any, description: str, **constraints: Any) -> Any:
    return Field(default, validation_alias=name, description=description, **constraints)


class ProducerSettings(BaseSettings):
    """The variables the producer API reads in the application's own process, and only those."""

    model_config = SettingsConfigDict(env_ignore_empty=True, extra="ignore", frozen=True, case_sensitive=True)

    environment_setting: str | None = _env(
        "OUTBOX_ENVIRONMENT", None, "Default `environment` of published events; unset: `SENTRY_CONFIG_ENVIRONMENT`."
    )
    sentry_environment: str = _env(
        "SENTRY_CONFIG_ENVIRONMENT",
        "development",
        "Sentry environment of everything sent, and the default `environment` of published events.",
    )
    max_event_bytes: int = _env("OUTBOX_MAX_EVENT_BYTES", 1_048_576, "The producer refuses larger payloads (`EventRejectedError`).", ge=1)

    @property
    def environment(self) -> str:
        return self.environment_setting or self.sentry_environment

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Self:
        """The settings of ``environ`` (default: this process's environment), or one ConfigurationError line."""
        try:
            if environ is None:
                return cls()
            names = {str(field.validation_alias) for field in cls.model_fields.values()}
            return cls.model_validate({k: v for k, v in environ.items() if k in names and v.strip()})
        except pydantic.ValidationError as exc:
            raise ConfigurationError(describe_validation_error(exc)) from None


class RelaySettings(ProducerSettings):
    """All variables, by their environment names; see ``.env.example`` and docs/configuration.md."""

    # -- stores ---------------------------------------------------------------------------
    outbox_database_url: str | None = Field(
        None,
        validation_alias="OUTBOX_DATABASE_URL",
        repr=False,
        description="`postgresql://user:password@host:5432/db` of the outbox. Unset: an embedded PostgreSQL under `OUTBOX_STATE_DIR/postgres`, started on first use (`outbox-pipeline start`, or any command, sensor or run but `status`) and running until `outbox-pipeline stop`.",
    )
    clickhouse_url_setting: str | None = Field(
        None,
        validation_alias="CLICKHOUSE_URL",
        repr=False,
        description="`http(s)://user:password@host:8123/database` for a server, `chdb:///absolute/path` for the embedded engine. Unset: `chdb://$OUTBOX_STATE_DIR/clickhouse`.",
    )
    state_dir: Path = _env(
        "OUTBOX_STATE_DIR", Path(".outbox_state"), "Local state of the embedded defaults (PostgreSQL data and the chDB directory)."
    )
    clickhouse_busy_wait_seconds: float = _env(
        "OUTBOX_CLICKHOUSE_BUSY_WAIT_SECONDS",
        10.0,
        "How long a command waits for the embedded ClickHouse directory while a run holds it.",
        ge=0,
    )

    event_classes_setting: str = _env(
        "OUTBOX_EVENT_CLASSES", "outbox_pipeline.producer.demo_events",
        "Comma-separated modules (or module:Class) whose OutboxEvent classes get typed tables; none: no typed tables.",
    )

    # -- batches and runs -------------------------------------------------------------------
    batch_size: int = _env(
        "OUTBOX_BATCH_SIZE",
        100_000,
        "Events per batch, one ClickHouse insert each (ClickHouse favours 10k–100k rows per insert; fewer, larger batches also mean fewer Dagster steps).",
        ge=1,
        le=1_000_000,
    )
    max_batches_per_run: int = _env("OUTBOX_MAX_BATCHES_PER_RUN", 50, "A run claims at most this many batches.", ge=1)
    batches_per_step: int = _env(
        "OUTBOX_BATCHES_PER_STEP",
        10,
        "Batches one `load_batch` step and its `mark_batch_processed` step take (each batch keeps its own insert, token, lease and mark): fewer Dagster steps per run.",
        ge=1,
    )
    max_seconds_per_run: float = _env(
        "OUTBOX_MAX_SECONDS_PER_RUN", 300.0, "A run loads no more batches after this; the rest is released at once.", ge=1
    )
    lease_seconds: float = _env("OUTBOX_LEASE_SECONDS", 300.0, "A batch claimed by a run that died is taken again after this.", ge=0.1)
    transient_retry_attempts: int = _env(
        "OUTBOX_RETRY_ATTEMPTS", 5, "Calls in all for a transient error (PostgreSQL or ClickHouse unreachable, 5xx, timeouts).", ge=1
    )
    transient_retry_base_seconds: float = _env(
        "OUTBOX_RETRY_BASE_SECONDS", 0.5, "Backoff base for transient errors (exponential, full jitter, capped at 30 s).", ge=0
    )
    max_event_attempts: int = _env(
        "OUTBOX_MAX_EVENT_ATTEMPTS", 5, "Attempts for an event ClickHouse rejects; then it is `failed` until requeued.", ge=1
    )
    event_retry_base_seconds: float = _env(
        "OUTBOX_EVENT_RETRY_BASE_SECONDS",
        30.0,
        "Backoff base for an event ClickHouse rejects (exponential with jitter, capped at 1 h).",
        ge=0,
    )

    # -- automation ---------------------------------------------------------------------------
    sensor_enabled: bool = _env("OUTBOX_SENSOR_ENABLED", True, "Whether the pending-work sensor `outbox_pending_sensor` runs by default.")
    sensor_interval_seconds: int = _env("OUTBOX_SENSOR_INTERVAL_SECONDS", 5, "Seconds between pending-work checks.", ge=1)
    schedule_enabled: bool = _env(
        "OUTBOX_SCHEDULE_ENABLED", False, "Whether the fixed-cadence relay schedule `process_outbox_events_schedule` runs by default."
    )
    schedule_cron: str = _env("OUTBOX_SCHEDULE_CRON", "* * * * *", "Cron of the fixed-cadence relay schedule (UTC).")
    cleanup_cron: str = _env("OUTBOX_CLEANUP_CRON", "30 3 * * *", "Cron of the daily retention run, `cleanup_outbox` (UTC).")
    check_cron: str = _env("OUTBOX_CHECK_CRON", "*/15 * * * *", "Cron of the asset checks of `event_log`, job `check_event_log` (UTC).")
    retention_days: int = _env(
        "OUTBOX_RETENTION_DAYS",
        3,
        "`cleanup_outbox` drops the days of delivered events older than this; replays are refused for older days. The outbox "
        "keeps what is not yet delivered plus a window to replay from (a weekend's gap found on Monday); ClickHouse is the archive.",
        ge=1,
    )
    replay_start_date: dt.date = _env("OUTBOX_REPLAY_START_DATE", dt.date(2026, 1, 1), "First partition (day) of `replay_outbox_events`.")
    low_latency: bool = _env(
        "OUTBOX_LOW_LATENCY",
        False,
        "Sub-second delivery through one long LISTEN/NOTIFY run (`relay_low_latency`); use it with a ClickHouse server.",
    )

    # -- following a steady stream (one long run instead of a run every few seconds) -------------
    follow_seconds: float = _env(
        "OUTBOX_FOLLOW_SECONDS",
        1200.0,
        "How long a relay run keeps relaying new events after its backlog; 0: runs end with their backlog.",
        ge=0,
    )
    follow_quiet_seconds: float = _env(
        "OUTBOX_FOLLOW_QUIET_SECONDS", 60.0, "A following run ends once no event arrived for this long.", gt=0
    )
    follow_interval_seconds: float = _env(
        "OUTBOX_FOLLOW_INTERVAL_SECONDS", 2.0, "A following run looks for new events (and loads them) this often.", gt=0
    )
    materialization_window_seconds: float = _env(
        "OUTBOX_MATERIALIZATION_WINDOW_SECONDS", 300.0, "A following run records one `event_log` materialization per window.", gt=0
    )

    # -- retention of Dagster's own run history --------------------------------------------------
    run_retention_hours: float = _env(
        "OUTBOX_RUN_RETENTION_HOURS", 24.0, "`prune_dagster_runs` deletes the relay's successful runs older than this.", gt=0
    )
    failed_run_retention_days: float = _env(
        "OUTBOX_FAILED_RUN_RETENTION_DAYS", 30.0, "`prune_dagster_runs` deletes the relay's failed and canceled runs older than this.", gt=0
    )
    prune_cron: str = _env("OUTBOX_PRUNE_CRON", "5 * * * *", "Cron of the run-history pruning and hourly rollups (UTC).")
    prune_enabled: bool = _env("OUTBOX_PRUNE_ENABLED", True, "Whether the pruning schedule `prune_dagster_runs_schedule` runs by default.")
    freshness_max_lag_seconds: float = _env("OUTBOX_FRESHNESS_MAX_LAG_SECONDS", 300.0, "The `freshness` check fails past this lag.", gt=0)

    # -- lag alerts -----------------------------------------------------------------------------
    lag_warning_seconds: float = _env(
        "OUTBOX_LAG_WARNING_SECONDS", 300.0, "Age of the oldest pending event that raises a lag warning.", gt=0
    )
    lag_error_seconds: float = _env("OUTBOX_LAG_ERROR_SECONDS", 900.0, "Age of the oldest pending event that raises a lag error.", gt=0)
    queue_warning_size: int = _env("OUTBOX_QUEUE_WARNING_SIZE", 100_000, "Pending events that raise a lag warning.", gt=0)
    queue_error_size: int = _env("OUTBOX_QUEUE_ERROR_SIZE", 1_000_000, "Pending events that raise a lag error.", gt=0)
    lag_sensor_enabled: bool = _env("OUTBOX_LAG_SENSOR_ENABLED", True, "Whether the lag sensor `outbox_lag_sensor` runs by default.")
    lag_sensor_interval_seconds: int = _env("OUTBOX_LAG_SENSOR_INTERVAL_SECONDS", 60, "How often the lag sensor looks, in seconds.", gt=0)

    # -- Sentry -----------------------------------------------------------------------------------
    sentry_dsn: str | None = Field(
        None, validation_alias="SENTRY_CONFIG_DSN", repr=False, description="Sentry project DSN. Unset: nothing is sent."
    )
    debug: bool = _env("DEBUG", False, "`true` turns Sentry off even with a DSN.")
    sentry_traces_sample_rate: float = _env("SENTRY_TRACES_SAMPLE_RATE", 1.0, "Share of relay runs sent as transactions.", ge=0, le=1)
    sentry_send_event_payloads: bool = _env(
        "SENTRY_SEND_EVENT_PAYLOADS", False, "`true` lets events' `event_context` (the outbox payload) reach Sentry."
    )
    sentry_flush_timeout_seconds: float = _env(
        "SENTRY_FLUSH_TIMEOUT_SECONDS", 2.0, "The longest a run waits for Sentry at its end (also each request's timeout).", gt=0
    )
    cron_monitor_slug: str = _env("SENTRY_CRON_MONITOR_SLUG", "outbox-relay", "Slug of the Crons monitor.")
    cron_schedule: str | None = _env(
        "SENTRY_CRON_SCHEDULE", None, "Crontab schedule of the Crons monitor; unset: an interval of `SENTRY_CRON_INTERVAL_MINUTES`."
    )
    cron_interval_minutes: int = _env(
        "SENTRY_CRON_INTERVAL_MINUTES", 10, "Interval of the Crons monitor when `SENTRY_CRON_SCHEDULE` is unset.", ge=1
    )
    cron_checkin_margin_minutes: int = _env("SENTRY_CRON_CHECKIN_MARGIN_MINUTES", 5, "How late a check-in may be.", ge=1)
    cron_max_runtime_minutes: int = _env("SENTRY_CRON_MAX_RUNTIME_MINUTES", 30, "How long a run may stay in progress.", ge=1)
    cron_failure_threshold: int = _env("SENTRY_CRON_FAILURE_THRESHOLD", 2, "Consecutive failed check-ins that open the Crons issue.", ge=1)
    cron_recovery_threshold: int = _env("SENTRY_CRON_RECOVERY_THRESHOLD", 1, "Consecutive good check-ins that resolve it.", ge=1)

    # -- validation --------------------------------------------------------------------------------

    @pydantic.field_validator("outbox_database_url")
    @classmethod
    def _postgres_url(cls, value: str | None) -> str | None:
        if value is not None:
            from outbox_pipeline.config.urls import validate_postgres_url

            validate_postgres_url(value)
        return value

    @pydantic.field_validator("clickhouse_url_setting")
    @classmethod
    def _clickhouse_url(cls, value: str | None) -> str | None:
        if value is not None:
            from outbox_pipeline.config.urls import validate_clickhouse_url

            validate_clickhouse_url(value)
        return value

    @pydantic.field_validator("state_dir")
    @classmethod
    def _absolute(cls, value: Path) -> Path:
        return value.expanduser().resolve()

    @pydantic.field_validator("schedule_cron", "cleanup_cron", "check_cron", "prune_cron", "cron_schedule")
    @classmethod
    def _cron(cls, value: str | None, info: pydantic.ValidationInfo) -> str | None:
        if value is None:
            return None
        alias = cls.model_fields[info.field_name].validation_alias
        return validate_cron(str(alias), value.strip())

    @pydantic.model_validator(mode="after")
    def _ordered_thresholds(self) -> RelaySettings:
        if self.lag_error_seconds < self.lag_warning_seconds:
            raise ConfigurationError(
                "OUTBOX_LAG_ERROR_SECONDS must not be below OUTBOX_LAG_WARNING_SECONDS "
                f"({self.lag_error_seconds:g} < {self.lag_warning_seconds:g})"
            )
        if self.queue_error_size < self.queue_warning_size:
            raise ConfigurationError(
                f"OUTBOX_QUEUE_ERROR_SIZE must not be below OUTBOX_QUEUE_WARNING_SIZE ({self.queue_error_size} < {self.queue_warning_size})"
            )
        return self

    # -- derived values ---------------------------------------------------------------------------

    @property
    def clickhouse_url(self) -> str:
        return self.clickhouse_url_setting or f"chdb://{self.state_dir / 'clickhouse'}"

    @property
    def event_classes(self) -> tuple[str, ...]:
        """The registered event class paths of OUTBOX_EVENT_CLASSES (empty for ``none``)."""
        if self.event_classes_setting.strip().lower() == "none":
            return ()
        return tuple(path.strip() for path in self.event_classes_setting.split(",") if path.strip())

    @property
    def uses_embedded_postgres(self) -> bool:
        return not self.outbox_database_url

    @property
    def uses_chdb(self) -> bool:
        return self.clickhouse_url.startswith("chdb:")

    @property
    def embedded_postgres_dir(self) -> Path:
        return self.state_dir / "postgres"

    @property
    def sentry(self) -> SentrySettings:
        return SentrySettings(
            dsn=self.sentry_dsn,
            environment=self.sentry_environment,
            debug=self.debug,
            traces_sample_rate=self.sentry_traces_sample_rate,
            send_event_payloads=self.sentry_send_event_payloads,
            flush_timeout_seconds=self.sentry_flush_timeout_seconds,
        )


def describe_validation_error(exc: pydantic.ValidationError) -> str:
    """One line naming each offending variable and its value."""
    problems = []
    for error in exc.errors():
        variable = ".".join(str(part) for part in error["loc"]) or "configuration"
        message = error["msg"].removeprefix("Value error, ")
        if message.startswith(variable) or not error["loc"]:
            problems.append(message)
        else:
            problems.append(f"{variable}={error['input']!r}: {message}")
    return "; ".join(problems)


def load_settings(environ: Mapping[str, str] | None = None) -> RelaySettings:
    """Read and validate every variable (``environ`` defaults to ``os.environ``)."""
    return RelaySettings.from_env(environ)


@functools.cache
def code_location_settings() -> RelaySettings:
    """The settings of this process's code location: read once, shared by every relay in it."""
    return load_settings()


@functools.cache
def producer_settings() -> ProducerSettings:
    """The producer's variables in this process, read once."""
    return ProducerSettings.from_env()
