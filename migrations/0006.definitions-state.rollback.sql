-- 0006.definitions-state rollback: the next migrate then re-applies db/ unconditionally.
DROP TABLE bulk_sync._definitions_state;
