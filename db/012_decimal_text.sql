-- _decimal_text: a decimal's text as numeric can read it. numeric's input stops at 16383 decimals, yet
-- zeros may pad an amount without limit ("10.2000000"): beyond 1000 characters, a plain decimal keeps
-- its first 25 digits before the point (leading zeros dropped) and its decimals (trailing zeros
-- dropped) when there are at most six, else seven that say so. Its value when it is an amount; out of
-- range, or too precise, as it was when it is not.
CREATE OR REPLACE FUNCTION bulk_sync._decimal_text(p_value text)
RETURNS text
LANGUAGE sql
IMMUTABLE PARALLEL SAFE
AS $$
    SELECT CASE WHEN length(p_value) <= 1000 THEN p_value
                ELSE coalesce(nullif(left(ltrim(split_part(p_value, '.', 1), '0'), 25), ''), '0')
                     || '.' || CASE WHEN length(rtrim(split_part(p_value, '.', 2), '0')) <= 6
                                    THEN rtrim(split_part(p_value, '.', 2), '0')
                                    ELSE '0000001'
                               END
           END
$$;
