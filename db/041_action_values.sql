-- _action_values: one valid action (see _action_problems) as typed values, from JSON or from CSV fields.
-- Only called once the rules passed, so none of its casts can fail or round.
CREATE OR REPLACE FUNCTION bulk_sync._action_values(
    p_doc        jsonb,
    p_action_id  text DEFAULT NULL,
    p_user_id    text DEFAULT NULL,
    p_lbs        text DEFAULT NULL,
    p_logged_at  text DEFAULT NULL,
    p_verified   text DEFAULT NULL,
    p_metadata   text DEFAULT NULL)
RETURNS TABLE (action_id uuid, user_id uuid, lbs numeric(30,6), logged_at timestamptz, verified boolean, metadata jsonb)
LANGUAGE sql
STABLE PARALLEL SAFE
AS $$
    SELECT coalesce(p_action_id, p_doc ->> 'action_id')::uuid,
           coalesce(p_user_id, p_doc ->> 'user_id')::uuid,
           bulk_sync._decimal_text(coalesce(p_lbs, p_doc ->> 'lbs'))::numeric(30,6),
           coalesce(p_logged_at, p_doc ->> 'logged_at')::timestamptz,
           CASE WHEN p_doc IS NULL THEN bulk_sync._flag(p_verified)
                WHEN jsonb_typeof(p_doc -> 'verified') = 'boolean' THEN (p_doc -> 'verified')::boolean
                ELSE false
           END,
           CASE WHEN p_doc IS NULL THEN coalesce(nullif(btrim(p_metadata), '')::jsonb, '{}')
                WHEN jsonb_typeof(p_doc -> 'metadata') = 'object' THEN p_doc -> 'metadata'
                ELSE '{}'
           END
$$;
