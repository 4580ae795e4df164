-- _logged_at_problem: the rule for an action's time, on its value: why it is rejected, or NULL when fine.
-- A time must be finite and at most five minutes in the future. Every entry point asks this one function.
CREATE OR REPLACE FUNCTION bulk_sync._logged_at_problem(p_logged_at timestamptz)
RETURNS text
LANGUAGE sql
STABLE PARALLEL SAFE
AS $$
    SELECT CASE
               WHEN p_logged_at > '-infinity' AND p_logged_at <= now() + interval '5 minutes' THEN NULL
               WHEN p_logged_at IS NULL THEN 'is required'
               WHEN NOT isfinite(p_logged_at) THEN 'must be a finite timestamp'
               ELSE 'is more than 5 minutes in the future'
           END
$$;
