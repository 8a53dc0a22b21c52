"""The Dagster definitions of a relay: ops, jobs, sensors, schedules, assets, resources and the
``OutboxRelay`` component.

May import every layer below it; ``outbox_pipeline.definitions`` builds the code location from here.
"""
