-- _actions_in_form: whether the action_ids, user_ids and logged_ats of a JSON array of actions are all in
-- their common form (_in_form), matched for the whole array at once. Its callers pass the answer to
-- _action_problems as p_in_form: bulk_backfill and log_actions.
CREATE OR REPLACE FUNCTION bulk_sync._actions_in_form(p_actions jsonb)
RETURNS boolean
LANGUAGE sql
IMMUTABLE PARALLEL SAFE
AS $$
    SELECT bulk_sync._in_form(string_agg(e.doc ->> 'action_id', ','), string_agg(e.doc ->> 'user_id', ','),
                              string_agg(e.doc ->> 'logged_at', ','), count(*))
      FROM jsonb_array_elements(p_actions) AS e(doc)
$$;
