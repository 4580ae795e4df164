-- user_total: one user's exact total, now (user_stats) or as of a time (from the actions).
-- Part of the public API (§3.6); an unknown user has a total of 0.
CREATE OR REPLACE FUNCTION bulk_sync.user_total(p_user_id uuid, p_as_of timestamptz DEFAULT NULL)
RETURNS numeric(30,6)
LANGUAGE plpgsql
STABLE
SET search_path = bulk_sync, pg_catalog, pg_temp
AS $$
BEGIN
    IF p_user_id IS NULL THEN
        RAISE EXCEPTION 'user_total: p_user_id is required' USING ERRCODE = 'BS001', DETAIL = 'p_user_id: null';
    END IF;
    IF p_as_of IS NULL THEN
        RETURN bulk_sync._current_user_total(p_user_id);
    END IF;
    RETURN (SELECT coalesce(sum(a.emissions_saved_lbs), 0)::numeric(30,6)
              FROM bulk_sync.user_actions AS a
             WHERE a.user_id = p_user_id AND a.verified AND NOT a.revoked AND a.logged_at <= p_as_of);
END
$$;
COMMENT ON FUNCTION bulk_sync.user_total(uuid, timestamptz) IS
    'Exact total of one user''s counted actions: NULL = the maintained current total; a time = the sum of currently counted actions logged at or before it.';
