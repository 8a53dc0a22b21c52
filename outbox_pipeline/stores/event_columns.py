"""The columns of an event, in the order the outbox hands them to ClickHouse.

Both stores use this one definition: the PostgreSQL side selects them in this
order (as CSV straight from COPY), the ClickHouse side inserts them in this order.
"""

EVENT_COLUMNS = ("event_id", "event_type", "event_date_time", "environment", "event_context", "metadata_version")

# The default relay's ClickHouse table; producers name it as their queue.publish spans' destination.
DEFAULT_TABLE = "event_log"
