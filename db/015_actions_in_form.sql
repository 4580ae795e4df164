-- _actions_in_form: whether the action_ids, user_ids and logged_ats of a JSON array of actions are all in
-- their common form (_in_form), matched for the whole array at once. Its callers pass the answer to
-- _action_problems as p_in_form: bulk_backfill and log_actions.
-- PL/pgSQL, not SQL: its body is a query (an aggregate), which a SQL function has planned again on every
-- call before PostgreSQL 18, about 0.1 ms of each log_actions call; PL/pgSQL keeps the plan for the session.
CREATE OR REPLACE FUNCTION bulk_sync._actions_in_form(p_actions jsonb)
RETURNS boolean
LANGUAGE plpgsql
IMMUTABLE PARALLEL SAFE
AS $$
BEGIN
    RETURN (SELECT bulk_sync._in_form(string_agg(e.doc ->> 'action_id', ','), string_agg(e.doc ->> 'user_id', ','),
                                      string_agg(e.doc ->> 'logged_at', ','), count(*))
              FROM jsonb_array_elements(p_actions) AS e(doc));
END
$$;
