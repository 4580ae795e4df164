-- prune_events: deletes published events older than the retention period.
-- Readers that fall further behind than the retention miss the pruned events; the worker runs this.
CREATE OR REPLACE FUNCTION bulk_sync.prune_events(p_older_than interval DEFAULT '7 days')
RETURNS bigint
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = bulk_sync, pg_catalog, pg_temp
AS $$
DECLARE
    v_deleted  bigint;
BEGIN
    IF p_older_than IS NULL OR p_older_than < interval '0' THEN
        RAISE EXCEPTION 'prune_events: p_older_than must be a non-negative interval' USING ERRCODE = 'BS001', DETAIL = format('p_older_than: %s', p_older_than);
    END IF;
    DELETE FROM bulk_sync.events AS e WHERE e.published_at < now() - p_older_than;
    GET DIAGNOSTICS v_deleted = ROW_COUNT;
    RETURN v_deleted;
END
$$;
COMMENT ON FUNCTION bulk_sync.prune_events(interval) IS
    'Deletes published events older than p_older_than (default 7 days); returns how many.';
