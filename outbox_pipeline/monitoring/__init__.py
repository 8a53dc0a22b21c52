"""Sentry: set-up and scrubbing, per-run transactions, Crons check-ins, queue tracing and metrics.

May import ``config``, ``stores``, ``producer`` (trace headers) and ``relay``, and Dagster's public
types; never ``orchestration``, which wires these into hooks and sensors.
"""
