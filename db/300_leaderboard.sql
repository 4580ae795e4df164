-- leaderboard: one page of the ranking, served in index order from user_stats_leaderboard.
-- Order: total DESC, then who reached it first (last_action_at ASC), then user_id; ranks have no gaps.
CREATE OR REPLACE FUNCTION bulk_sync.leaderboard(p_limit integer DEFAULT 10, p_offset integer DEFAULT 0)
RETURNS TABLE (rank bigint, user_id uuid, total_lbs numeric(30,6), action_count integer, last_action_at timestamptz)
LANGUAGE plpgsql
STABLE
SET search_path = bulk_sync, pg_catalog, pg_temp
AS $$
BEGIN
    IF p_limit IS NULL OR p_limit < 0 OR p_limit > 10000 THEN
        RAISE EXCEPTION 'leaderboard: p_limit must be between 0 and 10000' USING ERRCODE = 'BS001', DETAIL = format('p_limit: %s', p_limit);
    ELSIF p_offset IS NULL OR p_offset < 0 THEN
        RAISE EXCEPTION 'leaderboard: p_offset must not be negative' USING ERRCODE = 'BS001', DETAIL = format('p_offset: %s', p_offset);
    END IF;
    RETURN QUERY
    SELECT row_number() OVER (ORDER BY s.leaderboard_key, s.last_action_at, s.user_id),
           s.user_id, s.total_emissions_lbs, s.action_count, s.last_action_at
      FROM bulk_sync.user_stats AS s
     WHERE s.action_count > 0
     ORDER BY s.leaderboard_key, s.last_action_at, s.user_id
     LIMIT p_limit OFFSET p_offset;
END
$$;
COMMENT ON FUNCTION bulk_sync.leaderboard(integer, integer) IS
    'A page of the leaderboard: users with at least one counted action, by total DESC, last_action_at ASC, user_id ASC; ranks 1, 2, 3, ... without gaps.';
