-- _logged_at_problem: the rule for an action's time, on its value: why it is rejected, or NULL when fine.
-- A time must be finite, in the year 1 or later (the years an ISO 8601 text of the API can write, and
-- _iso prints), and at most five minutes in the future. Every entry point asks this one function.
CREATE OR REPLACE FUNCTION bulk_sync._logged_at_problem(p_logged_at timestamptz)
RETURNS text
LANGUAGE sql
STABLE PARALLEL SAFE
AS $$
    SELECT CASE
               WHEN p_logged_at >= '0001-01-01T00:00:00Z' AND p_logged_at <= now() + interval '5 minutes' THEN NULL
               WHEN p_logged_at IS NULL THEN 'is required'
               WHEN NOT isfinite(p_logged_at) THEN 'must be a finite timestamp'
               WHEN p_logged_at < '0001-01-01T00:00:00Z' THEN 'is before the year 1 (UTC)'
               ELSE 'is more than 5 minutes in the future'
           END
$$;
