"""Run configuration (``dg.Config``) of the relay's op jobs.

Unset fields take the relay's own setting, which its ``outbox`` resource carries
(shown on the job's Resources tab). Jobs carry no default run configuration on
purpose: Dagster would then pin the resources' configuration too, and a run
launched with other resources would silently keep the old ones.
"""

import dagster as dg
from pydantic import Field


class RelayRunConfig(dg.Config):
    batch_size: int | None = Field(
        default=None, ge=1, le=1_000_000, description="Events per batch: one ClickHouse insert each (unset: OUTBOX_BATCH_SIZE)."
    )
    max_batches: int | None = Field(
        default=None, ge=1, description="Stop claiming after this many batches (unset: OUTBOX_MAX_BATCHES_PER_RUN)."
    )
    batches_per_step: int | None = Field(
        default=None, ge=1, description="Batches one load step and its mark step take (unset: OUTBOX_BATCHES_PER_STEP)."
    )
    max_seconds: float | None = Field(
        default=None,
        gt=0,
        description="Stop loading after this many seconds; unloaded batches are released (unset: OUTBOX_MAX_SECONDS_PER_RUN).",
    )


class RequeueConfig(dg.Config):
    event_ids: list[str] = Field(default=[], description="Failed events to put back, by event_id.")
    event_type: str | None = Field(default=None, description="Put back every failed event of this type.")
    all_failed: bool = Field(default=False, description="Put back every failed event.")


class CleanupConfig(dg.Config):
    retention_days: int | None = Field(
        default=None, ge=1, description="Delete processed events created more than this many days ago (unset: OUTBOX_RETENTION_DAYS)."
    )
    chunk_size: int = Field(default=5_000, ge=1, description="Rows per DELETE: each chunk is its own short transaction.")
