"""An event class with a field that has no ClickHouse column type: registering it must fail at load."""

from outbox_pipeline.producer.events import OutboxEvent


class AttachmentUploaded(OutboxEvent):
    file_id: int
    content: bytes
