-- _parse_timestamp: reads the required logged_at field of a JSON request.
-- An ISO 8601 string with an explicit zone offset that PostgreSQL parses, then _check_logged_at.
CREATE OR REPLACE FUNCTION bulk_sync._parse_timestamp(p_value jsonb, p_where text)
RETURNS timestamptz
LANGUAGE plpgsql
STABLE PARALLEL SAFE
AS $$
DECLARE
    v_text  text := p_value #>> '{}';
    v_ts    timestamptz;
BEGIN
    IF p_value IS NULL OR jsonb_typeof(p_value) = 'null' THEN
        RAISE EXCEPTION '%: logged_at is required', p_where
            USING ERRCODE = 'BS001', DETAIL = format('logged_at: %s', coalesce(p_value::text, 'missing'));
    ELSIF jsonb_typeof(p_value) <> 'string' THEN
        RAISE EXCEPTION '%: logged_at must be an ISO 8601 string', p_where
            USING ERRCODE = 'BS001', DETAIL = format('logged_at: %s', p_value);
    ELSIF v_text ~ '^[0-9]{4}-[0-9]{2}-[0-9]{2}([T ][0-9:.]*)?$' THEN
        RAISE EXCEPTION '%: logged_at has no zone offset', p_where
            USING ERRCODE = 'BS001', DETAIL = format('logged_at: %s', p_value),
                  HINT = 'End the timestamp with Z or an offset such as +01:00.';
    ELSIF NOT bulk_sync._is_timestamp_text(v_text) THEN
        RAISE EXCEPTION '%: logged_at is not an ISO 8601 timestamp', p_where
            USING ERRCODE = 'BS001', DETAIL = format('logged_at: %s', p_value),
                  HINT = 'Use the form 2025-11-05T10:00:00Z.';
    END IF;
    BEGIN
        v_ts := v_text::timestamptz;
    EXCEPTION WHEN data_exception THEN
        RAISE EXCEPTION '%: logged_at is not a valid timestamp', p_where
            USING ERRCODE = 'BS001', DETAIL = format('logged_at: %s', p_value);
    END;
    RETURN bulk_sync._check_logged_at(v_ts, p_where);
END
$$;
