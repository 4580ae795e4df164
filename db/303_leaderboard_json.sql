-- leaderboard_json: the leaderboard page as the seed's JSON, amounts as six-decimal strings.
-- [{"rank": 1, "user_id": "...", "total_lbs": "10.400000"}, ...]
CREATE OR REPLACE FUNCTION bulk_sync.leaderboard_json(p_limit integer DEFAULT 10, p_offset integer DEFAULT 0)
RETURNS jsonb
LANGUAGE sql
STABLE
SET search_path = bulk_sync, pg_catalog, pg_temp
AS $$
    SELECT coalesce(jsonb_agg(jsonb_build_object('rank', l.rank, 'user_id', l.user_id, 'total_lbs', l.total_lbs::numeric(30,6)::text)
                              ORDER BY l.rank),
                    '[]'::jsonb)
      FROM bulk_sync.leaderboard(p_limit, p_offset) AS l
$$;
COMMENT ON FUNCTION bulk_sync.leaderboard_json(integer, integer) IS
    'leaderboard() as a JSON array of {"rank", "user_id", "total_lbs"} with amounts as six-decimal strings.';
