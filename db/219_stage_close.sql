-- _stage_close: ends load p_load: its checked rows go, applied or not. Waits for sessions still checking
-- or applying a part of it (see _load_held). Returns the global total as it then stands.
CREATE OR REPLACE FUNCTION bulk_sync._stage_close(p_load uuid)
RETURNS jsonb
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = bulk_sync, pg_catalog, pg_temp
AS $$
BEGIN
    DELETE FROM bulk_sync._loads AS l WHERE l.load = p_load;
    DELETE FROM bulk_sync._load_rows AS r WHERE r.load = p_load;
    RETURN jsonb_build_object('global_total_lbs', bulk_sync._amount(bulk_sync._current_global_total()));
END
$$;
COMMENT ON FUNCTION bulk_sync._stage_close(uuid) IS
    'Internal to bulk loads: ends load p_load (see _stage_open), removing its checked rows, whether open or not. Returns {"global_total_lbs"}.';
