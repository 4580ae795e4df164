-- _differing_facts: which of an action's facts (user_id, lbs compared numerically, logged_at) differ
-- between two versions of it, as 'user_id, lbs', or NULL when they agree. The resubmission rule's core.
-- STABLE, as concat_ws is: the planner inlines a SQL function only when it is declared no less
-- volatile than its body, and this one runs for every action of a batch.
CREATE OR REPLACE FUNCTION bulk_sync._differing_facts(
    p_stored_user_id    uuid,
    p_stored_lbs        numeric,
    p_stored_logged_at  timestamptz,
    p_user_id           uuid,
    p_lbs               numeric,
    p_logged_at         timestamptz)
RETURNS text
LANGUAGE sql
STABLE PARALLEL SAFE
AS $$
    SELECT nullif(concat_ws(', ',
               CASE WHEN p_user_id IS DISTINCT FROM p_stored_user_id THEN 'user_id' END,
               CASE WHEN p_lbs IS DISTINCT FROM p_stored_lbs THEN 'lbs' END,
               CASE WHEN p_logged_at IS DISTINCT FROM p_stored_logged_at THEN 'logged_at' END), '')
$$;
