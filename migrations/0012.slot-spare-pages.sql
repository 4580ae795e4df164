-- 0012.slot-spare-pages: free pages beside the global slots, so that a long snapshot does not
-- spread them over a table that every sum of the slots reads.
-- depends: 0011.checked-actions

-- Every counted change updates one slot. The new version stays on the slot's page while the page
-- has room, and old versions are pruned as they die. While a snapshot older than them lasts (an
-- ANALYZE, a report, a reconcile), none can be pruned: the page fills and the next update moves
-- the slot to another page. With no free page known, that extends the table, by up to 20 pages
-- for each writer waiting to extend it, and the moved slots then sit at its end, where vacuum
-- cannot cut it short. Measured: under 32 writers one round of autoanalyze spread the slots
-- from 3 pages over 185, and a sum of the slots, which log_action reads for its response, took
-- 43 µs instead of 13 (docs/PERFORMANCE.md, "The slots' spare pages").
--
-- So the table gets 32 pages now. Once VACUUM has recorded them in the free space map (autovacuum
-- does, for this migration's dead versions), a slot that must move goes to one of them, and
-- vacuum_truncate = false keeps them. A sum then reads 32 pages (18 µs) before and after a
-- snapshot held for up to about a second at 3,500 changes a second; a longer one still extends
-- the table. VACUUM FULL packs the slots into a few pages again and drops the spare pages.

-- A storage parameter: SHARE UPDATE EXCLUSIVE, which writers' ROW EXCLUSIVE does not conflict with.
ALTER TABLE bulk_sync._global_slots SET (vacuum_truncate = false);

-- The pages are made by versions of slot 64, which only reconcile's corrections write: no writer
-- waits here (and lock_timeout bounds a wait for a running reconcile). They are dead at commit.
DO $$
BEGIN
    WHILE pg_relation_size('bulk_sync._global_slots') < 32 * current_setting('block_size')::bigint LOOP
        UPDATE bulk_sync._global_slots SET last_updated = last_updated WHERE slot = 64;
        EXIT WHEN NOT FOUND;
    END LOOP;
END
$$;
