-- _end_abandoned_loads: ends the loads whose opening session is gone (a killed runner), with their
-- checked rows, and returns how many it ended. A new load runs it first (_stage_open), and so does
-- bulk-sync worker with each prune, so that a killed load's rows never wait long for the next load.
CREATE OR REPLACE FUNCTION bulk_sync._end_abandoned_loads()
RETURNS integer
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = bulk_sync, pg_catalog, pg_temp
AS $$
DECLARE
    v_ended  uuid[];
BEGIN
    WITH ended AS (
        DELETE FROM bulk_sync._loads AS l
         WHERE NOT EXISTS (SELECT FROM pg_catalog.pg_stat_activity AS a WHERE a.pid = l.opened_by_pid)
        RETURNING l.load
    )
    SELECT array_agg(e.load) INTO v_ended FROM ended AS e;
    IF v_ended IS NOT NULL THEN
        DELETE FROM bulk_sync._load_rows AS r WHERE r.load = ANY (v_ended);
    END IF;
    RETURN coalesce(cardinality(v_ended), 0);
END
$$;
COMMENT ON FUNCTION bulk_sync._end_abandoned_loads() IS
    'Ends the bulk loads whose runner''s session is gone, with their checked rows; returns how many. Run by every new load and by bulk-sync worker.';
