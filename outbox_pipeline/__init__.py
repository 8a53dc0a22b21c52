"""Transactional-outbox relay from PostgreSQL into ClickHouse, orchestrated by Dagster and monitored by Sentry.

``outbox_pipeline.OutboxRelay`` is the Dagster component. It is imported on first
use only, so that applications importing the producer API do not load Dagster.
"""

__all__ = ["OutboxRelay"]


def __getattr__(name: str):
    if name == "OutboxRelay":
        from outbox_pipeline.component import OutboxRelay

        return OutboxRelay
    raise AttributeError(f"module 'outbox_pipeline' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
