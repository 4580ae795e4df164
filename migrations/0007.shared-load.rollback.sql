-- 0007.shared-load rollback: bulk loads in progress are lost (they are simply run again).
DROP TABLE bulk_sync._load_rows;
DROP TABLE bulk_sync._loads;
