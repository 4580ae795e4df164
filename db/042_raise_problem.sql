-- _raise_problem: raises one rejected input the way every function reports it: the message names where
-- and the field and the reason, DETAIL carries the offending value, and the SQLSTATE is the contract's.
CREATE OR REPLACE FUNCTION bulk_sync._raise_problem(
    p_where   text,
    p_field   text,
    p_reason  text,
    p_value   text,
    p_code    text DEFAULT 'BS001')
RETURNS void
LANGUAGE plpgsql
IMMUTABLE
AS $$
BEGIN
    RAISE EXCEPTION '%: % %', p_where, p_field, p_reason
        USING ERRCODE = p_code, DETAIL = format('%s: %s', p_field, coalesce(p_value, 'missing'));
END
$$;
