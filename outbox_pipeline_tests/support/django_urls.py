"""The URLs of the test Django application (django_app.py): a view that publishes an event in its transaction."""

from decimal import Decimal

from django.db import connection, transaction
from django.http import JsonResponse
from django.urls import path

from outbox_pipeline.producer import publish
from outbox_pipeline.producer.events import OutboxEvent


class OrderPaid(OutboxEvent):
    order_id: int
    amount: Decimal
    currency: str
    email: str


def pay_order(request, order_id: int) -> JsonResponse:
    with transaction.atomic():
        event = OrderPaid(order_id=order_id, amount=Decimal("9.90"), currency="EUR", email="someone@example.com")
        publish(connection, event)
    return JsonResponse({"event_id": str(event.event_id)})


urlpatterns = [path("orders/<int:order_id>/pay/", pay_order)]
