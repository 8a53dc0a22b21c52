"""The demo's OrderPaid with a changed field type (amount: int), as a producer might change it."""

from outbox_pipeline.producer.events import OutboxEvent


class OrderPaid(OutboxEvent):
    order_id: int
    user_id: int
    amount: int
    currency: str
