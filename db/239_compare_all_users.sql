-- _compare_all_users: reconcile's check, in one statement and so one snapshot: the sum of the counted
-- actions, the sum of the global slots, and every user whose stats differ from their counted actions.
CREATE OR REPLACE FUNCTION bulk_sync._compare_all_users()
RETURNS TABLE (counted_total numeric, slots_total numeric, drifted uuid[])
LANGUAGE plpgsql
STABLE
-- Each range is planned with its bounds as constants, so both of its index scans are bounded.
SET plan_cache_mode = force_custom_plan
-- Both sides of a range come out of indexes in user_id order; a merge join streams them.
SET enable_hashjoin = off
AS $$
DECLARE
    v_bounds  uuid[];
BEGIN
    -- Eight user_id ranges that together cover every uuid. A range is compared whole by one
    -- process, so the ranges run side by side under a Parallel Append (RETURN QUERY, unlike
    -- SELECT ... INTO, may use parallel workers). The planner's histogram of user_stats balances
    -- them; without one the uuid space is cut evenly. Either way the result is the same.
    SELECT ARRAY(SELECT h.bounds[1 + round(k * (cardinality(h.bounds) - 1) / 8.0)::integer]
                   FROM generate_series(1, 7) AS k ORDER BY k)
      INTO v_bounds
      FROM (SELECT st.histogram_bounds::text::uuid[] AS bounds
              FROM pg_catalog.pg_stats AS st
             WHERE st.schemaname = 'bulk_sync' AND st.tablename = 'user_stats' AND st.attname = 'user_id') AS h;
    IF v_bounds IS NULL OR array_position(v_bounds, NULL) IS NOT NULL THEN
        v_bounds := ARRAY(SELECT (to_hex(k * 32) || '000000-0000-0000-0000-000000000000')::uuid
                            FROM generate_series(1, 7) AS k ORDER BY k);
    END IF;

    RETURN QUERY
    SELECT coalesce(sum(r.counted_total) FILTER (WHERE coalesce(d.i, 1) = 1), 0),  -- once per range
           (SELECT coalesce(sum(g.total_lbs), 0) FROM bulk_sync._global_slots AS g),
           array_agg(d.user_id ORDER BY d.user_id) FILTER (WHERE d.user_id IS NOT NULL)
      FROM (SELECT * FROM bulk_sync._compare_users('00000000-0000-0000-0000-000000000000', v_bounds[1])
            UNION ALL SELECT * FROM bulk_sync._compare_users(v_bounds[1], v_bounds[2])
            UNION ALL SELECT * FROM bulk_sync._compare_users(v_bounds[2], v_bounds[3])
            UNION ALL SELECT * FROM bulk_sync._compare_users(v_bounds[3], v_bounds[4])
            UNION ALL SELECT * FROM bulk_sync._compare_users(v_bounds[4], v_bounds[5])
            UNION ALL SELECT * FROM bulk_sync._compare_users(v_bounds[5], v_bounds[6])
            UNION ALL SELECT * FROM bulk_sync._compare_users(v_bounds[6], v_bounds[7])
            UNION ALL SELECT * FROM bulk_sync._compare_users(v_bounds[7], NULL)) AS r
      LEFT JOIN LATERAL unnest(r.drifted) WITH ORDINALITY AS d(user_id, i) ON true;
END
$$;
