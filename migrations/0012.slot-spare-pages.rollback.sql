-- 0012.slot-spare-pages rollback: vacuum may truncate the slots' table again. The free pages stay
-- until it does.
ALTER TABLE bulk_sync._global_slots RESET (vacuum_truncate);
