"""The code location: the default relay from the environment, plus every ``OutboxRelay`` in ``defs/``.

``defs`` is what ``dagster dev`` (through workspace.yaml) and ``dg dev`` serve.
"""

import logging
from collections.abc import Sequence
from pathlib import Path

import dagster as dg

from outbox_pipeline.config.settings import RelaySettings, code_location_settings, load_settings
from outbox_pipeline.monitoring.sentry_setup import init_sentry
from outbox_pipeline.orchestration.fleet_defs import build_fleet_defs
from outbox_pipeline.orchestration.relay_defs import build_relay_defs
from outbox_pipeline.orchestration.relay_instance import RelayInstance
from outbox_pipeline.orchestration.run_failure_sensor import build_run_failure_sensor

PROJECT_DEFS = Path(__file__).parent / "defs"


def build_defs(
    settings: RelaySettings, *, with_defs_folder: bool = True, components: Sequence[dg.Definitions] = ()
) -> dg.Definitions:
    """The code location: the default relay, the relays in ``defs/`` (and ``components``), and the fleet that follows them all."""
    # Sensors run in the code server: start Sentry there too (a no-op without a DSN).
    init_sentry(settings.sentry)
    parts = [
        build_relay_defs(RelayInstance.from_settings(settings)),
        dg.Definitions(sensors=[build_run_failure_sensor(settings)], executor=dg.in_process_executor),
    ]
    # Only when a relay is configured there: an installed copy of the package has no project around it.
    if with_defs_folder and any(PROJECT_DEFS.rglob("defs.yaml")):
        parts.append(dg.load_from_defs_folder(path_within_project=PROJECT_DEFS))
    relays = dg.Definitions.merge(*parts, *components)
    # One run follows every relay found above; the one sensor starts it.
    return dg.Definitions.merge(relays, build_fleet_defs(relays, settings))


def build_resources(settings: RelaySettings | None = None) -> dict:
    """The default relay's run resources for ``settings`` (default: read the environment now)."""
    from outbox_pipeline.orchestration.relay_defs import build_resources as build_relay_resources

    return build_relay_resources(RelayInstance.from_settings(settings or load_settings()))


def _load() -> dg.Definitions:
    try:
        return build_defs(code_location_settings())
    except Exception as exc:
        # One line naming the variable, not a traceback through Dagster's loader.
        logging.getLogger(__name__).error(f"outbox_pipeline: {exc}")
        raise


defs = _load()
