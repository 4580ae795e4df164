-- _parse_actions: validates a JSON array of actions and returns them typed, with their 0-based index.
-- Set-based on the happy path (one pass, no per-row PL/pgSQL, casts instead of regular expressions
-- where they accept exactly the same text); on any problem it re-reads the array in order with
-- _parse_action, which raises BS001 for the first invalid action.
CREATE OR REPLACE FUNCTION bulk_sync._parse_actions(p_actions jsonb)
RETURNS TABLE (idx integer, action_id uuid, user_id uuid, lbs numeric, logged_at timestamptz,
               verified boolean, metadata jsonb)
LANGUAGE plpgsql
STABLE
AS $$
DECLARE
    c_keys     CONSTANT text[] := ARRAY['action_id', 'user_id', 'lbs', 'logged_at', 'verified', 'metadata'];
    v_first_bad  integer;
    v_doc        jsonb;
    v_i          integer;
BEGIN
    BEGIN
        SELECT min(c.idx) FILTER (WHERE NOT c.ok) INTO v_first_bad
          FROM (
              SELECT e.idx,
                     coalesce(
                         jsonb_typeof(e.doc) = 'object'
                         AND (e.doc - c_keys) = '{}'::jsonb
                         AND jsonb_typeof(e.doc -> 'action_id') = 'string'
                         AND bulk_sync._is_canonical_uuid(e.doc ->> 'action_id')
                         AND jsonb_typeof(e.doc -> 'user_id') = 'string'
                         AND bulk_sync._is_canonical_uuid(e.doc ->> 'user_id')
                         AND jsonb_typeof(e.doc -> 'lbs') IN ('string', 'number')
                         AND bulk_sync._is_decimal_text(e.doc ->> 'lbs')
                         AND (e.doc ->> 'lbs')::numeric < 1e24
                         AND scale(trim_scale((e.doc ->> 'lbs')::numeric)) <= 6
                         AND jsonb_typeof(e.doc -> 'logged_at') = 'string'
                         AND bulk_sync._is_timestamp_text(e.doc ->> 'logged_at')
                         AND (e.doc ->> 'logged_at')::timestamptz <= now() + interval '5 minutes'
                         AND coalesce(jsonb_typeof(e.doc -> 'verified'), 'null') IN ('boolean', 'null')
                         AND coalesce(jsonb_typeof(e.doc -> 'metadata'), 'null') IN ('object', 'null'),
                         false) AS ok
                FROM jsonb_array_elements(p_actions) WITH ORDINALITY AS e(doc, idx)
          ) AS c;
    EXCEPTION WHEN data_exception THEN
        v_first_bad := 1;  -- a value the shape checks let through but PostgreSQL cannot parse
    END;

    IF v_first_bad IS NOT NULL THEN
        FOR v_doc, v_i IN
            SELECT e.doc, e.idx - 1 FROM jsonb_array_elements(p_actions) WITH ORDINALITY AS e(doc, idx)
             ORDER BY e.idx
        LOOP
            PERFORM bulk_sync._parse_action(v_doc, bulk_sync._batch_where(v_i, v_doc));
        END LOOP;
        RAISE EXCEPTION 'actions[%]: invalid action', v_first_bad - 1
            USING ERRCODE = 'BS001', DETAIL = format('action: %s', p_actions -> (v_first_bad - 1));
    END IF;

    RETURN QUERY
    SELECT (e.idx - 1)::integer,
           (e.doc ->> 'action_id')::uuid,
           (e.doc ->> 'user_id')::uuid,
           (e.doc ->> 'lbs')::numeric(30,6),
           (e.doc ->> 'logged_at')::timestamptz,
           CASE jsonb_typeof(e.doc -> 'verified') WHEN 'boolean' THEN (e.doc -> 'verified')::boolean ELSE false END,
           CASE jsonb_typeof(e.doc -> 'metadata') WHEN 'object' THEN e.doc -> 'metadata' ELSE '{}'::jsonb END
      FROM jsonb_array_elements(p_actions) WITH ORDINALITY AS e(doc, idx);
END
$$;
