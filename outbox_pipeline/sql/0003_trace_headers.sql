-- Version 3: the Sentry trace an event was published in, so the relay can continue it.
--
-- A producer that publishes inside a traced Sentry transaction stores its queue.publish
-- span's `sentry-trace` and `baggage` headers with each event of the call; the relay
-- continues that trace when it delivers the event. NULL for every other event, and for
-- every event written before this version.
--
-- Nullable columns without a default change the catalog only (no rewrite, no scan), but
-- need a brief exclusive lock on the outbox. While that lock waits for transactions that
-- have written to the outbox, new producers would queue behind it: give up after a short
-- wait instead, and let `outbox-pipeline init` try again (migrations.py).
SET LOCAL lock_timeout = '100ms';
ALTER TABLE outbox ADD COLUMN sentry_trace text, ADD COLUMN sentry_baggage text;
