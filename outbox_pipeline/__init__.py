"""Transactional-outbox relay from PostgreSQL into ClickHouse, orchestrated by Dagster and monitored by Sentry.

The public names live here:

    from outbox_pipeline import publish, publish_many, OutboxEvent, RawEvent, OutboxRelay

They are imported on first use, so that an application publishing events does not load
Dagster, and ``outbox_pipeline.OutboxRelay`` (the Dagster component) only loads it when asked.

Layers, each importing only those listed before it:
``config`` → ``stores`` → ``producer`` → ``relay`` → ``monitoring`` → ``orchestration``
→ ``definitions``, ``cli`` and ``bench``.
"""

from importlib import import_module

_PUBLIC = {
    "publish": "outbox_pipeline.producer.publishing",
    "publish_many": "outbox_pipeline.producer.publishing",
    "OutboxEvent": "outbox_pipeline.producer.events",
    "RawEvent": "outbox_pipeline.producer.events",
    "OutboxRelay": "outbox_pipeline.orchestration.component",
}

__all__ = sorted(_PUBLIC)


def __getattr__(name: str):
    if name in _PUBLIC:
        return getattr(import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'outbox_pipeline' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
