-- log_action (JSON form): the seed's request body, validated key by key, then the positional form.
-- Unknown keys (a typo such as "verifed") are BS001 rather than silently defaulted.
CREATE OR REPLACE FUNCTION bulk_sync.log_action(request jsonb)
RETURNS jsonb
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = bulk_sync, pg_catalog, pg_temp
AS $$
DECLARE
    v  record;
BEGIN
    v := bulk_sync._parse_action(request, 'request');
    RETURN bulk_sync.log_action(v.action_id, v.user_id, v.lbs, v.logged_at, v.verified, v.metadata);
END
$$;
COMMENT ON FUNCTION bulk_sync.log_action(jsonb) IS
    'JSON form of log_action: {"action_id", "user_id", "lbs" (string or number), "logged_at", "verified"?, "metadata"?}. Same response and errors as the positional form.';
