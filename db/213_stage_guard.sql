-- _stage_guard: refuses a load stage that bulk_sync did not create. The definer functions read this
-- pg_temp table, so a caller's own table, view or trigger of that name must never run in its place.
CREATE OR REPLACE FUNCTION bulk_sync._stage_guard()
RETURNS void
LANGUAGE plpgsql
STABLE
SET search_path = bulk_sync, pg_catalog, pg_temp
AS $$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_catalog.pg_class AS c
                    WHERE c.oid = to_regclass('pg_temp.bulk_sync_stage')
                      AND c.relkind = 'r' AND NOT c.relhastriggers AND NOT c.relhasrules
                      AND c.relowner = (SELECT r.oid FROM pg_catalog.pg_roles AS r WHERE r.rolname = current_user)) THEN
        RAISE EXCEPTION 'the load stage of this session is missing or was not created by bulk_sync'
            USING ERRCODE = '55000',
                  HINT = 'Call bulk_sync._stage_open() first; do not create pg_temp.bulk_sync_stage yourself.';
    END IF;
END
$$;
