-- _parse_uuid: reads a required uuid field of a JSON request.
-- Missing, null, non-string or malformed values are BS001 naming the field.
CREATE OR REPLACE FUNCTION bulk_sync._parse_uuid(p_value jsonb, p_field text, p_where text)
RETURNS uuid
LANGUAGE plpgsql
IMMUTABLE PARALLEL SAFE
AS $$
BEGIN
    IF p_value IS NULL OR jsonb_typeof(p_value) = 'null' THEN
        RAISE EXCEPTION '%: % is required', p_where, p_field
            USING ERRCODE = 'BS001', DETAIL = format('%s: %s', p_field, coalesce(p_value::text, 'missing'));
    ELSIF jsonb_typeof(p_value) <> 'string' OR NOT bulk_sync._is_uuid_text(p_value #>> '{}') THEN
        RAISE EXCEPTION '%: % is not a valid uuid', p_where, p_field
            USING ERRCODE = 'BS001', DETAIL = format('%s: %s', p_field, p_value),
                  HINT = 'Use the canonical form, e.g. 6f1c2a4e-8d3b-4c55-9a7e-2b1d0c9e8f70.';
    END IF;
    RETURN (p_value #>> '{}')::uuid;
END
$$;
