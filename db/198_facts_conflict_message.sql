-- _facts_conflict_message: the message of a BS002, the same whether raised (_check_same_facts) or
-- returned as one action's error (log_actions): where, and which facts differ. STABLE, as format is,
-- so that it can be inlined.
CREATE OR REPLACE FUNCTION bulk_sync._facts_conflict_message(
    p_where    text,
    p_fields   text,
    p_against  text DEFAULT 'the stored action')
RETURNS text
LANGUAGE sql
STABLE PARALLEL SAFE
AS $$
    SELECT format('%s: action_id already used with a different %s (compared with %s)', p_where, p_fields, p_against)
$$;
