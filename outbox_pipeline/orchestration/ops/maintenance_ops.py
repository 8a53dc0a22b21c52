"""Ops that operators run by hand from the Dagster UI."""

import dagster as dg

from outbox_pipeline.orchestration.resources import OutboxDatabaseResource
from outbox_pipeline.orchestration.run_config import RequeueConfig


@dg.op(description="Put failed events back in line for delivery: by event id, by event type, or all.")
def requeue_failed(context: dg.OpExecutionContext, config: RequeueConfig, outbox: OutboxDatabaseResource) -> int:
    if not (config.event_ids or config.event_type or config.all_failed):
        raise dg.Failure("name event_ids, an event_type, or set all_failed: true")
    count = outbox.store().requeue_failed(
        event_ids=config.event_ids, event_type=config.event_type, all_failed=config.all_failed
    )
    context.log.info(f"requeued {count} failed events; the next relay run delivers them")
    context.add_output_metadata({"requeued": count})
    return count
