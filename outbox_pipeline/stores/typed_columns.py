"""The ClickHouse columns of an event class, and the SQL that reads each from ``event_context``.

A typed table holds the envelope columns and one column per payload field of a
pydantic event class. Each field gets a ClickHouse type and two expressions over
the event's JSON: its value, and whether it parses. A field parses only when its
JSON has the declared kind (an integer for ``int``, a decimal text for ``Decimal``,
an ISO timestamp for ``datetime``, …), so nothing is silently coerced: ``3.7``
for an ``int`` field, or ``"abc"`` for a ``Decimal`` one, makes the event a parse
failure, counted by the typed table's check, instead of a 3 or a 0 in the column.

No expression here can raise: an exception inside a materialized view would
fail the insert into ``event_log`` itself.

=====================================  =====================================
Python                                 ClickHouse
=====================================  =====================================
``int``                                ``Int64``
``float``                              ``Float64``
``bool``                               ``Bool``
``str``                                ``String``
``Decimal`` (``max_digits``,           ``Decimal(P, S)``; unconstrained:
``decimal_places``)                    ``Decimal(38, 9)``
``datetime``                           ``DateTime64(6, 'UTC')``
``date``                               ``Date32``
``UUID``                               ``UUID``
``Literal[...]``, ``Enum`` of str      ``LowCardinality(String)``, values checked
``X | None``                           ``Nullable(X)`` (scalars only)
``list[X]``                            ``Array(X)``
nested model, ``dict``                 ``JSON`` (the native type)
=====================================  =====================================
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import decimal
import enum
import hashlib
import types
import typing
import uuid

from outbox_pipeline.config.errors import ConfigurationError
from outbox_pipeline.stores.event_columns import DEFAULT_TABLE

CONTEXT = "event_context"
# The payload's top-level fields as raw JSON texts, parsed once per row: each field then reads only its own text.
FIELDS = "__fields"
DEFAULT_DECIMAL = (38, 9)
ENVELOPE_COLUMNS = (
    ("event_id", "UUID"),
    ("event_date_time", "DateTime64(6, 'UTC')"),
    ("environment", "LowCardinality(String)"),
    ("metadata_version", "UInt32"),
)
_ENVELOPE_FIELDS = {name for name, _ in ENVELOPE_COLUMNS}
# Read by the typed tables' queries under these names: a field of that name would shadow them.
_RESERVED = {"event_type", CONTEXT, "loaded_at"}
_INTEGER = "('Int64', 'UInt64')"
_NUMBER = "('Int64', 'UInt64', 'Double')"
_ISO_TIME = r"^[0-9]{4}-[0-9]{2}-[0-9]{2}[T ][0-9]{2}:[0-9]{2}"


@dataclasses.dataclass(frozen=True)
class Scalar:
    """How one JSON value (given as its raw JSON text ``r``) becomes a ClickHouse value: NULL when it does not parse."""

    clickhouse_type: str
    parse: typing.Callable[[str], str]


def _sql_string(text: str) -> str:
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _string_of(r: str) -> str:
    return f"if(JSONType({r}) = 'String', JSONExtractString({r}), NULL)"


def _decimal(precision: int, scale: int) -> Scalar:
    integer_digits = precision - scale
    fraction = rf"(\\.[0-9]{{1,{scale}}})?" if scale else ""
    pattern = rf"^-?[0-9]{{1,{integer_digits}}}{fraction}$"

    def parse(r: str) -> str:
        # The decimal's own text (pydantic writes a string; a JSON number is taken as written, never through a float).
        text = f"multiIf(JSONType({r}) = 'String', JSONExtractString({r}), JSONType({r}) IN {_NUMBER}, {r}, '')"
        # Only a text within P digits reaches the cast, so it can neither round nor overflow (nor raise).
        checked = f"if(match({text}, '{pattern}'), {text}, '')"
        parsed = f"toDecimal256OrNull({checked}, {scale})" if precision > 38 else f"toDecimal128OrNull({checked}, {scale})"
        return f"CAST({parsed}, 'Nullable(Decimal({precision}, {scale}))')"

    return Scalar(f"Decimal({precision}, {scale})", parse)


SCALARS: dict[type, Scalar] = {
    int: Scalar("Int64", lambda r: f"if(JSONType({r}) IN {_INTEGER}, JSONExtract({r}, 'Nullable(Int64)'), NULL)"),
    float: Scalar("Float64", lambda r: f"if(JSONType({r}) IN {_NUMBER}, JSONExtract({r}, 'Nullable(Float64)'), NULL)"),
    bool: Scalar("Bool", lambda r: f"if(JSONType({r}) = 'Bool', JSONExtract({r}, 'Nullable(Bool)'), NULL)"),
    str: Scalar("String", _string_of),
    dt.datetime: Scalar(
        "DateTime64(6, 'UTC')",
        lambda r: f"if(match(ifNull({_string_of(r)}, ''), '{_ISO_TIME}'), parseDateTime64BestEffortOrNull({_string_of(r)}, 6, 'UTC'), NULL)",
    ),
    dt.date: Scalar("Date32", lambda r: f"toDate32OrNull(ifNull({_string_of(r)}, ''))"),
    uuid.UUID: Scalar("UUID", lambda r: f"toUUIDOrNull(ifNull({_string_of(r)}, ''))"),
}


def _choice(values: list[str]) -> Scalar:
    allowed = "(" + ", ".join(_sql_string(value) for value in values) + ")"
    return Scalar("LowCardinality(String)", lambda r: f"if({_string_of(r)} IN {allowed}, {_string_of(r)}, NULL)")


# The cast only ever sees an object's text, so it cannot raise.
_JSON_OBJECT = Scalar("JSON", lambda r: f"if(JSONType({r}) = 'Object', CAST(if(JSONType({r}) = 'Object', {r}, '{{}}'), 'Nullable(JSON)'), NULL)")


@dataclasses.dataclass(frozen=True)
class TypedColumn:
    name: str
    clickhouse_type: str
    value_sql: str  # the column's value; evaluated only on rows where every column parses
    parses_sql: str  # 1 when the field's JSON holds a value of the declared type (or is absent/null where allowed)
    default_sql: str | None = None  # for ALTER TABLE ADD COLUMN: what existing rows hold


@dataclasses.dataclass(frozen=True)
class TypedTable:
    """The typed table of one event class, fed from ``source`` (the relay's table) by a materialized view."""

    event_type: str
    class_name: str
    name: str
    source: str
    columns: tuple[TypedColumn, ...]

    @property
    def view_name(self) -> str:
        return f"{self.name}_mv"

    @property
    def all_columns(self) -> list[tuple[str, str]]:
        return [*ENVELOPE_COLUMNS, *((c.name, c.clickhouse_type) for c in self.columns)]

    @property
    def parses_sql(self) -> str:
        """1 when the row parses; over ``rows_sql``."""
        return " AND ".join([f"isValidJSON({CONTEXT})", *(f"({c.parses_sql})" for c in self.columns)])

    def rows_sql(self, source_sql: str, where: str = "") -> str:
        """The source table's rows of this event type (and ``where``), each with its payload's fields split out."""
        return (
            f"(SELECT event_id, event_date_time, environment, metadata_version, {CONTEXT}, "
            f"CAST(JSONExtractKeysAndValuesRaw({CONTEXT}), 'Map(String, String)') AS {FIELDS} "
            f"FROM {source_sql} WHERE event_type = {_sql_string(self.event_type)}{' AND ' + where if where else ''})"
        )

    def select_sql(self, source_sql: str, where: str = "") -> str:
        """The SELECT from the source table that the view and every rebuild run: the same rows, the same values."""
        values = ", ".join([*(name for name, _ in ENVELOPE_COLUMNS), *(f"{c.value_sql} AS `{c.name}`" for c in self.columns)])
        return f"SELECT {values} FROM {self.rows_sql(source_sql, where)} WHERE {self.parses_sql}"

    @property
    def fingerprint(self) -> str:
        """Changes whenever the view's query would: kept as the view's comment."""
        text = repr((self.source, self.all_columns, [c.value_sql for c in self.columns], self.parses_sql))
        return "outbox_pipeline typed table " + hashlib.sha256(text.encode()).hexdigest()[:16]


def typed_table_name(event_type: str, source: str = DEFAULT_TABLE) -> str:
    """``order_paid`` beside the default ``event_log``; ``<table>_order_paid`` beside any other table (same database)."""
    database, _, table = source.rpartition(".")
    name = event_type if table == DEFAULT_TABLE else f"{table}_{event_type}"
    return f"{database}.{name}" if database else name


def typed_table(event_class: type, source: str = DEFAULT_TABLE) -> TypedTable:
    """The typed table of a pydantic event class; ConfigurationError naming the field when a type has no mapping."""
    event_type = getattr(event_class, "event_type", "")
    columns = []
    for name, field in event_class.model_fields.items():
        if name in _ENVELOPE_FIELDS:
            continue
        where = f"{event_class.__name__}.{name}"
        if not name.isidentifier() or name.startswith("_"):
            raise ConfigurationError(f"event class field {where}: name it with letters, digits and underscores")
        if name in _RESERVED:
            raise ConfigurationError(f"event class field {where}: {name} is a column of event_log; rename the field")
        columns.append(_column(name, field, where))
    return TypedTable(event_type, event_class.__qualname__, typed_table_name(event_type, source), source, tuple(columns))


def typed_tables(event_classes, source: str = DEFAULT_TABLE) -> tuple[TypedTable, ...]:
    """The typed tables of several classes; two classes of one event type are refused."""
    tables = tuple(typed_table(event_class, source) for event_class in event_classes)
    seen: dict[str, str] = {}
    for table in tables:
        other = seen.setdefault(table.event_type, table.class_name)
        if other != table.class_name:
            raise ConfigurationError(
                f"event classes {other} and {table.class_name} both have event type {table.event_type!r}: "
                "register one of them, or set event_type on one to tell them apart"
            )
    return tables


def _column(name: str, field, where: str) -> TypedColumn:
    annotation, optional = _unwrap_optional(field.annotation)
    raw = f"{FIELDS}[{_sql_string(name)}]"
    absent = f"JSONType({raw}) = 'Null'"  # null, or no such key (an empty text)
    if typing.get_origin(annotation) in (list, tuple, set, frozenset) or annotation in (list, tuple, set, frozenset):
        if optional:
            raise _unsupported(where, field.annotation, "an Array cannot be Nullable: declare it list[...] = [] (Field(default_factory=list))")
        element = _scalar(_list_element(annotation, where), where, field)
        parsed = f"arrayMap(r -> {element.parse('r')}, JSONExtractArrayRaw({raw}))"
        parses = f"JSONType({raw}) = 'Array' AND arrayAll(v -> isNotNull(v), {parsed})"
        if not field.is_required():
            parses = f"{absent} OR ({parses})"
        value = f"arrayMap(v -> assumeNotNull(v), {parsed})"
        return TypedColumn(name, f"Array({element.clickhouse_type})", value, parses, "[]")
    scalar = _scalar(annotation, where, field)
    parsed = scalar.parse(raw)
    if scalar.clickhouse_type == "JSON":
        if optional:
            raise _unsupported(where, field.annotation, "a JSON column cannot be Nullable: give it a default of {} instead")
        parses = f"isNotNull({parsed})" if field.is_required() else f"{absent} OR isNotNull({parsed})"
        return TypedColumn(name, "JSON", f"ifNull({parsed}, CAST('{{}}', 'JSON'))", parses, "'{}'")
    if optional:
        return TypedColumn(name, f"Nullable({scalar.clickhouse_type})", parsed, f"{absent} OR isNotNull({parsed})", "NULL")
    default = _default_literal(field) if not field.is_required() else None
    if default is not None:
        # A field added later with a default: older events lack it and read as that default.
        value = f"if({absent}, CAST({default}, '{scalar.clickhouse_type}'), assumeNotNull({parsed}))"
        return TypedColumn(name, scalar.clickhouse_type, value, f"{absent} OR isNotNull({parsed})", f"CAST({default}, '{scalar.clickhouse_type}')")
    return TypedColumn(name, scalar.clickhouse_type, f"assumeNotNull({parsed})", f"isNotNull({parsed})")


def _unwrap_optional(annotation):
    if typing.get_origin(annotation) is typing.Annotated:
        annotation = typing.get_args(annotation)[0]
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        members = [arg for arg in typing.get_args(annotation) if arg is not type(None)]
        if len(members) == 1 and len(typing.get_args(annotation)) == 2:
            return members[0], True
    return annotation, False


def _list_element(annotation, where: str):
    arguments = typing.get_args(annotation)
    if typing.get_origin(annotation) is tuple and not (len(arguments) == 2 and arguments[1] is Ellipsis):
        raise _unsupported(where, annotation, "only tuple[X, ...] maps to an Array; use a nested model for mixed fields")
    if not arguments:
        raise _unsupported(where, annotation, "give the element type, as in list[int]")
    return arguments[0]


def _scalar(annotation, where: str, field) -> Scalar:
    if typing.get_origin(annotation) is typing.Annotated:
        annotation = typing.get_args(annotation)[0]
    if annotation is decimal.Decimal:
        return _decimal(*_decimal_size(field, where))
    if typing.get_origin(annotation) is typing.Literal:
        values = typing.get_args(annotation)
        if all(isinstance(value, str) for value in values):
            return _choice(list(values))
        raise _unsupported(where, annotation, "only Literal of strings maps to LowCardinality(String)")
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        values = [member.value for member in annotation]
        if all(isinstance(value, str) for value in values):
            return _choice(values)
        raise _unsupported(where, annotation, "only an Enum with string values maps to LowCardinality(String)")
    if annotation in SCALARS:
        return SCALARS[annotation]
    if annotation is dict or typing.get_origin(annotation) is dict or hasattr(annotation, "model_fields"):
        return _JSON_OBJECT
    raise _unsupported(where, annotation, "use int, float, bool, str, Decimal, datetime, date, UUID, Literal, a str Enum, list, dict or a model")


def _decimal_size(field, where: str) -> tuple[int, int]:
    precision = scale = None
    for constraint in field.metadata:
        precision = getattr(constraint, "max_digits", None) or precision
        places = getattr(constraint, "decimal_places", None)
        scale = places if places is not None else scale
    if precision is None and scale is None:
        return DEFAULT_DECIMAL
    if precision is None or scale is None or not 0 <= scale <= precision <= 76:
        raise ConfigurationError(
            f"event class field {where}: a Decimal needs both max_digits (at most 76) and decimal_places "
            f"(at most max_digits) to map to Decimal(P, S), or neither for Decimal{DEFAULT_DECIMAL}"
        )
    return precision, scale


def _default_literal(field) -> str | None:
    value = field.default
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float, decimal.Decimal)):
        return _sql_string(str(value))
    if isinstance(value, enum.Enum):
        value = value.value
    if isinstance(value, str):
        return _sql_string(value)
    return None


def _unsupported(where: str, annotation, what_to_do: str) -> ConfigurationError:
    shown = getattr(annotation, "__name__", None) or repr(annotation)
    return ConfigurationError(f"event class field {where}: type {shown} has no ClickHouse column type; {what_to_do}")
