"""One relay of a code location: where it reads, where it writes, what it takes, and its settings.

The default relay comes from the environment and keeps the project's original
names (``process_outbox_events``, ``outbox_pending_sensor``, the ``event_log``
asset, …). Every other relay comes from an ``OutboxRelay`` component in a
``defs.yaml`` and has its name appended to each definition
(``process_outbox_events_orders``).
"""

from __future__ import annotations

import dataclasses
import fnmatch
import functools

import dagster as dg

from outbox_pipeline.config.errors import ConfigurationError
from outbox_pipeline.config.settings import RelaySettings
from outbox_pipeline.producer.event_registry import load_event_classes
from outbox_pipeline.stores.event_log_store import DEFAULT_TABLE, quoted_table_name
from outbox_pipeline.stores.relay_identity import DEFAULT_RELAY_NAME, RelayIdentity
from outbox_pipeline.stores.typed_columns import TypedTable, typed_tables

DEFAULT_RELAY = DEFAULT_RELAY_NAME
# Which relay of the code location a run belongs to.
RELAY_NAME_TAG = "outbox_pipeline/relay_name"



def definition_name(base: str, relay_name: str) -> str:
    """A definition's name for a relay: ``base`` for the default relay, ``base_<name>`` for the others."""
    return base if relay_name == DEFAULT_RELAY else f"{base}_{relay_name}"


def secret_value(value: str | None) -> str | None:
    """The value behind a ``dg.EnvVar`` (kept as the variable's name in the UI), or the value itself."""
    if isinstance(value, dg.EnvVar):
        return value.get_value()
    return value


def typed_asset_key(relay_asset_key: dg.AssetKey, table: TypedTable) -> dg.AssetKey:
    """The asset of a typed table, beside its relay's (``order_paid``; ``orders/orders_event_log_order_paid``)."""
    return dg.AssetKey([*relay_asset_key.path[:-1], table.name.replace(".", "__")])


@dataclasses.dataclass(frozen=True)
class RelayInstance:
    name: str
    # Either may be a dg.EnvVar: resources then show the variable's name, never the URL.
    outbox_database_url: str | None
    clickhouse_url: str
    settings: RelaySettings
    table: str = DEFAULT_TABLE
    event_types: tuple[str, ...] = ()
    # Registered event classes (module or module:Class paths): one typed table each.
    event_classes: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        # The stores' own rules, checked when the code location loads.
        identity = RelayIdentity(self.name, tuple(self.event_types))
        object.__setattr__(self, "event_types", identity.event_types)
        try:
            quoted_table_name(self.table)
        except ConfigurationError as exc:
            raise ConfigurationError(f"relay {self.name}: {exc}") from None

    @property
    def identity(self) -> RelayIdentity:
        return RelayIdentity(self.name, self.event_types)

    @classmethod
    def from_settings(cls, settings: RelaySettings) -> RelayInstance:
        """The default relay: everything from the environment."""
        return cls(
            name=DEFAULT_RELAY,
            outbox_database_url=dg.EnvVar("OUTBOX_DATABASE_URL") if settings.outbox_database_url else None,
            clickhouse_url=dg.EnvVar("CLICKHOUSE_URL") if settings.clickhouse_url_setting else settings.clickhouse_url,
            settings=settings,
            event_classes=settings.event_classes,
        )

    @property
    def is_default(self) -> bool:
        return self.name == DEFAULT_RELAY

    def named(self, base: str) -> str:
        return definition_name(base, self.name)

    @property
    def asset_key(self) -> dg.AssetKey:
        return dg.AssetKey(self.table) if self.is_default else dg.AssetKey([self.name, self.table.replace(".", "__")])

    @functools.cached_property
    def typed_tables(self) -> tuple[TypedTable, ...]:
        """The typed tables of the registered classes; ConfigurationError (at load) for a class that cannot map."""
        where = "OUTBOX_EVENT_CLASSES" if self.is_default else f"relay {self.name}: event_classes"
        classes = load_event_classes(self.event_classes, where)
        tables = typed_tables(classes, self.table)
        for table in tables:
            if self.event_types and not any(fnmatch.fnmatchcase(table.event_type, p) for p in self.event_types):
                raise ConfigurationError(
                    f"{where}: {table.class_name} has event type {table.event_type}, which relay {self.name} does not take "
                    f"({self.described_event_types}); register it with the relay that does"
                )
        return tables

    def typed_asset_key(self, table: TypedTable) -> dg.AssetKey:
        return typed_asset_key(self.asset_key, table)

    @property
    def uses_chdb(self) -> bool:
        return (secret_value(self.clickhouse_url) or "").startswith("chdb:")

    @property
    def described_event_types(self) -> str:
        return ", ".join(self.event_types) if self.event_types else "all event types"
