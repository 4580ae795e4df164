-- leaderboard_around: the user's neighbourhood on the leaderboard, p_radius places either side.
-- Two short index scans from the user's key, so it costs the same at rank 5 or rank 500,000.
CREATE OR REPLACE FUNCTION bulk_sync.leaderboard_around(p_user_id uuid, p_radius integer DEFAULT 2)
RETURNS TABLE (rank bigint, user_id uuid, total_lbs numeric(30,6), action_count integer, last_action_at timestamptz)
LANGUAGE plpgsql
STABLE
SET search_path = bulk_sync, pg_catalog, pg_temp
AS $$
DECLARE
    v_me  record;
BEGIN
    IF p_radius IS NULL OR p_radius < 0 OR p_radius > 1000 THEN
        RAISE EXCEPTION 'leaderboard_around: p_radius must be between 0 and 1000' USING ERRCODE = 'BS001', DETAIL = format('p_radius: %s', p_radius);
    END IF;
    SELECT * INTO v_me FROM bulk_sync.user_rank(p_user_id) AS r;
    IF NOT FOUND THEN
        RETURN;
    END IF;
    RETURN QUERY
    SELECT * FROM (
        SELECT v_me.rank - row_number() OVER (ORDER BY a.leaderboard_key DESC, a.last_action_at DESC, a.user_id DESC),
               a.user_id, a.total_emissions_lbs, a.action_count, a.last_action_at
          FROM (SELECT s.* FROM bulk_sync.user_stats AS s
                 WHERE s.action_count > 0
                   AND (s.leaderboard_key, s.last_action_at, s.user_id) < (-v_me.total_lbs, v_me.last_action_at, v_me.user_id)
                 ORDER BY s.leaderboard_key DESC, s.last_action_at DESC, s.user_id DESC
                 LIMIT p_radius) AS a
        UNION ALL
        SELECT v_me.rank, v_me.user_id, v_me.total_lbs, v_me.action_count, v_me.last_action_at
        UNION ALL
        SELECT v_me.rank + row_number() OVER (ORDER BY b.leaderboard_key, b.last_action_at, b.user_id),
               b.user_id, b.total_emissions_lbs, b.action_count, b.last_action_at
          FROM (SELECT s.* FROM bulk_sync.user_stats AS s
                 WHERE s.action_count > 0
                   AND (s.leaderboard_key, s.last_action_at, s.user_id) > (-v_me.total_lbs, v_me.last_action_at, v_me.user_id)
                 ORDER BY s.leaderboard_key, s.last_action_at, s.user_id
                 LIMIT p_radius) AS b
    ) AS around
    ORDER BY 1;
END
$$;
COMMENT ON FUNCTION bulk_sync.leaderboard_around(uuid, integer) IS
    'The user''s leaderboard row with up to p_radius rows above and below, with their ranks; no rows when the user has no counted action.';
