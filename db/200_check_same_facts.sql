-- _check_same_facts: the resubmission rule, raised. An action_id is bound to its user_id, lbs (compared
-- numerically) and logged_at; a submission that differs in any of them is BS002 naming the fields.
CREATE OR REPLACE FUNCTION bulk_sync._check_same_facts(
    p_stored_user_id    uuid,
    p_stored_lbs        numeric,
    p_stored_logged_at  timestamptz,
    p_user_id           uuid,
    p_lbs               numeric,
    p_logged_at         timestamptz,
    p_where             text,
    p_against           text DEFAULT 'the stored action')
RETURNS void
LANGUAGE plpgsql
STABLE
AS $$
DECLARE
    v_fields  text := bulk_sync._differing_facts(p_stored_user_id, p_stored_lbs, p_stored_logged_at,
                                                 p_user_id, p_lbs, p_logged_at);
BEGIN
    IF v_fields IS NOT NULL THEN
        RAISE EXCEPTION '%', bulk_sync._facts_conflict_message(p_where, v_fields, p_against)
            USING ERRCODE = 'BS002',
                  DETAIL = bulk_sync._facts_detail(p_stored_user_id, p_stored_lbs, p_stored_logged_at,
                                                   p_user_id, p_lbs, p_logged_at),
                  HINT = 'An action_id identifies one action forever; use a new action_id for a new action.';
    END IF;
END
$$;
