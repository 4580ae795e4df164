-- _check_logged_at: the one rule for an action's time, shared by every entry point.
-- Rejects (BS001) a missing or infinite time and one more than five minutes in the future.
CREATE OR REPLACE FUNCTION bulk_sync._check_logged_at(p_logged_at timestamptz, p_where text)
RETURNS timestamptz
LANGUAGE plpgsql
STABLE PARALLEL SAFE
AS $$
BEGIN
    IF p_logged_at IS NULL THEN
        RAISE EXCEPTION '%: logged_at is required', p_where
            USING ERRCODE = 'BS001', DETAIL = 'logged_at: null';
    ELSIF NOT isfinite(p_logged_at) THEN
        RAISE EXCEPTION '%: logged_at must be a finite timestamp', p_where
            USING ERRCODE = 'BS001', DETAIL = format('logged_at: %s', p_logged_at);
    ELSIF p_logged_at > now() + interval '5 minutes' THEN
        RAISE EXCEPTION '%: logged_at is more than 5 minutes in the future', p_where
            USING ERRCODE = 'BS001', DETAIL = format('logged_at: %s, now: %s', bulk_sync._iso(p_logged_at), bulk_sync._iso(now()));
    END IF;
    RETURN p_logged_at;
END
$$;
