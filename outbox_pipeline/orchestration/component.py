"""``outbox_pipeline.OutboxRelay``: one more relay in a code location, configured in a ``defs.yaml``.

    type: outbox_pipeline.OutboxRelay
    attributes:
      name: orders
      outbox_database_url: "{{ env.ORDERS_OUTBOX_DATABASE_URL }}"
      clickhouse_url: "{{ env.CLICKHOUSE_URL }}"
      table: orders_event_log
      event_types: ["order_*"]
      event_classes: ["myapp.events"]   # optional: a typed table per event class

Each instance gets its own relay, requeue, replay, cleanup and check jobs, sensors,
schedules and asset, named with its ``name`` (``process_outbox_events_orders``),
and its own bookkeeping in the outbox, so several relays can read one outbox.
Batch sizes, leases, retries, cadences and Sentry come from the code location's
environment (see docs/configuration.md), read once for every relay.

A URL given as ``{{ env.NAME }}`` stays a reference to that variable: the UI shows
the variable's name, never the URL and its password.
"""

from __future__ import annotations

import os
import re
from typing import Annotated, Any

import dagster as dg
from pydantic import Field

from outbox_pipeline.config.errors import ConfigurationError
from outbox_pipeline.config.settings import code_location_settings
from outbox_pipeline.orchestration.relay_defs import build_relay_defs
from outbox_pipeline.orchestration.relay_instance import DEFAULT_RELAY, DEFAULT_TABLE, RelayInstance, secret_value
from outbox_pipeline.stores.clickhouse_connection import validate_clickhouse_url
from outbox_pipeline.stores.postgres_connection import validate_postgres_url

_ENV_REFERENCE = re.compile(r"""^\s*\{\{\s*env(?:\.(?P<attr>\w+)|\(\s*['"](?P<call>\w+)['"]\s*\))\s*\}\}\s*$""")


def _kept_secret(context: dg.ResolutionContext, raw: str | None) -> str | None:
    """``{{ env.NAME }}`` becomes a dg.EnvVar (resolved at run time, shown by name); anything else is rendered."""
    if raw is None:
        return None
    reference = _ENV_REFERENCE.match(raw)
    if reference:
        return dg.EnvVar(reference.group("attr") or reference.group("call"))
    return context.resolve_value(raw, as_type=str)


# The resolved value is a str or a dg.EnvVar (a str subclass that pydantic would turn into a plain str).
SecretUrl = Annotated[
    Any,
    dg.Resolver(
        _kept_secret,
        model_field_type=str | None,
        inject_before_resolve=False,
        description='A URL, best given as "{{ env.NAME }}" so that its password never shows in the UI.',
    ),
]


class OutboxRelayScaffolder(dg.Scaffolder):
    """``dg scaffold defs outbox_pipeline.OutboxRelay <name>``: a defs.yaml with every attribute filled in."""

    def scaffold(self, request: dg.ScaffoldRequest) -> None:
        name = re.sub(r"\W", "_", request.target_path.name.lower())
        dg.scaffold_component(
            request,
            {
                "name": name,
                # ClickHouse is left out: the code location's CLICKHOUSE_URL (or the embedded chDB) is used.
                "outbox_database_url": f"{{{{ env.{name.upper()}_OUTBOX_DATABASE_URL }}}}",
                "table": f"{name}_event_log",
                "event_types": [f"{name}_*"],
            },
        )


@dg.scaffold_with(OutboxRelayScaffolder)
class OutboxRelay(dg.Component, dg.Model, dg.Resolvable):
    """A relay from a PostgreSQL outbox into a ClickHouse table: jobs, sensors, schedules, asset and checks."""

    name: str = Field(description="Lowercase name; definitions are suffixed with it (process_outbox_events_<name>).")
    outbox_database_url: SecretUrl = Field(
        default=None, description="postgresql:// URL of the outbox; unset: the code location's OUTBOX_DATABASE_URL."
    )
    clickhouse_url: SecretUrl = Field(
        default=None, description="http(s):// or chdb:/// URL of ClickHouse; unset: the code location's CLICKHOUSE_URL."
    )
    table: str = Field(default=DEFAULT_TABLE, description="The destination table in ClickHouse.")
    event_types: list[str] | None = Field(
        default=None, description="Glob patterns of the event types this relay takes (order_*); unset: all."
    )
    event_classes: list[str] | None = Field(
        default=None,
        description="Modules (or module:Class) whose OutboxEvent classes get a typed table each (<table>_<event_type>); unset: none.",
    )

    def relay_instance(self) -> RelayInstance:
        settings = code_location_settings()
        if self.name == DEFAULT_RELAY:
            raise ConfigurationError(f"relay name {DEFAULT_RELAY!r} is the environment-configured relay's; choose another")
        outbox_url = self.outbox_database_url
        if outbox_url is None and settings.outbox_database_url:
            outbox_url = dg.EnvVar("OUTBOX_DATABASE_URL")
        clickhouse_url = self.clickhouse_url
        if clickhouse_url is None:
            clickhouse_url = dg.EnvVar("CLICKHOUSE_URL") if settings.clickhouse_url_setting else settings.clickhouse_url
        _validate_url(f"relay {self.name}: outbox_database_url", outbox_url, validate_postgres_url)
        _validate_url(f"relay {self.name}: clickhouse_url", clickhouse_url, validate_clickhouse_url)
        return RelayInstance(
            name=self.name,
            outbox_database_url=outbox_url,
            clickhouse_url=clickhouse_url,
            settings=settings,
            table=self.table,
            event_types=tuple(self.event_types or ()),
            event_classes=tuple(self.event_classes or ()),
        )

    def build_defs(self, context: dg.ComponentLoadContext) -> dg.Definitions:
        return build_relay_defs(self.relay_instance())


def _validate_url(what: str, url: str | None, validate) -> None:
    if url is None:
        return
    if isinstance(url, dg.EnvVar) and not os.environ.get(url.env_var_name):
        raise ConfigurationError(f"{what}: the variable {url.env_var_name} is not set")
    try:
        validate(secret_value(url))
    except ConfigurationError as exc:
        raise ConfigurationError(f"{what}: {exc}") from None
