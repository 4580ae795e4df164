-- _facts_detail: how a BS002 shows both versions of an action's facts, in the DETAIL of an error or the
-- value of a load problem, amounts and times in the responses' formats.
CREATE OR REPLACE FUNCTION bulk_sync._facts_detail(
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
    SELECT format('stored: user_id=%s lbs=%s logged_at=%s; submitted: user_id=%s lbs=%s logged_at=%s',
                  p_stored_user_id, bulk_sync._amount(p_stored_lbs), bulk_sync._iso(p_stored_logged_at),
                  p_user_id, bulk_sync._amount(p_lbs), bulk_sync._iso(p_logged_at))
$$;
