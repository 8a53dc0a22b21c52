import contextlib
import datetime as dt
import uuid

import psycopg
import pytest

from outbox_pipeline.config.errors import EventRejectedError
from outbox_pipeline.producer import publish, publish_many
from outbox_pipeline.producer.events import OutboxEvent, RawEvent, snake_case


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
    when = dt.datetime(2026, 11, 29, 10, 11, 12, 123456, tzinfo=dt.UTC)
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
        (RawEvent(event_type="old", context="{}", event_date_time=dt.datetime(1800, 1, 1, tzinfo=dt.UTC)), "outside ClickHouse's range"),
        (RawEvent(event_type="bad_text", context='{"s": "\ud800"}'), "not valid UTF-8"),
        (RawEvent(event_type="", context="{}"), "event_type is empty"),
    ],
)
def test_producer_refuses_events_clickhouse_could_never_load(outbox, relay_env, event, message):
    with psycopg.connect(relay_env["OUTBOX_DATABASE_URL"]) as conn:
        with pytest.raises(EventRejectedError, match=message):
            publish(conn, event)
    assert stored_events(relay_env["OUTBOX_DATABASE_URL"]) == []


def test_a_repeated_event_id_is_stored_as_another_event(outbox, relay_env):
    # Since schema version 6 the outbox has no unique index on event_id (a partitioned table
    # cannot have one without created_at, and it was the costliest index of every insert):
    # event ids are the producer's, fresh uuid4s unless it chooses otherwise.
    event_id = uuid.uuid4()
    with psycopg.connect(relay_env["OUTBOX_DATABASE_URL"]) as conn:
        publish(conn, RawEvent(event_id=event_id, event_type="a", context="{}"))
        publish(conn, RawEvent(event_id=event_id, event_type="a", context="{}"))
        conn.commit()
        assert conn.execute("SELECT count(*) FROM outbox WHERE event_id = %s", (event_id,)).fetchone()[0] == 2


# -- a refused call writes nothing, on every insert path and driver ------------------------

# What is wrong -> (the field the message must name, the bad event given the other events of its call).
BAD_EVENTS = {
    "nul_in_event_type": ("event_type", lambda call: RawEvent(event_type="bad\x00", context="{}")),
    "surrogate_in_event_type": ("event_type", lambda call: RawEvent(event_type="bad\ud800", context="{}")),
    "empty_event_type": ("event_type", lambda call: RawEvent(event_type="", context="{}")),
    "nul_in_environment": ("environment", lambda call: RawEvent(event_type="bad", context="{}", environment="prod\x00")),
    "surrogate_in_environment": ("environment", lambda call: RawEvent(event_type="bad", context="{}", environment="\udcff")),
    "nul_in_context": ("event_context", lambda call: RawEvent(event_type="bad", context='{"s": "\x00"}')),
    "surrogate_in_context": ("event_context", lambda call: RawEvent(event_type="bad", context='{"s": "\ud800"}')),
    "surrogate_in_typed_field": ("event_context", lambda call: UserCreated(user_id=1, email="a\ud800@example.com")),
    "context_over_the_limit": ("event_context", lambda call: RawEvent(event_type="bad", context="x" * 2_000_000)),
    "metadata_version_over_integer": ("metadata_version", lambda call: RawEvent(event_type="bad", context="{}", metadata_version=2**31)),
    "negative_metadata_version": ("metadata_version", lambda call: RawEvent(event_type="bad", context="{}", metadata_version=-1)),
    "time_out_of_range": (
        "event_date_time",
        lambda call: RawEvent(event_type="bad", context="{}", event_date_time=dt.datetime(1800, 1, 1, tzinfo=dt.UTC)),
    ),
    "naive_time": ("event_date_time", lambda call: RawEvent(event_type="bad", context="{}", event_date_time=dt.datetime(2026, 1, 1))),
    "event_id_twice_in_the_call": ("event_id", lambda call: RawEvent(event_type="bad", context="{}", event_id=call[0].event_id)),
}


def stored_ids(url: str, ids: list[uuid.UUID]) -> set[uuid.UUID]:
    with psycopg.connect(url) as conn:
        rows = conn.execute("SELECT event_id FROM outbox WHERE event_id = ANY(%s)", (ids,)).fetchall()
    return {row[0] for row in rows}


def refusal_problems(url: str, connection, transaction, size: int) -> dict[str, list[str]]:
    """For every case of BAD_EVENTS, act as a caller that publishes an event, then a call of
    ``size`` events with the bad one in the middle, catches the error, publishes one more
    event and commits. Returns what went wrong, by case (empty when everything held)."""

    def one_line(exc: BaseException) -> str:
        return f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0]}"

    problems: dict[str, list[str]] = {}
    for case, (field, make_bad) in BAD_EVENTS.items():
        found = problems.setdefault(case, [])
        call = [RawEvent(event_type="ok", context="{}") for _ in range(size)]
        bad_index = size // 2
        call[bad_index] = bad = make_bad(call)
        before, after = RawEvent(event_type="before", context="{}"), RawEvent(event_type="after", context="{}")
        try:
            with transaction():
                publish(connection, before)
                try:
                    publish_many(connection, call)
                    found.append("not refused")
                except EventRejectedError as exc:
                    wanted = [f"index {bad_index}", str(bad.event_id), field]
                    if any(part not in str(exc) for part in wanted) or "\n" in str(exc):
                        found.append(f"message {str(exc)!r} does not name all of {wanted}")
                except Exception as exc:
                    found.append(f"raised {one_line(exc)}")
                # The caller's transaction is still usable after the refusal.
                publish(connection, after)
        except Exception as exc:
            found.append(f"the transaction failed afterwards: {one_line(exc)}")
        else:
            ids = [before.event_id, after.event_id, *(event.event_id for event in call)]
            leaked = stored_ids(url, ids) - {before.event_id, after.event_id}
            if leaked:
                found.append(f"{len(leaked)} events of the refused call were committed")
    return {case: found for case, found in problems.items() if found}


def report(problems: dict[str, list[str]]) -> str:
    return "\n".join(f"{case}: {'; '.join(found)}" for case, found in problems.items())


@contextlib.contextmanager
def committed(connection):
    """A DB-API transaction: commit on success, roll back on error."""
    try:
        yield
    except BaseException:
        connection.rollback()
        raise
    connection.commit()


# Below and at/above the threshold at which a psycopg 3 connection switches to COPY.
CALL_SIZES = [3, 250]


@pytest.mark.parametrize("size", CALL_SIZES)
def test_refused_call_writes_nothing_with_psycopg3(relay_env, size):
    url = relay_env["OUTBOX_DATABASE_URL"]
    with psycopg.connect(url) as conn:
        problems = refusal_problems(url, conn, lambda: committed(conn), size)
        assert not problems, report(problems)
        assert conn.execute("SELECT 1").fetchone() == (1,)


@pytest.mark.parametrize("size", CALL_SIZES)
def test_refused_call_writes_nothing_with_psycopg2(relay_env, size):
    psycopg2 = pytest.importorskip("psycopg2")
    url = relay_env["OUTBOX_DATABASE_URL"]
    conn = psycopg2.connect(url)
    try:
        problems = refusal_problems(url, conn, lambda: committed(conn), size)
        assert not problems, report(problems)
        with conn.cursor() as cur:
            cur.execute("SELECT 1")
            assert cur.fetchone() == (1,)
    finally:
        conn.close()


# django_outbox_url: outbox_pipeline_tests/support/django_app.py (Django is configured once per process).


@pytest.mark.parametrize("size", CALL_SIZES)
def test_refused_call_writes_nothing_with_django(django_outbox_url, size):
    from django.db import connection, transaction

    # Django's own transaction block, as an application publishes inside it (psycopg 3 backend when installed).
    problems = refusal_problems(django_outbox_url, connection, transaction.atomic, size)
    assert not problems, report(problems)
    with connection.cursor() as cur:
        cur.execute("SELECT 1")
        assert cur.fetchone() == (1,)


def test_publish_through_django_connection(django_outbox_url):
    from django.db import connection, transaction

    kept, dropped = UserCreated(user_id=1, email="d@example.com"), UserCreated(user_id=2, email="e@example.com")
    with transaction.atomic():
        publish(connection, kept)
    with pytest.raises(RuntimeError):
        with transaction.atomic():
            publish(connection, dropped)
            raise RuntimeError("roll back")
    assert stored_ids(django_outbox_url, [kept.event_id, dropped.event_id]) == {kept.event_id}
