-- _json_object: a CSV field as a JSON object, or NULL when it is not one (invalid JSON included).
-- Called only for non-empty metadata fields, so its exception block costs nothing on the common path.
-- PARALLEL UNSAFE: a parallel worker cannot enter an exception block (a subtransaction).
CREATE OR REPLACE FUNCTION bulk_sync._json_object(p_value text)
RETURNS jsonb
LANGUAGE plpgsql
IMMUTABLE PARALLEL UNSAFE
AS $$
BEGIN
    RETURN CASE WHEN jsonb_typeof(p_value::jsonb) = 'object' THEN p_value::jsonb END;
EXCEPTION WHEN invalid_text_representation THEN
    RETURN NULL;
END
$$;
