"""The chDB-backed ClickHouse HTTP test server, driven by the real clickhouse-connect HTTP client."""

from __future__ import annotations

import datetime as dt
import subprocess
import sys
import textwrap
import time
import uuid

import clickhouse_connect
import pytest
from clickhouse_connect.driver.exceptions import DatabaseError, OperationalError

from outbox_pipeline_tests.support.clickhouse_http_server import (
    ClickHouseHttpServerProcess,
    _analyze_sql,
    clear_faults,
    get_faults,
    running_clickhouse_http_server,
    set_faults,
)

EVENTS_DDL = """
CREATE TABLE {table}
(
    event_id UUID,
    event_type LowCardinality(String),
    occurred_at DateTime64(6, 'UTC'),
    payload String,
    attempt Int32,
    CONSTRAINT attempt_positive CHECK attempt > 0
)
ENGINE = MergeTree
ORDER BY event_id
SETTINGS non_replicated_deduplication_window = 100
"""
COLUMNS = ["event_id", "event_type", "occurred_at", "payload", "attempt"]
# On one worker under pytest-xdist: the module-scoped server process is then started once, not once per worker.
pytestmark = pytest.mark.xdist_group("clickhouse_http_server")


def _rows(count: int, start: int = 0) -> list[list[object]]:
    base = dt.datetime(2024, 5, 6, 7, 8, 9, 123456, tzinfo=dt.UTC)
    return [
        [
            uuid.UUID(int=start + i + 1),
            "order.created" if i % 2 else "order.paid",
            base + dt.timedelta(microseconds=i),
            f'{{"n": {start + i}, "text": "héllo\\tworld"}}',
            1,
        ]
        for i in range(count)
    ]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with ClickHouseHttpServerProcess(tmp_path_factory.mktemp("chdb") / "data") as process:
        yield process


@pytest.fixture(scope="module")
def server_url(server):
    return server.url


@pytest.fixture(autouse=True)
def _no_leftover_faults(request):
    yield
    if "server_url" in request.fixturenames:
        clear_faults(request.getfixturevalue("server_url"))


@pytest.fixture
def client(server_url):
    ch = clickhouse_connect.get_client(dsn=server_url)
    yield ch
    ch.close()


@pytest.fixture
def events_table(client):
    table = f"events_{uuid.uuid4().hex[:8]}"
    client.command(EVENTS_DDL.format(table=table))
    return table


def test_client_connects_with_default_settings(client, server_url):
    assert client.ping()
    assert client.server_version == client.command("SELECT version()")
    assert client.command("SELECT currentDatabase()") == "default"
    assert client.command("SELECT 1 + 1") == 2


def test_insert_is_deduplicated_by_token_and_reads_back_field_by_field(client, events_table):
    rows = _rows(3)
    client.insert(events_table, rows, column_names=COLUMNS, settings={"insert_deduplication_token": "batch-1"})
    assert client.command(f"SELECT count() FROM {events_table}") == 3

    # A retried batch carries the same token: the server drops it
    client.insert(events_table, rows, column_names=COLUMNS, settings={"insert_deduplication_token": "batch-1"})
    assert client.command(f"SELECT count() FROM {events_table}") == 3

    result = client.query(f"SELECT {', '.join(COLUMNS)} FROM {events_table} ORDER BY event_id")
    assert result.column_names == tuple(COLUMNS)
    assert len(result.result_rows) == 3
    for got, sent in zip(result.result_rows, rows):
        event_id, event_type, occurred_at, payload, attempt = got
        assert event_id == sent[0]
        assert event_type == sent[1]
        # naive_utc mode: the UTC wall time without tzinfo, microseconds intact
        assert occurred_at == sent[2].replace(tzinfo=None)
        assert payload == sent[3]
        assert attempt == sent[4]


def test_a_new_token_inserts_again(client, events_table):
    rows = _rows(2)
    client.insert(events_table, rows, column_names=COLUMNS, settings={"insert_deduplication_token": "a"})
    client.insert(events_table, rows, column_names=COLUMNS, settings={"insert_deduplication_token": "b"})
    assert client.command(f"SELECT count() FROM {events_table}") == 4


@pytest.mark.parametrize("compress", ["lz4", "zstd", "gzip", False])
def test_compressed_inserts_and_responses(server_url, events_table, compress):
    ch = clickhouse_connect.get_client(dsn=server_url, compress=compress)
    try:
        ch.insert(events_table, _rows(500), column_names=COLUMNS)
        result = ch.query(f"SELECT event_id, payload FROM {events_table} ORDER BY event_id")
    finally:
        ch.close()
    assert len(result.result_rows) == 500
    assert result.result_rows[499] == (uuid.UUID(int=500), '{"n": 499, "text": "héllo\\tworld"}')


def test_constraint_violation_is_a_database_error_with_code_469(client, events_table):
    bad = _rows(1)
    bad[0][4] = 0
    with pytest.raises(DatabaseError) as caught:
        client.insert(events_table, bad, column_names=COLUMNS)
    assert caught.value.code == 469
    assert "VIOLATED_CONSTRAINT" in str(caught.value)
    assert not isinstance(caught.value, OperationalError)
    assert client.command(f"SELECT count() FROM {events_table}") == 0


def test_unknown_table_and_syntax_errors_keep_their_codes(client):
    with pytest.raises(DatabaseError) as unknown_table:
        client.query("SELECT * FROM no_such_table")
    assert unknown_table.value.code == 60
    with pytest.raises(DatabaseError) as syntax:
        client.command("SELEC 1")
    assert syntax.value.code == 62
    with pytest.raises(DatabaseError) as multi:
        client.command("SELECT 1; SELECT 2")
    assert multi.value.code == 62


def test_per_query_settings_apply_to_that_query_only(client):
    assert client.command("SELECT getSetting('max_threads')", settings={"max_threads": 3}) == 3
    assert client.command("SELECT getSetting('max_threads')") != 3
    with pytest.raises(DatabaseError) as caught:
        client.command("SELECT 1", settings={"no_such_setting_xyz": 1})
    assert caught.value.code == 115


def test_server_side_parameters(client):
    assert client.query("SELECT {name:String}, {n:UInt8} + 1", parameters={"name": "relay", "n": 41}).result_rows == [("relay", 42)]


def test_form_encoded_parameters(server_url):
    ch = clickhouse_connect.get_client(dsn=server_url, form_encode_query_params=True)
    try:
        assert ch.query("SELECT {name:String}", parameters={"name": "x" * 5000}).result_rows == [("x" * 5000,)]
    finally:
        ch.close()


@pytest.mark.parametrize(
    ("sql", "statement", "fmt", "data"),
    [
        (b"INSERT INTO `t` (`a`) FORMAT Native\n\t\x00\x01", b"INSERT INTO `t` (`a`) ", "Native", b"\t\x00\x01"),
        (b"INSERT INTO t SETTINGS x='FORMAT' FORMAT TSV \r\n1\n", b"INSERT INTO t ", "TSV", b"1\n"),
        (b"-- note\ninsert into t format CSV 1,2", b"-- note\ninsert into t ", "CSV", b"1,2"),
    ],
)
def test_insert_data_is_split_where_clickhouse_splits_it(sql, statement, fmt, data):
    shape = _analyze_sql(sql)
    assert (sql[: shape.infile_at], shape.insert_format, sql[shape.data_start :]) == (statement, fmt, data)


@pytest.mark.parametrize("sql", [b"INSERT INTO t VALUES (1)", b"INSERT INTO t SELECT 1", b"SELECT format FROM t"])
def test_statements_without_inline_data_run_unchanged(sql):
    assert _analyze_sql(sql).insert_format is None


def test_503_fault_fails_one_request_then_the_next_succeeds(client, server_url):
    set_faults(server_url, fail_next_n=1)
    with pytest.raises(OperationalError) as caught:
        client.command("SELECT 1")
    assert "503" in str(caught.value)
    assert client.command("SELECT 1") == 1
    state = get_faults(server_url)
    assert state["fail_next_n"] == 0
    assert state["injected"]["fail"] == 1


def test_faults_can_target_matching_statements_only(client, server_url, events_table):
    set_faults(server_url, fail_next_n=1, match=f"INSERT INTO .*{events_table}")
    assert client.command("SELECT 1") == 1  # not matched, untouched
    with pytest.raises(OperationalError):
        client.insert(events_table, _rows(1), column_names=COLUMNS)
    client.insert(events_table, _rows(1), column_names=COLUMNS)
    assert client.command(f"SELECT count() FROM {events_table}") == 1


def test_reset_after_execute_is_replayed_by_the_client_and_deduplicated(client, server_url, events_table):
    # The insert lands, the response is lost, clickhouse-connect replays it: the token keeps one copy
    set_faults(server_url, reset_next_n=1, reset_after_execute=True, match=f"INSERT INTO .*{events_table}")
    client.insert(events_table, _rows(5), column_names=COLUMNS, settings={"insert_deduplication_token": "t-1"})
    assert get_faults(server_url)["injected"]["reset"] == 1
    assert client.command(f"SELECT count() FROM {events_table}") == 5


def test_repeated_connection_resets_surface_as_operational_error(client, server_url, events_table):
    set_faults(server_url, reset_next_n=2, match=f"INSERT INTO .*{events_table}")
    with pytest.raises(OperationalError):
        client.insert(events_table, _rows(1), column_names=COLUMNS)
    assert client.command(f"SELECT count() FROM {events_table}") == 0


def test_delay_fault(client, server_url):
    set_faults(server_url, delay_seconds=0.3, match="SELECT 42")
    started = time.monotonic()
    assert client.command("SELECT 42") == 42
    assert time.monotonic() - started >= 0.3
    started = time.monotonic()
    assert client.command("SELECT 1") == 1
    assert time.monotonic() - started < 0.3


def test_fault_endpoint_rejects_unknown_fields(server_url):
    with pytest.raises(ValueError, match="unknown fault fields"):
        set_faults(server_url, explode=True)


def test_two_processes_insert_through_the_same_server(server_url, client, events_table):
    script = textwrap.dedent(
        """
        import sys, uuid, datetime as dt
        import clickhouse_connect
        url, table, start = sys.argv[1], sys.argv[2], int(sys.argv[3])
        ch = clickhouse_connect.get_client(dsn=url)
        when = dt.datetime(2024, 1, 1, tzinfo=dt.timezone.utc)
        for batch in range(5):
            rows = [[uuid.UUID(int=start + batch * 20 + i + 1), "proc", when, str(start), 1] for i in range(20)]
            ch.insert(table, rows, column_names=["event_id", "event_type", "occurred_at", "payload", "attempt"],
                      settings={"insert_deduplication_token": f"{start}-{batch}"})
        ch.close()
        """
    )
    procs = [
        subprocess.Popen([sys.executable, "-c", script, server_url, events_table, str(start)], stderr=subprocess.PIPE)
        for start in (0, 10_000)
    ]
    for proc in procs:
        _, stderr = proc.communicate(timeout=120)
        assert proc.returncode == 0, stderr.decode()
    assert client.query(f"SELECT payload, count() FROM {events_table} GROUP BY payload ORDER BY payload").result_rows == [
        ("0", 100),
        ("10000", 100),
    ]


def test_password_is_checked_like_clickhouse(tmp_path):
    with running_clickhouse_http_server(tmp_path / "data", password="s3cret") as url:
        assert url.startswith("http://default:s3cret@")
        ch = clickhouse_connect.get_client(dsn=url)
        assert ch.command("SELECT 1") == 1
        ch.close()
        with pytest.raises(DatabaseError) as caught:
            clickhouse_connect.get_client(dsn=url.replace("s3cret", "wrong"))
        assert caught.value.code == 516
        assert "AUTHENTICATION_FAILED" in str(caught.value)


def test_data_survives_a_clean_restart(tmp_path):
    path = tmp_path / "data"
    with ClickHouseHttpServerProcess(path) as server:
        ch = clickhouse_connect.get_client(dsn=server.url)
        ch.command(EVENTS_DDL.format(table="kept"))
        ch.insert("kept", _rows(7), column_names=COLUMNS)
        ch.close()
    assert server.returncode == 0
    # The directory was released, so a new server process can own it
    with ClickHouseHttpServerProcess(path, faults={"fail_next_n": 1, "match": "kept"}) as server:
        ch = clickhouse_connect.get_client(dsn=server.url)
        with pytest.raises(OperationalError):
            ch.command("SELECT count() FROM kept")
        assert ch.command("SELECT count() FROM kept") == 7
        ch.close()


def test_a_second_server_on_the_same_directory_is_refused(server):
    with pytest.raises(RuntimeError, match="in use by another process"):
        ClickHouseHttpServerProcess(server.path, startup_timeout=30).start()
    assert server.returncode is None
