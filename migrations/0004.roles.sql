-- 0004.roles: the three NOLOGIN roles that login roles are granted. Roles belong to the cluster,
-- so creating them is idempotent across databases; their privileges are set in db/900_privileges.sql.
-- depends: 0003.events

DO $$
DECLARE
    v_role  text;
BEGIN
    FOREACH v_role IN ARRAY ARRAY['bulk_sync_reader', 'bulk_sync_writer', 'bulk_sync_admin'] LOOP
        IF NOT EXISTS (SELECT FROM pg_catalog.pg_roles WHERE rolname = v_role) THEN
            EXECUTE format('CREATE ROLE %I NOLOGIN', v_role);
        END IF;
    END LOOP;
    IF NOT pg_catalog.pg_has_role('bulk_sync_admin', 'bulk_sync_writer', 'MEMBER') THEN
        GRANT bulk_sync_writer TO bulk_sync_admin;
    END IF;
    IF NOT pg_catalog.pg_has_role('bulk_sync_admin', 'bulk_sync_reader', 'MEMBER') THEN
        GRANT bulk_sync_reader TO bulk_sync_admin;
    END IF;
END
$$;
