"""Relays of this code location beyond the default one: one folder per ``OutboxRelay``, each with a ``defs.yaml``.

``dg scaffold defs outbox_pipeline.OutboxRelay <name>`` adds one.
"""
