-- _compare_users: the users with from <= user_id < below (below NULL: no upper bound), compared with
-- their counted actions. One range of reconcile's scan; inlined by the planner into each branch.
CREATE OR REPLACE FUNCTION bulk_sync._compare_users(p_from uuid, p_below uuid)
RETURNS TABLE (counted_total numeric, drifted uuid[])
LANGUAGE sql
STABLE PARALLEL SAFE
AS $$
    SELECT coalesce(sum(t.total), 0),
           array_agg(coalesce(t.user_id, s.user_id) ORDER BY coalesce(t.user_id, s.user_id))
               FILTER (WHERE (coalesce(t.total, 0), coalesce(t.n, 0), t.last_at)
                             IS DISTINCT FROM (coalesce(s.total_emissions_lbs, 0), coalesce(s.action_count, 0), s.last_action_at))
      FROM (SELECT a.user_id, sum(a.emissions_saved_lbs) AS total, count(*) AS n, max(a.logged_at) AS last_at
              FROM bulk_sync.user_actions AS a
             WHERE a.verified AND NOT a.revoked
               AND a.user_id >= p_from AND (a.user_id < p_below OR p_below IS NULL)
             GROUP BY a.user_id) AS t
      FULL JOIN (SELECT s.user_id, s.total_emissions_lbs, s.action_count, s.last_action_at
                   FROM bulk_sync.user_stats AS s
                  WHERE s.user_id >= p_from AND (s.user_id < p_below OR p_below IS NULL)) AS s
        ON s.user_id = t.user_id
$$;
