-- Version 2: several relays per outbox, each with its own cursor, batches, leases and failures.
--
-- A relay is a name and an optional list of event-type patterns (SQL LIKE; empty:
-- every type). The bookkeeping of version 1 becomes the relay named 'default', in
-- place: its cursor, its batches (done or in flight, under the same deduplication
-- tokens) and its failures keep their meaning. Nothing here locks the outbox table
-- itself, so producers keep writing during the upgrade.

-- The outbox's name in deduplication tokens: one per database, whatever the relay.
CREATE TABLE outbox_installation (
    singleton        boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    installation_id  uuid        NOT NULL DEFAULT gen_random_uuid(),
    created_at       timestamptz NOT NULL DEFAULT now()
);
INSERT INTO outbox_installation (installation_id) SELECT installation_id FROM outbox_relay_cursor;
INSERT INTO outbox_installation DEFAULT VALUES ON CONFLICT DO NOTHING;

-- One row per relay registered on this outbox: its filter and its cursor.
ALTER TABLE outbox_relay_cursor ADD COLUMN relay text NOT NULL DEFAULT 'default';
ALTER TABLE outbox_relay_cursor ALTER COLUMN relay DROP DEFAULT;
-- Dropping the singleton also drops its primary key: a relay of the first release,
-- still running, fails on its next claim instead of moving every relay's cursor.
ALTER TABLE outbox_relay_cursor DROP COLUMN singleton;
ALTER TABLE outbox_relay_cursor DROP COLUMN installation_id;
ALTER TABLE outbox_relay_cursor ADD PRIMARY KEY (relay);
ALTER TABLE outbox_relay_cursor ADD CONSTRAINT outbox_relay_cursor_relay_check CHECK (relay ~ '^[A-Za-z_][A-Za-z0-9_]{0,62}$');
-- The patterns as configured (globs, for people) and as evaluated (LIKE).
ALTER TABLE outbox_relay_cursor ADD COLUMN event_types text[] NOT NULL DEFAULT '{}';
ALTER TABLE outbox_relay_cursor ADD COLUMN event_type_patterns text[] NOT NULL DEFAULT '{}';
ALTER TABLE outbox_relay_cursor ADD COLUMN registered_at timestamptz NOT NULL DEFAULT now();

ALTER TABLE outbox_batch ADD COLUMN relay text NOT NULL DEFAULT 'default' REFERENCES outbox_relay_cursor (relay);
ALTER TABLE outbox_batch ALTER COLUMN relay DROP DEFAULT;
-- A range batch holds the rows of its key range that match these patterns, fixed at
-- the claim: a relay whose filter changes later still reloads the same rows.
ALTER TABLE outbox_batch ADD COLUMN event_type_patterns text[] NOT NULL DEFAULT '{}';
DROP INDEX outbox_batch_open_idx;
CREATE INDEX outbox_batch_open_idx ON outbox_batch (relay, lease_expires_at) WHERE state = 'claimed';

-- An event can fail for one relay (its table rejects it) and land for another.
ALTER TABLE outbox_failure ADD COLUMN relay text NOT NULL DEFAULT 'default' REFERENCES outbox_relay_cursor (relay);
ALTER TABLE outbox_failure ALTER COLUMN relay DROP DEFAULT;
ALTER TABLE outbox_failure DROP CONSTRAINT outbox_failure_pkey;
-- outbox_id first: retention and the cascade from outbox look failures up by event.
ALTER TABLE outbox_failure ADD PRIMARY KEY (outbox_id, relay);
DROP INDEX outbox_failure_due_idx;
CREATE INDEX outbox_failure_due_idx ON outbox_failure (relay, next_attempt_at) WHERE state = 'retrying';

-- One row per event and relay whose filter matches it, with that relay's delivery state.
-- Processed is decided by the relay's cursor, so it stays right after retention
-- deletes old batches.
DROP VIEW outbox_event_status;
CREATE VIEW outbox_event_status AS
SELECT r.relay, o.id, o.event_id, o.event_type, o.event_date_time, o.created_at,
       CASE WHEN f.state IS NOT NULL THEN f.state
            WHEN b.state = 'claimed' THEN 'in_flight'
            WHEN (o.txid, o.id) > (r.claimed_txid, r.claimed_id) THEN 'pending'
            ELSE 'processed' END AS state,
       b.id AS batch_id, b.claimed_by, b.done_at AS processed_at,
       f.attempts, f.last_error, f.next_attempt_at
FROM outbox o
JOIN outbox_relay_cursor r
  ON cardinality(r.event_type_patterns) = 0 OR o.event_type LIKE ANY (r.event_type_patterns)
LEFT JOIN outbox_failure f ON f.outbox_id = o.id AND f.relay = r.relay
LEFT JOIN LATERAL (
    SELECT b.id, b.state, b.claimed_by, b.done_at FROM outbox_batch b
    WHERE b.relay = r.relay AND b.kind = 'range'
      AND (o.txid, o.id) >= (b.first_txid, b.first_id) AND (o.txid, o.id) <= (b.last_txid, b.last_id)
    LIMIT 1
) b ON true;
