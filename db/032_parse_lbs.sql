-- _parse_lbs: reads the required lbs field of a JSON request, as a string or a JSON number.
-- Only a plain decimal is accepted; the value itself must then pass _check_lbs.
CREATE OR REPLACE FUNCTION bulk_sync._parse_lbs(p_value jsonb, p_where text)
RETURNS numeric
LANGUAGE plpgsql
IMMUTABLE PARALLEL SAFE
AS $$
DECLARE
    v_text  text := p_value #>> '{}';
BEGIN
    IF p_value IS NULL OR jsonb_typeof(p_value) = 'null' THEN
        RAISE EXCEPTION '%: lbs is required', p_where
            USING ERRCODE = 'BS001', DETAIL = format('lbs: %s', coalesce(p_value::text, 'missing'));
    ELSIF jsonb_typeof(p_value) NOT IN ('string', 'number') THEN
        RAISE EXCEPTION '%: lbs must be a decimal string or a JSON number', p_where
            USING ERRCODE = 'BS001', DETAIL = format('lbs: %s', p_value);
    ELSIF v_text ~ '^\s*-' THEN
        RAISE EXCEPTION '%: lbs must not be negative', p_where
            USING ERRCODE = 'BS001', DETAIL = format('lbs: %s', p_value);
    ELSIF lower(btrim(v_text)) IN ('nan', 'infinity', '+infinity', 'inf', '+inf') THEN
        RAISE EXCEPTION '%: lbs must be a finite decimal number', p_where
            USING ERRCODE = 'BS001', DETAIL = format('lbs: %s', p_value);
    ELSIF NOT bulk_sync._is_decimal_text(v_text) THEN
        RAISE EXCEPTION '%: lbs is not a decimal number', p_where
            USING ERRCODE = 'BS001', DETAIL = format('lbs: %s', p_value),
                  HINT = 'Send a plain decimal such as "10.2".';
    END IF;
    RETURN bulk_sync._check_lbs(v_text::numeric, p_where);
END
$$;
