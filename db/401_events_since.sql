-- events_since: durable change events after a given id, oldest first.
-- Publishes pending events first, so readers need no worker, and an empty answer means caught up.
CREATE OR REPLACE FUNCTION bulk_sync.events_since(p_after bigint, p_limit integer DEFAULT 1000)
RETURNS TABLE (event_id bigint, payload jsonb)
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = bulk_sync, pg_catalog, pg_temp
SET lock_timeout = '2s'
AS $$
BEGIN
    IF p_after IS NULL OR p_after < 0 THEN
        RAISE EXCEPTION 'events_since: p_after must be 0 or a previous event_id' USING ERRCODE = 'BS001', DETAIL = format('p_after: %s', p_after);
    ELSIF p_limit IS NULL OR p_limit < 1 OR p_limit > 10000 THEN
        RAISE EXCEPTION 'events_since: p_limit must be between 1 and 10000' USING ERRCODE = 'BS001', DETAIL = format('p_limit: %s', p_limit);
    END IF;
    -- Every event committed before this call is returned (up to p_limit): if another session is
    -- publishing, wait for it (briefly) rather than answer before its events are numbered.
    IF NOT current_setting('transaction_read_only')::boolean THEN
        BEGIN
            PERFORM bulk_sync.publish_events(10000, true);
        EXCEPTION WHEN lock_not_available THEN
            NULL;  -- a publisher held on for over 2 s; its events come with a later call
        END;
    END IF;
    RETURN QUERY
    SELECT e.event_id, e.payload
      FROM bulk_sync.events AS e
     WHERE e.event_id > p_after
     ORDER BY e.event_id
     LIMIT p_limit;
END
$$;
COMMENT ON FUNCTION bulk_sync.events_since(bigint, integer) IS
    'Change events with event_id > p_after in id order (at most p_limit), including every event committed before the call. Resume from the last id seen: nothing is missed or repeated. Call it as its own transaction (autocommit): it numbers pending events in the caller''s transaction, whose rollback would take the ids back.';
