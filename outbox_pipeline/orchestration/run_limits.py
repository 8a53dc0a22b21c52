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

EMBEDDED_CLICKHOUSE_TAG = "outbox_pipeline/embedded_clickhouse"
EMBEDDED_CLICKHOUSE_POOL = "outbox_pipeline/embedded_clickhouse"


def clickhouse_run_tags(uses_chdb: bool) -> dict[str, str]:
    """Tags of a job that opens ClickHouse."""
    return {EMBEDDED_CLICKHOUSE_TAG: "exclusive"} if uses_chdb else {}


def clickhouse_pool(uses_chdb: bool) -> str | None:
    """Pool of an op or asset check that opens ClickHouse."""
    return EMBEDDED_CLICKHOUSE_POOL if uses_chdb else None


def shared_ops_pool() -> str | None:
    """Pool of the ops every relay of the code location shares: the default relay's ClickHouse decides."""
    from outbox_pipeline.config.settings import code_location_settings

    return clickhouse_pool(code_location_settings().uses_chdb)
