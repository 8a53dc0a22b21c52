"""The failure hook on jobs of any shape: partitions, op retries, several causes in one run."""

import dagster as dg

from outbox_pipeline.config.settings import load_settings
from outbox_pipeline.monitoring.run_monitor import RelayRunMonitor
from outbox_pipeline.orchestration.hooks import sentry_on_failure
from outbox_pipeline_tests.monitoring.envelopes import errors, transactions


class LedgerClosed(Exception):
    pass


@dg.op(retry_policy=dg.RetryPolicy(max_retries=2))
def flaky_op():
    raise LedgerClosed("ledger 42 is closed")


@dg.op
def broken_op():
    raise ValueError("bad value 7")


@dg.op
def second_broken_op():
    raise ValueError("bad value 8")


@dg.job(
    hooks={sentry_on_failure},
    executor_def=dg.in_process_executor,
    partitions_def=dg.DailyPartitionsDefinition(start_date="2020-01-01"),
)
def partitioned_job():
    flaky_op()
    broken_op()
    second_broken_op()


def test_partitioned_job_with_retries_and_two_causes(recorder):
    result = partitioned_job.execute_in_process(
        partition_key="2020-01-02", resources={"monitor": RelayRunMonitor.from_settings(load_settings())}, raise_on_error=False
    )

    assert not result.success
    events = {tuple(e["fingerprint"]): e for e in errors(recorder)}
    # Two ValueErrors of one op kind each, and the retried op once, after its last attempt.
    assert set(events) == {
        ("dagster-op-failure", "partitioned_job", "flaky_op", "LedgerClosed"),
        ("dagster-op-failure", "partitioned_job", "broken_op", "ValueError"),
        ("dagster-op-failure", "partitioned_job", "second_broken_op", "ValueError"),
    }
    flaky = events[("dagster-op-failure", "partitioned_job", "flaky_op", "LedgerClosed")]
    assert flaky["tags"]["dagster.retry_number"] == "2"
    assert flaky["tags"]["dagster.partition"] == "2020-01-02"
    assert flaky["exception"]["values"][-1]["value"] == "ledger 42 is closed"
    broken = events[("dagster-op-failure", "partitioned_job", "broken_op", "ValueError")]
    assert broken["tags"]["dagster.retry_number"] == "0"
    assert broken["tags"]["dagster.run_id"] == result.run_id
    assert transactions(recorder) == []  # only the relay job is a transaction
