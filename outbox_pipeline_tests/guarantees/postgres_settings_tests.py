"""Events reach ClickHouse as they were published, whatever the outbox database's own settings.

The relay hands PostgreSQL's COPY output to ClickHouse as CSV, so settings that change COPY's text
change what ClickHouse reads: a database set to `DateStyle = 'SQL, MDY'` writes 1 February as
02/01/2026, which ClickHouse reads as 2 January; another client encoding changes the payload's bytes.
The settings are the database's defaults (ALTER DATABASE … SET), as a DBA would leave them.
"""

import datetime as dt

import psycopg
import pytest

from outbox_pipeline_tests.conftest import event_log_store
from outbox_pipeline_tests.operations.support import publish_on
from outbox_pipeline_tests.support.relay_runs import run_relay

DAY = dt.date(2026, 2, 1)  # day and month both at most 12: read the other way round, still a date


@pytest.mark.parametrize(
    "setting", ["DateStyle = 'SQL, MDY'", "DateStyle = 'German'", "DateStyle = 'Postgres, DMY'", "client_encoding = 'LATIN1'", "default_transaction_isolation = 'serializable'"]
)
def test_dates_and_payloads_arrive_unchanged(relay_env, setting):
    url = relay_env["OUTBOX_DATABASE_URL"]
    with psycopg.connect(url, autocommit=True) as conn:
        database = conn.info.dbname
        conn.execute(f'ALTER DATABASE "{database}" SET {setting}')
    published = publish_on(url, DAY, 50)

    assert run_relay().success

    with event_log_store(relay_env["CLICKHOUSE_URL"]) as event_log:
        rows = event_log.client.query(
            "SELECT toString(event_id), event_date_time, event_context FROM event_log ORDER BY event_date_time"
        ).result_rows
    expected = [(str(e.event_id), e.event_date_time.replace(tzinfo=None), e.context) for e in published]
    assert [(event_id, when.replace(tzinfo=None), context) for event_id, when, context in rows] == expected
