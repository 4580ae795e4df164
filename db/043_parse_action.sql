-- _parse_action: one JSON action, validated by _action_problems (BS001 for its first problem) and typed.
-- What log_action(jsonb) and log_actions call; bulk loads check whole stages with the same rules instead.
CREATE OR REPLACE FUNCTION bulk_sync._parse_action(
    p_doc        jsonb,
    p_where      text,
    OUT action_id  uuid,
    OUT user_id    uuid,
    OUT lbs        numeric,
    OUT logged_at  timestamptz,
    OUT verified   boolean,
    OUT metadata   jsonb)
LANGUAGE plpgsql
STABLE
AS $$
DECLARE
    v_problem  record;
BEGIN
    SELECT p.field, p.reason, p.value INTO v_problem
      FROM bulk_sync._action_problems(coalesce(p_doc, 'null')) AS p
     LIMIT 1;
    IF FOUND THEN
        PERFORM bulk_sync._raise_problem(p_where, v_problem.field, v_problem.reason, v_problem.value);
    END IF;
    SELECT v.action_id, v.user_id, v.lbs, v.logged_at, v.verified, v.metadata
      INTO action_id, user_id, lbs, logged_at, verified, metadata
      FROM bulk_sync._action_values(p_doc) AS v;
END
$$;
