import datetime as dt
import uuid

import psycopg
import pytest

from outbox_pipeline.errors import EventRejectedError
from outbox_pipeline.events import OutboxEvent, RawEvent, snake_case
from outbox_pipeline.producer import publish, publish_many


class UserCreated(OutboxEvent):
    user_id: int
    email: str


class HTTPRequestFailed(OutboxEvent):
    status: int


def stored_events(url: str) -> list[tuple]:
    with psycopg.connect(url) as conn:
        return conn.execute(
            "SELECT event_id, event_type, event_date_time, environment, event_context, metadata_version FROM outbox ORDER BY id"
        ).fetchall()


def test_event_type_is_snake_case_of_class_name():
    assert UserCreated.event_type == "user_created"
    assert HTTPRequestFailed.event_type == "http_request_failed"
    assert snake_case("OrderPaid") == "order_paid"


def test_context_is_the_payload_json_only():
    event = UserCreated(user_id=7, email="a@example.com")
    assert event.event_context() == '{"user_id":7,"email":"a@example.com"}'


def test_publish_inside_committed_transaction(outbox, relay_env):
    url = relay_env["OUTBOX_DATABASE_URL"]
    when = dt.datetime(2026, 11, 29, 10, 11, 12, 123456, tzinfo=dt.timezone.utc)
    event = UserCreated(user_id=1, email="u@example.com", event_date_time=when, environment="test")
    with psycopg.connect(url) as conn:
        conn.execute("CREATE TABLE users (id int primary key)")
        conn.execute("INSERT INTO users VALUES (1)")
        publish(conn, event)
    [row] = stored_events(url)
    assert row == (event.event_id, "user_created", when, "test", '{"user_id":1,"email":"u@example.com"}', 1)


def test_publish_inside_rolled_back_transaction_leaves_nothing(outbox, relay_env):
    url = relay_env["OUTBOX_DATABASE_URL"]
    with psycopg.connect(url) as conn:
        publish_many(conn, [UserCreated(user_id=n, email="x@example.com") for n in range(300)])  # COPY path
        publish(conn, UserCreated(user_id=1, email="y@example.com"))  # INSERT path
        conn.rollback()
    assert stored_events(url) == []
    assert outbox.counts().pending == 0


def test_context_is_stored_byte_for_byte(outbox, relay_env):
    url = relay_env["OUTBOX_DATABASE_URL"]
    context = '{ "b":1,  "a" : "tab\\there", "emoji":"🚀", "raw":"\u00e9" }  '
    with psycopg.connect(url) as conn:
        publish(conn, RawEvent(event_type="odd_spacing", context=context))
    [row] = stored_events(url)
    assert row[4].encode() == context.encode()


def test_publish_on_a_psycopg2_dbapi_connection(outbox, relay_env):
    psycopg2 = pytest.importorskip("psycopg2")
    url = relay_env["OUTBOX_DATABASE_URL"]
    conn = psycopg2.connect(url)
    try:
        publish(conn, UserCreated(user_id=1, email="a@example.com"))
        conn.rollback()
        publish_many(conn, [UserCreated(user_id=2, email="b@example.com"), UserCreated(user_id=3, email="c@example.com")])
        conn.commit()
    finally:
        conn.close()
    assert [row[4] for row in stored_events(url)] == [
        '{"user_id":2,"email":"b@example.com"}',
        '{"user_id":3,"email":"c@example.com"}',
    ]


def test_publish_through_sqlalchemy_session(outbox, relay_env):
    sqlalchemy = pytest.importorskip("sqlalchemy")
    from sqlalchemy.orm import Session

    url = relay_env["OUTBOX_DATABASE_URL"].replace("postgresql://", "postgresql+psycopg://", 1)
    engine = sqlalchemy.create_engine(url)
    with Session(engine) as session:
        session.execute(sqlalchemy.text("CREATE TABLE orders (id int primary key)"))
        session.execute(sqlalchemy.text("INSERT INTO orders VALUES (1)"))
        publish(session.connection().connection, UserCreated(user_id=9, email="s@example.com"))
        session.commit()
    with Session(engine) as session:
        publish(session.connection().connection, UserCreated(user_id=10, email="t@example.com"))
        session.rollback()
    engine.dispose()
    assert [row[1] for row in stored_events(relay_env["OUTBOX_DATABASE_URL"])] == ["user_created"]


@pytest.mark.parametrize(
    "event, message",
    [
        (RawEvent(event_type="big", context="x" * 2_000_000), "over the limit"),
        (RawEvent(event_type="old", context="{}", event_date_time=dt.datetime(1800, 1, 1, tzinfo=dt.timezone.utc)), "outside ClickHouse's range"),
        (RawEvent(event_type="bad_text", context='{"s": "\ud800"}'), "not valid UTF-8"),
        (RawEvent(event_type="", context="{}"), "event_type is empty"),
    ],
)
def test_producer_refuses_events_clickhouse_could_never_load(outbox, relay_env, event, message):
    with psycopg.connect(relay_env["OUTBOX_DATABASE_URL"]) as conn:
        with pytest.raises(EventRejectedError, match=message):
            publish(conn, event)
    assert stored_events(relay_env["OUTBOX_DATABASE_URL"]) == []


def test_duplicate_event_id_is_refused_by_the_database(outbox, relay_env):
    event_id = uuid.uuid4()
    with psycopg.connect(relay_env["OUTBOX_DATABASE_URL"]) as conn:
        publish(conn, RawEvent(event_id=event_id, event_type="a", context="{}"))
        with pytest.raises(psycopg.errors.UniqueViolation):
            publish(conn, RawEvent(event_id=event_id, event_type="a", context="{}"))
