"""The framework-free relay core: claim, load, mark (``delivery``), read-ahead (``prefetch``),
following a stream (``following``) and retrying store calls (``retrying``).

May import ``config`` and ``stores``. The Dagster ops, the command line and the benches all
run this same code.
"""
