-- _check_same_facts: the resubmission rule. An action_id is bound to its user_id, lbs (compared
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
IMMUTABLE
AS $$
DECLARE
    v_fields  text;
BEGIN
    v_fields := concat_ws(', ',
        CASE WHEN p_user_id IS DISTINCT FROM p_stored_user_id THEN 'user_id' END,
        CASE WHEN p_lbs IS DISTINCT FROM p_stored_lbs THEN 'lbs' END,
        CASE WHEN p_logged_at IS DISTINCT FROM p_stored_logged_at THEN 'logged_at' END);
    IF v_fields <> '' THEN
        RAISE EXCEPTION '%: action_id already used with a different % (compared with %)', p_where, v_fields, p_against
            USING ERRCODE = 'BS002',
                  DETAIL = format('stored: user_id=%s lbs=%s logged_at=%s; submitted: user_id=%s lbs=%s logged_at=%s',
                                  p_stored_user_id, bulk_sync._amount(p_stored_lbs), bulk_sync._iso(p_stored_logged_at),
                                  p_user_id, p_lbs, bulk_sync._iso(p_logged_at)),
                  HINT = 'An action_id identifies one action forever; use a new action_id for a new action.';
    END IF;
END
$$;
