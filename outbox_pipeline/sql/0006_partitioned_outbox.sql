-- Version 6: the outbox partitioned by UTC day of created_at, so retention drops whole days
-- (one catalog change each, whatever a day holds) instead of deleting row by row.
--
-- * outbox_pYYYYMMDD holds the events created that day (UTC); outbox_create_partitions makes
--   them ahead of time. outbox_default catches an event no partition covers (a day nobody
--   created in time): nothing is ever refused.
-- * outbox_legacy is the table as it was, attached whole as the partition of everything
--   created before outbox_partitioning.legacy_until (validated by 0005, so attaching it does
--   not read it). An empty one (a new database) is dropped instead.
-- * Indexes: (txid, id) for the relay, event_date_time for replays and checks, and each
--   partition's own primary key on id (lookups of failures, replica identity). The unique
--   event_id index and the created_at index are gone: partitions replace retention's index,
--   and a unique index on a partitioned table would have to include created_at.
-- * id comes from the sequence outbox_id_seq (partitioned tables have identity columns only
--   since PostgreSQL 17), continuing where the identity stopped.
--
-- The swap renames, attaches and creates, reading no table: producers wait for its lock at
-- most 100 ms at a time (then it is tried again) and for the swap itself a few milliseconds.
SET LOCAL lock_timeout = '100ms';
LOCK TABLE outbox IN ACCESS EXCLUSIVE MODE;

-- Days [first_day, last_day] (UTC) that have no partition get one; returns how many were made.
-- Skipped: days below outbox_legacy's bound, and days the default partition already holds
-- events of (they stay there, retired row by row).
CREATE OR REPLACE FUNCTION outbox_create_partitions(first_day date, last_day date) RETURNS integer
LANGUAGE plpgsql SECURITY DEFINER SET search_path FROM CURRENT AS $$
DECLARE
    day      date;
    starts   timestamptz;
    name     text;
    legacy   timestamptz := (SELECT legacy_until FROM outbox_partitioning);
    made     integer := 0;
BEGIN
    -- The retention runs of several relays on one outbox take turns here and in the drop below.
    PERFORM pg_advisory_xact_lock(7245100102);
    -- Making a partition locks the outbox briefly: never let producers queue behind it for long.
    PERFORM set_config('lock_timeout', '100ms', true);
    FOR day IN SELECT d::date FROM generate_series(first_day::timestamp, last_day::timestamp, interval '1 day') AS d LOOP
        starts := day::timestamp AT TIME ZONE 'UTC';
        name := 'outbox_p' || to_char(day, 'YYYYMMDD');
        CONTINUE WHEN to_regclass(name) IS NOT NULL
            OR (legacy IS NOT NULL AND starts < legacy)
            OR EXISTS (SELECT 1 FROM outbox_default WHERE created_at >= starts AND created_at < starts + interval '1 day');
        -- Insert-only: vacuum soon after a day's inserts keeps the relay's scans index-only.
        EXECUTE format(
            'CREATE TABLE %I PARTITION OF outbox (PRIMARY KEY (id)) FOR VALUES FROM (%L) TO (%L) '
            'WITH (autovacuum_vacuum_insert_scale_factor = 0.05)',
            name, starts, starts + interval '1 day');
        made := made + 1;
    END LOOP;
    RETURN made;
END $$;

-- Drops every partition whose days all end at or before older_than, unless one of its events
-- is not yet delivered by a relay that wants it, is in a batch still claimed, or waits in
-- outbox_failure. One row per partition looked at, with what happened to it. The partition is
-- locked before it is examined, so no writer can add to it in between.
CREATE OR REPLACE FUNCTION outbox_drop_delivered_partitions(older_than timestamptz)
RETURNS TABLE (partition_name text, ends timestamptz, estimated_rows bigint, outcome text)
LANGUAGE plpgsql SECURITY DEFINER SET search_path FROM CURRENT AS $$
DECLARE
    part  record;
    kept  text;
BEGIN
    PERFORM pg_advisory_xact_lock(7245100102);
    PERFORM set_config('lock_timeout', '100ms', true);
    FOR part IN
        SELECT c.oid::regclass AS rel, c.relname::text AS name, greatest(c.reltuples, 0)::bigint AS estimate,
               substring(pg_get_expr(c.relpartbound, c.oid) FROM 'TO \(''([^'']+)''\)')::timestamptz AS upper
        FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
        WHERE i.inhparent = 'outbox'::regclass
        ORDER BY 4
    LOOP
        CONTINUE WHEN part.upper IS NULL OR part.upper > older_than;  -- the default partition, or too recent
        partition_name := part.name;
        ends := part.upper;
        estimated_rows := part.estimate;
        BEGIN
            EXECUTE format('LOCK TABLE %s IN ACCESS EXCLUSIVE MODE', part.rel);
            EXECUTE format($check$
                SELECT CASE
                    WHEN EXISTS (SELECT 1 FROM outbox_failure f JOIN %1$s o ON o.id = f.outbox_id)
                        THEN 'kept: events wait in outbox_failure'
                    WHEN EXISTS (
                        SELECT 1 FROM outbox_batch b
                        WHERE b.state = 'claimed' AND b.kind = 'range' AND EXISTS (
                            SELECT 1 FROM %1$s o
                            WHERE (o.txid, o.id) >= (b.first_txid, b.first_id) AND (o.txid, o.id) <= (b.last_txid, b.last_id)))
                        THEN 'kept: events in a batch still claimed'
                    WHEN EXISTS (
                        SELECT 1 FROM outbox_relay_cursor r
                        WHERE EXISTS (
                            SELECT 1 FROM %1$s o
                            WHERE (o.txid, o.id) > (r.claimed_txid, r.claimed_id)
                              AND (cardinality(r.event_type_patterns) = 0 OR o.event_type LIKE ANY (r.event_type_patterns))))
                        THEN 'kept: events not yet delivered'
                END
            $check$, part.rel) INTO kept;
            IF kept IS NULL THEN
                EXECUTE format('DROP TABLE %s', part.rel);
                IF part.name = 'outbox_legacy' THEN
                    UPDATE outbox_partitioning SET legacy_until = NULL;
                END IF;
                outcome := 'dropped';
            ELSE
                outcome := kept;
            END IF;
        EXCEPTION WHEN lock_not_available THEN
            outcome := 'kept: busy, a transaction holds it';
        END;
        RETURN NEXT;
    END LOOP;
END $$;

-- SECURITY DEFINER: only the roles granted them may call these (roles.py grants the relay role).
REVOKE EXECUTE ON FUNCTION outbox_create_partitions(date, date) FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION outbox_drop_delivered_partitions(timestamptz) FROM PUBLIC;

DO $$
DECLARE
    bound          timestamptz := (SELECT legacy_until FROM outbox_partitioning);
    next_id        bigint;
    keep_legacy    boolean := EXISTS (SELECT 1 FROM outbox);
    notifying      boolean := EXISTS (SELECT 1 FROM pg_trigger WHERE tgname = 'outbox_notify_commit' AND tgrelid = 'outbox'::regclass);
    owner_oid      oid := (SELECT relowner FROM pg_class WHERE oid = 'outbox'::regclass);
    grant_row      record;
    today          date := (now() AT TIME ZONE 'UTC')::date;
BEGIN
    EXECUTE format('SELECT CASE WHEN is_called THEN last_value + 1 ELSE last_value END FROM %s',
                   pg_get_serial_sequence('outbox', 'id')) INTO next_id;

    DROP VIEW outbox_event_status;
    IF notifying THEN
        DROP TRIGGER outbox_notify_commit ON outbox;
    END IF;
    ALTER TABLE outbox ALTER COLUMN id DROP IDENTITY;
    ALTER TABLE outbox ALTER COLUMN created_at SET DEFAULT now();
    ALTER TABLE outbox RENAME TO outbox_legacy;
    ALTER TABLE outbox_legacy RENAME CONSTRAINT outbox_pkey TO outbox_legacy_pkey;
    ALTER TABLE outbox_legacy RENAME CONSTRAINT outbox_event_id_key TO outbox_legacy_event_id_key;
    ALTER INDEX outbox_txid_id_idx RENAME TO outbox_legacy_txid_id_idx;
    ALTER INDEX outbox_event_date_time_idx RENAME TO outbox_legacy_event_date_time_idx;
    ALTER INDEX outbox_created_at_idx RENAME TO outbox_legacy_created_at_idx;

    CREATE SEQUENCE outbox_id_seq AS bigint;
    PERFORM setval('outbox_id_seq', next_id, false);
    CREATE TABLE outbox (
        id                bigint      NOT NULL DEFAULT nextval('outbox_id_seq'),
        event_id          uuid        NOT NULL,
        event_type        text        NOT NULL,
        event_date_time   timestamptz NOT NULL,
        environment       text        NOT NULL,
        event_context     text        NOT NULL,
        metadata_version  integer     NOT NULL DEFAULT 1,
        created_at        timestamptz NOT NULL DEFAULT now(),
        txid              xid8        NOT NULL DEFAULT pg_current_xact_id(),
        sentry_trace      text,
        sentry_baggage    text
    ) PARTITION BY RANGE (created_at);
    ALTER SEQUENCE outbox_id_seq OWNED BY outbox.id;
    CREATE INDEX outbox_txid_id_idx ON outbox (txid, id);
    CREATE INDEX outbox_event_date_time_idx ON outbox (event_date_time);

    IF keep_legacy THEN
        -- The legacy table's own (txid, id) and event_date_time indexes become the partitions' of these.
        EXECUTE format('ALTER TABLE outbox ATTACH PARTITION outbox_legacy FOR VALUES FROM (MINVALUE) TO (%L)', bound);
    ELSE
        DROP TABLE outbox_legacy;
        UPDATE outbox_partitioning SET legacy_until = NULL;
    END IF;
    CREATE TABLE outbox_default PARTITION OF outbox (PRIMARY KEY (id)) DEFAULT;
    PERFORM outbox_create_partitions(today, today + 7);

    -- Whoever could write or read the outbox before can now: the grants move to the new table.
    FOR grant_row IN
        SELECT CASE WHEN a.grantee = 0 THEN 'PUBLIC' ELSE quote_ident(pg_get_userbyid(a.grantee)) END AS who, a.privilege_type AS what
        FROM pg_class c, aclexplode(c.relacl) a
        WHERE c.oid = to_regclass('outbox_legacy') AND a.grantee <> owner_oid
    LOOP
        EXECUTE format('GRANT %s ON outbox TO %s', grant_row.what, grant_row.who);
        IF grant_row.what = 'INSERT' THEN
            EXECUTE format('GRANT USAGE ON SEQUENCE outbox_id_seq TO %s', grant_row.who);
        ELSIF grant_row.what IN ('SELECT', 'DELETE') THEN
            EXECUTE format('GRANT %s ON outbox_default TO %s', grant_row.what, grant_row.who);
        END IF;
        IF grant_row.what = 'DELETE' THEN
            EXECUTE format('GRANT EXECUTE ON FUNCTION outbox_create_partitions(date, date), '
                           'outbox_drop_delivered_partitions(timestamptz) TO %s', grant_row.who);
        END IF;
    END LOOP;

    IF notifying THEN
        CREATE TRIGGER outbox_notify_commit AFTER INSERT ON outbox
            FOR EACH STATEMENT EXECUTE FUNCTION outbox_notify_commit();
    END IF;
END $$;

-- As in version 2, on the partitioned table.
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
