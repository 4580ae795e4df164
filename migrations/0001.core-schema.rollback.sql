-- 0001.core-schema rollback: removes the whole bulk_sync schema, functions and views included.
DROP SCHEMA bulk_sync CASCADE;
