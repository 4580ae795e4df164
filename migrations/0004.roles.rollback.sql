-- 0004.roles rollback: revokes this database's grants. The roles themselves are shared by every
-- database of the cluster and are left in place; drop them by hand once no database uses them.
REVOKE ALL ON SCHEMA bulk_sync FROM bulk_sync_reader, bulk_sync_writer, bulk_sync_admin;
REVOKE ALL ON ALL TABLES IN SCHEMA bulk_sync FROM bulk_sync_reader, bulk_sync_writer, bulk_sync_admin;
REVOKE ALL ON ALL FUNCTIONS IN SCHEMA bulk_sync FROM bulk_sync_reader, bulk_sync_writer, bulk_sync_admin;
