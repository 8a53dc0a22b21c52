"""Configuration from the environment (12-factor).

Every knob has a default that runs on a laptop with nothing installed: the outbox
lives in an embedded PostgreSQL server and ClickHouse is chDB, both under
``OUTBOX_STATE_DIR``. Setting ``OUTBOX_DATABASE_URL`` or ``CLICKHOUSE_URL``
switches to real servers.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from pathlib import Path

from outbox_pipeline.errors import ConfigurationError


_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


def parse_bool(name: str, value: str | None, default: bool) -> bool:
    if value is None:
        return default
    lowered = value.strip().lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    raise ConfigurationError(f"{name}={value!r} is not a boolean; use true or false")


def parse_number(name: str, value: str | None, default, kind=float, minimum=0, *, exclusive: bool = False):
    """``value`` of variable ``name`` as ``kind``; ``default`` when unset; at least (or above) ``minimum``."""
    if value is None or value.strip() == "":
        return default
    try:
        parsed = kind(value.strip())
    except ValueError:
        noun = "whole number" if kind is int else "number"
        raise ConfigurationError(f"{name}={value!r} is not a {noun}") from None
    if exclusive and parsed <= minimum:
        raise ConfigurationError(f"{name}={value!r} must be greater than {minimum}")
    if parsed < minimum:
        raise ConfigurationError(f"{name}={value!r} must be at least {minimum}")
    return parsed


@dataclasses.dataclass(frozen=True)
class RelaySettings:
    """Where the stores are and how the relay behaves, read once from the environment."""

    state_dir: Path
    outbox_database_url: str | None
    clickhouse_url: str
    environment: str
    batch_size: int
    max_batches_per_run: int
    max_seconds_per_run: float
    lease_seconds: float
    max_event_attempts: int
    event_retry_base_seconds: float
    max_event_bytes: int
    transient_retry_attempts: int
    transient_retry_base_seconds: float
    sensor_interval_seconds: int
    sensor_enabled: bool
    schedule_enabled: bool
    schedule_cron: str
    retention_days: int
    replay_start_date: str
    low_latency: bool
    clickhouse_busy_wait_seconds: float

    @property
    def uses_embedded_postgres(self) -> bool:
        return not self.outbox_database_url

    @property
    def uses_chdb(self) -> bool:
        return self.clickhouse_url.startswith("chdb:")

    @property
    def embedded_postgres_dir(self) -> Path:
        return self.state_dir / "postgres"

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> "RelaySettings":
        env = os.environ if environ is None else environ
        state_dir = Path(env.get("OUTBOX_STATE_DIR") or ".outbox_state").expanduser().resolve()
        clickhouse_url = env.get("CLICKHOUSE_URL") or f"chdb://{state_dir / 'clickhouse'}"
        return cls(
            state_dir=state_dir,
            outbox_database_url=env.get("OUTBOX_DATABASE_URL") or None,
            clickhouse_url=clickhouse_url,
            environment=env.get("OUTBOX_ENVIRONMENT") or env.get("SENTRY_CONFIG_ENVIRONMENT") or "development",
            batch_size=parse_number("OUTBOX_BATCH_SIZE", env.get("OUTBOX_BATCH_SIZE"), 100_000, int, 1),
            max_batches_per_run=parse_number(
                "OUTBOX_MAX_BATCHES_PER_RUN", env.get("OUTBOX_MAX_BATCHES_PER_RUN"), 50, int, 1
            ),
            max_seconds_per_run=parse_number(
                "OUTBOX_MAX_SECONDS_PER_RUN", env.get("OUTBOX_MAX_SECONDS_PER_RUN"), 300.0, float, 1.0
            ),
            lease_seconds=parse_number("OUTBOX_LEASE_SECONDS", env.get("OUTBOX_LEASE_SECONDS"), 300.0, float, 0.1),
            max_event_attempts=parse_number(
                "OUTBOX_MAX_EVENT_ATTEMPTS", env.get("OUTBOX_MAX_EVENT_ATTEMPTS"), 5, int, 1
            ),
            event_retry_base_seconds=parse_number(
                "OUTBOX_EVENT_RETRY_BASE_SECONDS", env.get("OUTBOX_EVENT_RETRY_BASE_SECONDS"), 30.0, float, 0.0
            ),
            max_event_bytes=parse_number(
                "OUTBOX_MAX_EVENT_BYTES", env.get("OUTBOX_MAX_EVENT_BYTES"), 1_048_576, int, 1
            ),
            transient_retry_attempts=parse_number(
                "OUTBOX_RETRY_ATTEMPTS", env.get("OUTBOX_RETRY_ATTEMPTS"), 5, int, 1
            ),
            transient_retry_base_seconds=parse_number(
                "OUTBOX_RETRY_BASE_SECONDS", env.get("OUTBOX_RETRY_BASE_SECONDS"), 0.5, float, 0.0
            ),
            sensor_interval_seconds=parse_number(
                "OUTBOX_SENSOR_INTERVAL_SECONDS", env.get("OUTBOX_SENSOR_INTERVAL_SECONDS"), 5, int, 1
            ),
            sensor_enabled=parse_bool("OUTBOX_SENSOR_ENABLED", env.get("OUTBOX_SENSOR_ENABLED"), True),
            schedule_enabled=parse_bool("OUTBOX_SCHEDULE_ENABLED", env.get("OUTBOX_SCHEDULE_ENABLED"), False),
            schedule_cron=env.get("OUTBOX_SCHEDULE_CRON") or "* * * * *",
            retention_days=parse_number("OUTBOX_RETENTION_DAYS", env.get("OUTBOX_RETENTION_DAYS"), 30, int, 1),
            replay_start_date=env.get("OUTBOX_REPLAY_START_DATE") or "2026-01-01",
            low_latency=parse_bool("OUTBOX_LOW_LATENCY", env.get("OUTBOX_LOW_LATENCY"), False),
            clickhouse_busy_wait_seconds=parse_number(
                "OUTBOX_CLICKHOUSE_BUSY_WAIT_SECONDS", env.get("OUTBOX_CLICKHOUSE_BUSY_WAIT_SECONDS"), 10.0, float, 0.0
            ),
        )
