"""Runs that open the embedded ClickHouse, kept one at a time by the run queue.

Only one process can open a chDB directory. In the embedded mode two marks, each
limited to one in dagster.yaml, make the run queue launch such runs one after another:

* the run tag ``EMBEDDED_CLICKHOUSE_TAG`` on every job that opens ClickHouse;
* the concurrency pool ``EMBEDDED_CLICKHOUSE_POOL`` on every op and asset check that
  opens it, enforced per run (``concurrency.pools.granularity: run``). The pool also
  reaches runs that Dagster builds itself and that carry none of our tags, such as
  *Execute checks* on the asset page.

The tag limits runs from the very first one; a pool's limit is written to the instance
the first time the run queue meets the pool. With a ClickHouse server there is
neither tag nor pool: those runs are not limited.
"""

from outbox_pipeline.settings import RelaySettings

EMBEDDED_CLICKHOUSE_TAG = "outbox_pipeline/embedded_clickhouse"
EMBEDDED_CLICKHOUSE_POOL = "outbox_pipeline/embedded_clickhouse"


def clickhouse_run_tags(settings: RelaySettings | None = None) -> dict[str, str]:
    """Tags of a job that opens ClickHouse."""
    settings = settings or RelaySettings.from_env()
    return {EMBEDDED_CLICKHOUSE_TAG: "exclusive"} if settings.uses_chdb else {}


def clickhouse_pool(settings: RelaySettings | None = None) -> str | None:
    """Pool of an op or asset check that opens ClickHouse."""
    settings = settings or RelaySettings.from_env()
    return EMBEDDED_CLICKHOUSE_POOL if settings.uses_chdb else None
