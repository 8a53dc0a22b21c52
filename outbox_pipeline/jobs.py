"""Jobs of the project. All run in-process: one process per run, ops in sequence.

In-process execution costs about 0.1 s of overhead per run against about 1 s
per step for the multiprocess executor, keeps one connection per store for the
whole run, and keeps the embedded ClickHouse directory in a single process.
"""

import dagster as dg

from outbox_pipeline.monitoring.hooks import sentry_on_failure
from outbox_pipeline.ops.maintenance_ops import requeue_failed
from outbox_pipeline.ops.relay_ops import extract_outbox_batches, load_batch, mark_batch_processed, report_relay_run
from outbox_pipeline.settings import RelaySettings

# Every relay run carries this tag; dagster.yaml limits how many run at once.
RELAY_TAG = "outbox_pipeline/relay"
# Runs that open ClickHouse carry this tag when it is the embedded chDB engine,
# which only one process can open: dagster.yaml allows one such run at a time.
EMBEDDED_CLICKHOUSE_TAG = "outbox_pipeline/embedded_clickhouse"


def clickhouse_run_tags(settings: RelaySettings | None = None) -> dict[str, str]:
    settings = settings or RelaySettings.from_env()
    return {EMBEDDED_CLICKHOUSE_TAG: "exclusive"} if settings.uses_chdb else {}


def relay_run_tags(settings: RelaySettings | None = None) -> dict[str, str]:
    return {RELAY_TAG: "true", **clickhouse_run_tags(settings)}


@dg.job(
    description="Move pending outbox events into ClickHouse: claim batches, load each, mark each processed.",
    executor_def=dg.in_process_executor,
    hooks={sentry_on_failure},
    tags=relay_run_tags(),
)
def process_outbox_events():
    claimed = extract_outbox_batches()
    marked = claimed.map(lambda batch: mark_batch_processed(batch, load_batch(batch)))
    report_relay_run(marked.collect())


@dg.job(
    description="Put failed events back in line (config: event_ids, event_type or all_failed); the next relay run delivers them.",
    executor_def=dg.in_process_executor,
    hooks={sentry_on_failure},
)
def requeue_failed_events():
    requeue_failed()
