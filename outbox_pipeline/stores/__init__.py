"""The two stores and all of their SQL: the outbox in PostgreSQL and ``event_log`` in ClickHouse.

May import ``config`` only. Every statement the project sends to PostgreSQL or ClickHouse is
written here, once.
"""
