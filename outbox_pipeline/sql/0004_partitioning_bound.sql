-- Version 4, the first of three steps to an outbox partitioned by day (0006): it fixes the
-- moment from which the days get partitions of their own. The events created before it,
-- the whole table as it is now, become one partition, outbox_legacy, which PostgreSQL can
-- attach without reading it only if a validated constraint already says so (0005).
--
-- Everything here changes the catalog only, under a brief exclusive lock on the outbox
-- (given up after 100 ms and tried again, so producers never queue behind it for long).
SET LOCAL lock_timeout = '100ms';

CREATE TABLE outbox_partitioning (
    singleton     boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    -- the upper bound of outbox_legacy; NULL once no such partition exists
    legacy_until  timestamptz
);
-- Midnight UTC one to two days ahead: a day at least for 0005 and 0006 to follow.
INSERT INTO outbox_partitioning (legacy_until)
VALUES ((date_trunc('day', now() AT TIME ZONE 'UTC') + interval '2 days') AT TIME ZONE 'UTC');

DO $$
DECLARE
    bound timestamptz := (SELECT legacy_until FROM outbox_partitioning);
BEGIN
    -- Should the upgrade stop before 0006 for longer than that day, new events still
    -- satisfy the bound instead of failing their producers' transactions.
    EXECUTE format('ALTER TABLE outbox ALTER COLUMN created_at SET DEFAULT least(now(), %L::timestamptz - interval ''1 microsecond'')', bound);
    EXECUTE format('ALTER TABLE outbox ADD CONSTRAINT outbox_created_before_partitions CHECK (created_at < %L::timestamptz) NOT VALID', bound);
END $$;

-- A foreign key cannot point at a partitioned table by id alone. Retention never removes
-- an event with a failure record (replay_retention.py), which is what the key protected.
ALTER TABLE outbox_failure DROP CONSTRAINT IF EXISTS outbox_failure_outbox_id_fkey;
