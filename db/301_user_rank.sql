-- user_rank: one user's place on the leaderboard (zero rows when the user has no counted action).
-- The rank is 1 + the users ahead, counted with a row comparison on the leaderboard index.
CREATE OR REPLACE FUNCTION bulk_sync.user_rank(p_user_id uuid)
RETURNS TABLE (rank bigint, user_id uuid, total_lbs numeric(30,6), action_count integer, last_action_at timestamptz)
LANGUAGE sql
STABLE
SET search_path = bulk_sync, pg_catalog, pg_temp
AS $$
    SELECT 1 + (SELECT count(*)
                  FROM bulk_sync.user_stats AS o
                 WHERE o.action_count > 0
                   AND (o.leaderboard_key, o.last_action_at, o.user_id)
                       < (s.leaderboard_key, s.last_action_at, s.user_id)),
           s.user_id, s.total_emissions_lbs, s.action_count, s.last_action_at
      FROM bulk_sync.user_stats AS s
     WHERE s.user_id = p_user_id AND s.action_count > 0
$$;
COMMENT ON FUNCTION bulk_sync.user_rank(uuid) IS
    'The user''s leaderboard row with its rank, or no row when the user has no counted action.';
