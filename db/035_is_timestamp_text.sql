-- _is_timestamp_text: an ISO 8601 date and time with an explicit zone offset (Z, +hh, +hhmm, +hh:mm).
-- Shared by the per-action parser and the set-based batch parser so both accept exactly the same input.
CREATE OR REPLACE FUNCTION bulk_sync._is_timestamp_text(p_value text)
RETURNS boolean
LANGUAGE sql
IMMUTABLE PARALLEL SAFE
AS $$
    SELECT p_value ~ '^[0-9]{4}-[0-9]{2}-[0-9]{2}[T ][0-9]{2}:[0-9]{2}(:[0-9]{2}(\.[0-9]{1,6})?)?([zZ]|[+-][0-9]{2}(:?[0-9]{2})?)$'
$$;
