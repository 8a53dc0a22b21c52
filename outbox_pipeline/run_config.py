"""Run configuration (``dg.Config``) with defaults from the environment.

Defaults are read when the code location loads, so the launchpad shows the values
that a run started by the sensor would use.
"""

import dagster as dg
from pydantic import Field

from outbox_pipeline.settings import RelaySettings

_settings = RelaySettings.from_env()


class RelayRunConfig(dg.Config):
    batch_size: int = Field(
        default=_settings.batch_size, ge=1, le=1_000_000, description="Events per batch: one ClickHouse insert each (OUTBOX_BATCH_SIZE)."
    )
    max_batches: int = Field(
        default=_settings.max_batches_per_run, ge=1, description="Stop claiming after this many batches (OUTBOX_MAX_BATCHES_PER_RUN)."
    )
    max_seconds: float = Field(
        default=_settings.max_seconds_per_run,
        gt=0,
        description="Stop loading after this many seconds; unloaded batches are released (OUTBOX_MAX_SECONDS_PER_RUN).",
    )


class RequeueConfig(dg.Config):
    event_ids: list[str] = Field(default=[], description="Failed events to put back, by event_id.")
    event_type: str | None = Field(default=None, description="Put back every failed event of this type.")
    all_failed: bool = Field(default=False, description="Put back every failed event.")


class CleanupConfig(dg.Config):
    retention_days: int = Field(
        default=_settings.retention_days, ge=1, description="Delete processed events created more than this many days ago (OUTBOX_RETENTION_DAYS)."
    )
    chunk_size: int = Field(default=5_000, ge=1, description="Rows per DELETE: each chunk is its own short transaction.")
