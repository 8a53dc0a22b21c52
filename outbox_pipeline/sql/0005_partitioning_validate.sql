-- Version 5: check that every event is older than the bound of version 4. This reads the
-- whole outbox, under a SHARE UPDATE EXCLUSIVE lock that producers and relays do not
-- conflict with: they keep writing and reading while it runs, however large the table.
ALTER TABLE outbox VALIDATE CONSTRAINT outbox_created_before_partitions;
