-- _request_actions: the "actions" array of a batch request (bulk_backfill, log_actions), checked the
-- same way for both: a JSON object with only the allowed keys (BS001), an array, at most 50,000 (BS005).
CREATE OR REPLACE FUNCTION bulk_sync._request_actions(p_request jsonb, p_where text, p_allowed text[])
RETURNS jsonb
LANGUAGE plpgsql
IMMUTABLE
AS $$
DECLARE
    c_max_actions  CONSTANT integer := 50000;
    v_actions      jsonb := p_request -> 'actions';
BEGIN
    IF p_request IS NULL OR jsonb_typeof(p_request) <> 'object' THEN
        RAISE EXCEPTION '%: the request must be a JSON object', p_where
            USING ERRCODE = 'BS001', DETAIL = format('request: %s', coalesce(left(p_request::text, 200), 'null'));
    ELSIF (p_request - p_allowed) <> '{}'::jsonb THEN
        RAISE EXCEPTION '%: unknown key %', p_where,
              (SELECT string_agg(k, ', ' ORDER BY k) FROM jsonb_object_keys(p_request - p_allowed) AS k)
            USING ERRCODE = 'BS001', HINT = 'Allowed keys: ' || array_to_string(p_allowed, ', ') || '.';
    ELSIF v_actions IS NULL OR jsonb_typeof(v_actions) <> 'array' THEN
        RAISE EXCEPTION '%: actions must be a JSON array', p_where
            USING ERRCODE = 'BS001', DETAIL = format('actions: %s', coalesce(left(v_actions::text, 200), 'missing'));
    ELSIF jsonb_array_length(v_actions) > c_max_actions THEN
        RAISE EXCEPTION '%: % actions exceed the limit of % per call', p_where, jsonb_array_length(v_actions), c_max_actions
            USING ERRCODE = 'BS005', DETAIL = format('actions: %s', jsonb_array_length(v_actions)),
                  HINT = 'Split the batch, or stream a file with: bulk-sync backfill FILE.';
    END IF;
    RETURN v_actions;
END
$$;
