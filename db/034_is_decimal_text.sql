-- _is_decimal_text: a plain non-negative decimal, optionally with an exponent; no sign, NaN, Infinity or spaces.
-- Shared by the per-action parser and the set-based batch parser so both accept exactly the same input.
CREATE OR REPLACE FUNCTION bulk_sync._is_decimal_text(p_value text)
RETURNS boolean
LANGUAGE sql
IMMUTABLE PARALLEL SAFE
AS $$
    SELECT p_value ~ '^([0-9]+(\.[0-9]*)?|\.[0-9]+)([eE][+-]?[0-9]{1,4})?$'
$$;
