-- _parse_action: validates one JSON action and returns it typed; the single source of BS001 messages.
-- Used by log_action(jsonb) and, when the batch fast path finds a problem, to explain it precisely.
CREATE OR REPLACE FUNCTION bulk_sync._parse_action(
    p_doc        jsonb,
    p_where      text,
    OUT action_id  uuid,
    OUT user_id    uuid,
    OUT lbs        numeric,
    OUT logged_at  timestamptz,
    OUT verified   boolean,
    OUT metadata   jsonb)
LANGUAGE plpgsql
STABLE PARALLEL SAFE
AS $$
DECLARE
    c_keys     CONSTANT text[] := ARRAY['action_id', 'user_id', 'lbs', 'logged_at', 'verified', 'metadata'];
    v_unknown  text;
BEGIN
    IF p_doc IS NULL OR jsonb_typeof(p_doc) <> 'object' THEN
        RAISE EXCEPTION '%: an action must be a JSON object', p_where
            USING ERRCODE = 'BS001', DETAIL = format('action: %s', coalesce(p_doc::text, 'null'));
    END IF;

    SELECT string_agg(k, ', ' ORDER BY k) INTO v_unknown
      FROM jsonb_object_keys(p_doc) AS k
     WHERE k <> ALL (c_keys);
    IF v_unknown IS NOT NULL THEN
        RAISE EXCEPTION '%: unknown key %', p_where, v_unknown
            USING ERRCODE = 'BS001', DETAIL = format('keys: %s', v_unknown),
                  HINT = 'Allowed keys: ' || array_to_string(c_keys, ', ') || '.';
    END IF;

    action_id := bulk_sync._parse_uuid(p_doc -> 'action_id', 'action_id', p_where);
    user_id   := bulk_sync._parse_uuid(p_doc -> 'user_id', 'user_id', p_where);
    lbs       := bulk_sync._parse_lbs(p_doc -> 'lbs', p_where);
    logged_at := bulk_sync._parse_timestamp(p_doc -> 'logged_at', p_where);

    CASE coalesce(jsonb_typeof(p_doc -> 'verified'), 'null')
        WHEN 'null' THEN verified := false;
        WHEN 'boolean' THEN verified := (p_doc -> 'verified')::boolean;
        ELSE
            RAISE EXCEPTION '%: verified must be true or false', p_where
                USING ERRCODE = 'BS001', DETAIL = format('verified: %s', p_doc -> 'verified');
    END CASE;

    CASE coalesce(jsonb_typeof(p_doc -> 'metadata'), 'null')
        WHEN 'null' THEN metadata := '{}';
        WHEN 'object' THEN metadata := p_doc -> 'metadata';
        ELSE
            RAISE EXCEPTION '%: metadata must be a JSON object', p_where
                USING ERRCODE = 'BS001', DETAIL = format('metadata: %s', p_doc -> 'metadata');
    END CASE;
END
$$;
