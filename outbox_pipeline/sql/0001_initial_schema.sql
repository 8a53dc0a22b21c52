-- Version 1: the schema of the first release, exactly. A database created by that
-- release is at version 1. Never edit this file: later changes go in new files.
CREATE TABLE IF NOT EXISTS outbox (
    id                bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    event_id          uuid        NOT NULL,
    event_type        text        NOT NULL,
    event_date_time   timestamptz NOT NULL,
    environment       text        NOT NULL,
    -- text, not jsonb: the payload is kept byte for byte as the producer serialized it
    event_context     text        NOT NULL,
    metadata_version  integer     NOT NULL DEFAULT 1,
    created_at        timestamptz NOT NULL DEFAULT now(),
    -- the writing transaction: the relay's order and completeness horizon
    txid              xid8        NOT NULL DEFAULT pg_current_xact_id(),
    CONSTRAINT outbox_event_id_key UNIQUE (event_id)
);
-- Pending work is found by one index range scan past the relay cursor, however
-- many processed rows the table holds.
CREATE INDEX IF NOT EXISTS outbox_txid_id_idx ON outbox (txid, id);
-- Replays select one day of events.
CREATE INDEX IF NOT EXISTS outbox_event_date_time_idx ON outbox (event_date_time);
-- Retention deletes by age in small batches.
CREATE INDEX IF NOT EXISTS outbox_created_at_idx ON outbox (created_at);
-- Rows are never updated and deleted only by retention: vacuum often enough to
-- keep the retention deletes from piling up dead tuples.
ALTER TABLE outbox SET (autovacuum_vacuum_scale_factor = 0.02, autovacuum_vacuum_insert_scale_factor = 0.05);

CREATE TABLE IF NOT EXISTS outbox_relay_cursor (
    singleton     boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    claimed_txid  xid8    NOT NULL DEFAULT '0',
    claimed_id    bigint  NOT NULL DEFAULT 0,
    -- names this outbox in ClickHouse deduplication tokens, so a recreated outbox
    -- whose batch ids start again at 1 never collides with an older one's tokens
    installation_id uuid NOT NULL DEFAULT gen_random_uuid(),
    updated_at    timestamptz NOT NULL DEFAULT now()
);
INSERT INTO outbox_relay_cursor (singleton) VALUES (true) ON CONFLICT DO NOTHING;

CREATE TABLE IF NOT EXISTS outbox_batch (
    id                 bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    kind               text    NOT NULL CHECK (kind IN ('range', 'retry')),
    -- a range batch holds the outbox rows with (txid, id) between first and last
    first_txid         xid8,
    first_id           bigint,
    last_txid          xid8,
    last_id            bigint,
    row_count          integer NOT NULL,
    oldest_created_at  timestamptz,
    state              text    NOT NULL DEFAULT 'claimed' CHECK (state IN ('claimed', 'done')),
    claimed_by         text    NOT NULL,
    claim_count        integer NOT NULL DEFAULT 1,
    claimed_at         timestamptz NOT NULL DEFAULT now(),
    lease_expires_at   timestamptz NOT NULL,
    -- positions where a rejected block was split; the blocks between them are
    -- what was (or will be) inserted, each under its own deduplication token
    split_points       integer[] NOT NULL DEFAULT '{}',
    loaded_rows        integer,
    failed_rows        integer,
    done_at            timestamptz
);
CREATE INDEX IF NOT EXISTS outbox_batch_open_idx ON outbox_batch (lease_expires_at) WHERE state = 'claimed';
CREATE INDEX IF NOT EXISTS outbox_batch_done_at_idx ON outbox_batch (done_at) WHERE state = 'done';

CREATE TABLE IF NOT EXISTS outbox_failure (
    outbox_id        bigint PRIMARY KEY REFERENCES outbox (id) ON DELETE CASCADE,
    event_id         uuid    NOT NULL,
    state            text    NOT NULL CHECK (state IN ('retrying', 'failed')),
    attempts         integer NOT NULL,
    last_error       text    NOT NULL,
    first_failed_at  timestamptz NOT NULL DEFAULT now(),
    updated_at       timestamptz NOT NULL DEFAULT now(),
    next_attempt_at  timestamptz NOT NULL,
    batch_id         bigint REFERENCES outbox_batch (id) ON DELETE SET NULL
);
CREATE INDEX IF NOT EXISTS outbox_failure_due_idx ON outbox_failure (next_attempt_at) WHERE state = 'retrying';

-- One row per event with its delivery state, for people looking at a single event.
CREATE OR REPLACE VIEW outbox_event_status AS
SELECT o.id, o.event_id, o.event_type, o.event_date_time, o.created_at,
       CASE WHEN f.state IS NOT NULL THEN f.state
            WHEN b.state = 'done' THEN 'processed'
            WHEN b.state = 'claimed' THEN 'in_flight'
            ELSE 'pending' END AS state,
       b.id AS batch_id, b.claimed_by, b.done_at AS processed_at,
       f.attempts, f.last_error, f.next_attempt_at
FROM outbox o
LEFT JOIN outbox_failure f ON f.outbox_id = o.id
LEFT JOIN LATERAL (
    SELECT b.id, b.state, b.claimed_by, b.done_at FROM outbox_batch b
    WHERE b.kind = 'range'
      AND (o.txid, o.id) >= (b.first_txid, b.first_id) AND (o.txid, o.id) <= (b.last_txid, b.last_id)
    LIMIT 1
) b ON true;

CREATE TABLE IF NOT EXISTS outbox_schema_version (
    version     integer PRIMARY KEY,
    applied_at  timestamptz NOT NULL DEFAULT now()
);
INSERT INTO outbox_schema_version (version) VALUES (1) ON CONFLICT DO NOTHING;
