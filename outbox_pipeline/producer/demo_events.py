"""Sample domain events for `outbox-pipeline demo` and the benchmark."""

from __future__ import annotations

import random
from collections.abc import Iterator
from decimal import Decimal

from outbox_pipeline.producer.events import OutboxEvent


class UserCreated(OutboxEvent):
    user_id: int
    email: str
    plan: str


class OrderPaid(OutboxEvent):
    order_id: int
    user_id: int
    amount: Decimal
    currency: str


class OrderShipped(OutboxEvent):
    order_id: int
    carrier: str
    tracking_number: str


class PaymentRefunded(OutboxEvent):
    order_id: int
    amount: Decimal
    reason: str


def sample_events(count: int, *, seed: int | None = None) -> Iterator[OutboxEvent]:
    rng = random.Random(seed)
    for n in range(count):
        user_id = rng.randrange(1, 1_000_000)
        order_id = rng.randrange(1, 10_000_000)
        kind = rng.random()
        if kind < 0.3:
            yield UserCreated(user_id=user_id, email=f"user{user_id}@example.com", plan=rng.choice(["free", "team", "enterprise"]))
        elif kind < 0.7:
            amount = Decimal(rng.randrange(100, 100_000)) / 100
            yield OrderPaid(order_id=order_id, user_id=user_id, amount=amount, currency=rng.choice(["EUR", "USD", "GBP"]))
        elif kind < 0.9:
            yield OrderShipped(order_id=order_id, carrier=rng.choice(["dhl", "ups", "fedex"]), tracking_number=f"TRK{n:010d}")
        else:
            amount = Decimal(rng.randrange(100, 10_000)) / 100
            yield PaymentRefunded(order_id=order_id, amount=amount, reason=rng.choice(["damaged", "late", "changed_mind"]))
