"""One relay of a code location: where it reads, where it writes, what it takes, and its settings.

The default relay comes from the environment and keeps the project's original
names (``process_outbox_events``, ``outbox_pending_sensor``, the ``event_log``
asset, …). Every other relay comes from an ``OutboxRelay`` component in a
``defs.yaml`` and has its name appended to each definition
(``process_outbox_events_orders``).
"""

from __future__ import annotations

import dataclasses
import re

import dagster as dg

from outbox_pipeline.errors import ConfigurationError
from outbox_pipeline.settings import RelaySettings

DEFAULT_RELAY = "default"
DEFAULT_TABLE = "event_log"
# Which relay of the code location a run belongs to.
RELAY_NAME_TAG = "outbox_pipeline/relay_name"

_NAME = re.compile(r"^[a-z][a-z0-9_]{0,39}$")
_TABLE = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*\.)?[A-Za-z_][A-Za-z0-9_]*$")
_EVENT_TYPE_PATTERN = re.compile(r"^[A-Za-z0-9_.:*?\-]+$")


def definition_name(base: str, relay_name: str) -> str:
    """A definition's name for a relay: ``base`` for the default relay, ``base_<name>`` for the others."""
    return base if relay_name == DEFAULT_RELAY else f"{base}_{relay_name}"


def secret_value(value: str | None) -> str | None:
    """The value behind a ``dg.EnvVar`` (kept as the variable's name in the UI), or the value itself."""
    if isinstance(value, dg.EnvVar):
        return value.get_value()
    return value


@dataclasses.dataclass(frozen=True)
class RelayInstance:
    name: str
    # Either may be a dg.EnvVar: resources then show the variable's name, never the URL.
    outbox_database_url: str | None
    clickhouse_url: str
    settings: RelaySettings
    table: str = DEFAULT_TABLE
    event_types: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not _NAME.match(self.name):
            raise ConfigurationError(
                f"relay name {self.name!r} must be lowercase letters, digits and underscores, starting with a letter (at most 40)"
            )
        if not _TABLE.match(self.table):
            raise ConfigurationError(f"relay {self.name}: table {self.table!r} must be a plain ClickHouse name, as event_log or analytics.event_log")
        for pattern in self.event_types:
            if not _EVENT_TYPE_PATTERN.match(pattern):
                raise ConfigurationError(
                    f"relay {self.name}: event type pattern {pattern!r} may hold letters, digits, _ . : - and the wildcards * and ?"
                )

    @classmethod
    def from_settings(cls, settings: RelaySettings) -> "RelayInstance":
        """The default relay: everything from the environment."""
        return cls(
            name=DEFAULT_RELAY,
            outbox_database_url=dg.EnvVar("OUTBOX_DATABASE_URL") if settings.outbox_database_url else None,
            clickhouse_url=dg.EnvVar("CLICKHOUSE_URL") if settings.clickhouse_url_setting else settings.clickhouse_url,
            settings=settings,
        )

    @property
    def is_default(self) -> bool:
        return self.name == DEFAULT_RELAY

    def named(self, base: str) -> str:
        return definition_name(base, self.name)

    @property
    def asset_key(self) -> dg.AssetKey:
        return dg.AssetKey(self.table) if self.is_default else dg.AssetKey([self.name, self.table.replace(".", "__")])

    @property
    def uses_chdb(self) -> bool:
        return (secret_value(self.clickhouse_url) or "").startswith("chdb:")

    @property
    def described_event_types(self) -> str:
        return ", ".join(self.event_types) if self.event_types else "all event types"
