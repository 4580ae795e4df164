-- global_total: the exact global total, now (the maintained slots) or as of a time (from the actions).
-- Part of the public API (§3.6); also what every response's global_total_lbs reports.
CREATE OR REPLACE FUNCTION bulk_sync.global_total(p_as_of timestamptz DEFAULT NULL)
RETURNS numeric(30,6)
LANGUAGE sql
STABLE
SET search_path = bulk_sync, pg_catalog, pg_temp
AS $$
    SELECT CASE
               WHEN p_as_of IS NULL
               THEN bulk_sync._current_global_total()
               ELSE (SELECT coalesce(sum(a.emissions_saved_lbs), 0)::numeric(30,6)
                       FROM bulk_sync.user_actions AS a
                      WHERE a.verified AND NOT a.revoked AND a.logged_at <= p_as_of)
           END
$$;
COMMENT ON FUNCTION bulk_sync.global_total(timestamptz) IS
    'Exact global total of counted actions: NULL = the maintained current total; a time = the sum of currently counted actions logged at or before it.';
