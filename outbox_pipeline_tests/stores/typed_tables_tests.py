"""Typed tables on the real chDB: the column types, strict parsing, and schema evolution."""

import datetime as dt
import decimal
import enum
import typing
import uuid

import pydantic
import pytest

from outbox_pipeline.config.errors import ConfigurationError
from outbox_pipeline.producer.event_registry import load_event_classes
from outbox_pipeline.producer.events import OutboxEvent, RawEvent
from outbox_pipeline.stores.event_log_store import EventLogStore
from outbox_pipeline.stores.typed_columns import typed_table, typed_tables
from outbox_pipeline_tests.support.typed_events import csv_of


class Plan(enum.StrEnum):
    free = "free"
    team = "team"


class Address(pydantic.BaseModel):
    city: str
    zip: int


class Everything(OutboxEvent):
    count: int
    ratio: float
    active: bool
    name: str
    amount: decimal.Decimal
    price: typing.Annotated[decimal.Decimal, pydantic.Field(max_digits=12, decimal_places=2)]
    paid_at: dt.datetime
    due: dt.date
    account: uuid.UUID
    channel: typing.Literal["web", "app"]
    plan: Plan
    note: str | None = None
    tags: list[str]
    scores: list[int] = []
    address: Address
    attributes: dict[str, int]


EXPECTED_TYPES = {
    "event_id": "UUID",
    "event_date_time": "DateTime64(6, 'UTC')",
    "environment": "LowCardinality(String)",
    "metadata_version": "UInt32",
    "count": "Int64",
    "ratio": "Float64",
    "active": "Bool",
    "name": "String",
    "amount": "Decimal(38, 9)",
    "price": "Decimal(12, 2)",
    "paid_at": "DateTime64(6, 'UTC')",
    "due": "Date32",
    "account": "UUID",
    "channel": "LowCardinality(String)",
    "plan": "LowCardinality(String)",
    "note": "Nullable(String)",
    "tags": "Array(String)",
    "scores": "Array(Int64)",
    "address": "JSON",
    "attributes": "JSON",
}


def everything(**changes) -> Everything:
    values = {
        "count": -(2**62), "ratio": 0.25, "active": True, "name": "ünï 'quoted'",
        "amount": decimal.Decimal("12345678901234567890.123456789"), "price": decimal.Decimal("9999999999.99"),
        "paid_at": dt.datetime(2026, 3, 1, 12, 0, 0, 123456, tzinfo=dt.UTC), "due": dt.date(2026, 4, 1),
        "account": uuid.UUID("b0b2cfee-8a51-4b8d-a0a2-3a1f4f2d4e4f"), "channel": "app", "plan": Plan.team,
        "tags": ["a", "b"], "address": Address(city="Lyon", zip=69001), "attributes": {"x": 1},
    }
    return Everything(**{**values, **changes})


@pytest.fixture
def open_store(clickhouse_url):
    opened = []

    def open_with(*classes) -> EventLogStore:
        while opened:
            opened.pop().close()
        store = EventLogStore.connect(clickhouse_url, busy_wait_seconds=30, event_classes=classes)
        opened.append(store)
        store.migrate()
        return store

    yield open_with
    while opened:
        opened.pop().close()


def rows(store: EventLogStore, sql: str) -> list[tuple]:
    return store.client.query(sql).result_rows


def test_each_field_gets_its_faithful_column_type_and_its_value(open_store):
    store = open_store(Everything)
    event = everything()
    store.insert_csv(csv_of([event]), deduplication_token="t1")

    assert dict(rows(store, "SELECT name, type FROM system.columns WHERE table = 'everything' ORDER BY position")) == EXPECTED_TYPES
    (row,) = rows(
        store,
        "SELECT count, amount, price, toString(paid_at), due, account, plan, note, tags, scores, address.city, attributes.x "
        "FROM everything",
    )
    assert row == (
        -(2**62), decimal.Decimal("12345678901234567890.123456789"), decimal.Decimal("9999999999.99"),
        "2026-03-01 12:00:00.123456", dt.date(2026, 4, 1), event.account, "team", None, ["a", "b"], [], "Lyon", 1,
    )


BAD_CONTEXTS = {
    "an int field holding 3.7": ("count", 3.7),
    "a Decimal field holding text": ("amount", "abc"),
    "a Decimal(12, 2) field with three decimal places": ("price", "1.005"),
    "a Decimal(12, 2) field with eleven integer digits": ("price", "12345678901.5"),
    "a datetime field holding a number": ("paid_at", 10),
    "a Literal field outside its values": ("channel", "fax"),
    "a str field holding a number": ("name", 5),
    "a list of str holding a number": ("tags", ["a", 1]),
    "a nested model holding a list": ("address", [1]),
}


def test_a_value_of_another_kind_is_counted_as_a_parse_failure_and_never_coerced(open_store):
    import json

    store = open_store(Everything)
    good = json.loads(everything().event_context())
    bad = {}
    for what, (field, value) in BAD_CONTEXTS.items():
        bad[what] = RawEvent(event_type="everything", context=json.dumps({**good, field: value}))
    missing = dict(good)
    del missing["count"]
    bad["a required field missing"] = RawEvent(event_type="everything", context=json.dumps(missing))
    bad["not JSON at all"] = RawEvent(event_type="everything", context="{not json")
    store.insert_csv(csv_of([everything(), *bad.values()]), deduplication_token="t1")

    # Every event stays in event_log; only the one that parses reaches the typed table.
    assert store.counts() == (len(bad) + 1, len(bad) + 1)
    assert rows(store, "SELECT count() FROM everything") == [(1,)]
    counts = store.typed.parse_counts(store.typed.tables[0])
    assert (counts.source_rows, counts.failures, counts.typed_rows, counts.missing) == (len(bad) + 1, len(bad), 1, 0)
    assert counts.example_event_id in {str(event.event_id) for event in bad.values()}


class OrderV1(OutboxEvent):
    event_type = "order_evolving"
    order_id: int
    amount: decimal.Decimal


class OrderV2(OutboxEvent):
    event_type = "order_evolving"
    order_id: int
    amount: decimal.Decimal
    coupon: str | None = None
    priority: int = 3


def test_adding_an_optional_field_or_one_with_a_default_keeps_the_history(open_store):
    store = open_store(OrderV1)
    old = OrderV1(order_id=1, amount=decimal.Decimal("1.50"))
    store.insert_csv(csv_of([old]), deduplication_token="v1")

    store = open_store(OrderV2)
    new = OrderV2(order_id=2, amount=decimal.Decimal("2.50"), coupon="WELCOME", priority=1)
    store.insert_csv(csv_of([new]), deduplication_token="v2")
    # The older event, replayed or rebuilt from event_log, reads the same as the row it already had.
    store.refresh_typed_day(old.event_date_time.date())

    assert rows(store, "SELECT order_id, amount, coupon, priority FROM order_evolving ORDER BY order_id") == [
        (1, decimal.Decimal("1.5"), None, 3), (2, decimal.Decimal("2.5"), "WELCOME", 1),
    ]
    assert store.typed.parse_counts(store.typed.tables[0]).failures == 0


class OrderAmountAsInt(OutboxEvent):
    event_type = "order_evolving"
    order_id: int
    amount: int


class OrderWithoutAmount(OutboxEvent):
    event_type = "order_evolving"
    order_id: int


class OrderWithRequiredField(OutboxEvent):
    event_type = "order_evolving"
    order_id: int
    amount: decimal.Decimal
    currency: str


@pytest.mark.parametrize(
    "changed, problem",
    [
        (OrderAmountAsInt, "amount is Decimal(38, 9) in ClickHouse but the class now maps it to Int64"),
        (OrderWithoutAmount, "column amount (Decimal(38, 9)) is no longer a field of the class"),
        (OrderWithRequiredField, "new field currency is required, and the events already stored lack it"),
    ],
)
def test_a_change_that_cannot_map_stops_with_what_to_do_and_changes_nothing(open_store, changed, problem):
    store = open_store(OrderV1)
    store.insert_csv(csv_of([OrderV1(order_id=1, amount=decimal.Decimal("1.50"))]), deduplication_token="v1")

    with pytest.raises(ConfigurationError) as raised:
        open_store(changed)
    message = str(raised.value)
    assert "\n" not in message
    assert f"typed table order_evolving no longer matches {changed.__qualname__}" in message and problem in message
    assert "set event_type = 'order_evolving_v2'" in message and "DROP TABLE order_evolving_mv; DROP TABLE order_evolving" in message

    store = open_store(OrderV1)  # untouched: the old class still fits
    assert rows(store, "SELECT order_id, amount FROM order_evolving") == [(1, decimal.Decimal("1.5"))]


def test_a_dropped_typed_table_is_rebuilt_from_event_log(open_store):
    store = open_store()  # no class registered yet: event_log only
    events = [OrderV1(order_id=n, amount=decimal.Decimal(n)) for n in range(50)]
    store.insert_csv(csv_of(events), deduplication_token="before")

    store = open_store(OrderV1)

    assert rows(store, "SELECT count(), uniqExact(event_id), sum(amount) FROM order_evolving") == [(50, 50, decimal.Decimal(1225))]
    # Dropped without its view: rebuilt all the same.
    store.client.command("DROP TABLE order_evolving")
    store = open_store(OrderV1)
    assert rows(store, "SELECT count(), uniqExact(event_id), sum(amount) FROM order_evolving") == [(50, 50, decimal.Decimal(1225))]


@pytest.mark.parametrize(
    "annotation, fragment",
    [
        (bytes, "type bytes has no ClickHouse column type"),
        (list[int] | None, "an Array cannot be Nullable"),
        (typing.Annotated[decimal.Decimal, pydantic.Field(max_digits=10)], "needs both max_digits (at most 76) and decimal_places"),
        (typing.Literal[1, 2], "only Literal of strings"),
    ],
)
def test_a_field_type_without_a_column_type_is_refused_naming_the_field(annotation, fragment):
    event_class = pydantic.create_model("Odd", __base__=OutboxEvent, odd=(annotation, ...))
    with pytest.raises(ConfigurationError, match="event class field Odd.odd") as raised:
        typed_table(event_class)
    assert fragment in str(raised.value)


def test_registration_errors_say_what_to_do():
    with pytest.raises(ConfigurationError, match="OUTBOX_EVENT_CLASSES: cannot import 'no_such_module'.*give a module path"):
        load_event_classes(["no_such_module"])
    with pytest.raises(ConfigurationError, match="module 'decimal' defines no OutboxEvent subclass"):
        load_event_classes(["decimal"])
    with pytest.raises(ConfigurationError, match="'outbox_pipeline.producer.demo_events:Missing' is not an OutboxEvent subclass"):
        load_event_classes(["outbox_pipeline.producer.demo_events:Missing"])
    with pytest.raises(ConfigurationError, match="both have event type 'order_evolving'"):
        typed_tables([OrderV1, OrderV2])
    assert [c.__name__ for c in load_event_classes(["outbox_pipeline.producer.demo_events:OrderPaid"])] == ["OrderPaid"]
