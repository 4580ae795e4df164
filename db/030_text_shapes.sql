-- _is_uuid_text, _is_decimal_text, _has_zone_text: the textual shapes a JSON request must have.
-- Shared by the per-action parser and the set-based batch parser so both accept exactly the same input.
CREATE OR REPLACE FUNCTION bulk_sync._is_uuid_text(p_value text)
RETURNS boolean
LANGUAGE sql
IMMUTABLE PARALLEL SAFE
AS $$
    SELECT p_value ~ '^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$'
$$;

-- A plain non-negative decimal, optionally with an exponent: no sign, no NaN, no Infinity, no spaces.
CREATE OR REPLACE FUNCTION bulk_sync._is_decimal_text(p_value text)
RETURNS boolean
LANGUAGE sql
IMMUTABLE PARALLEL SAFE
AS $$
    SELECT p_value ~ '^([0-9]+(\.[0-9]*)?|\.[0-9]+)([eE][+-]?[0-9]{1,4})?$'
$$;

-- An explicit zone offset at the end: Z or +hh, +hhmm, +hh:mm.
CREATE OR REPLACE FUNCTION bulk_sync._has_zone_text(p_value text)
RETURNS boolean
LANGUAGE sql
IMMUTABLE PARALLEL SAFE
AS $$
    SELECT p_value ~ '([0-9]([zZ]|[+-][0-9]{2}(:?[0-9]{2})?))$'
$$;
