-- _lock_users: takes the user_stats rows of the given users, in user_id order, creating missing ones.
-- Every writer calls it before it touches an action, so locks are always taken users first, then
-- actions, then one slot: writers can wait for each other but never in a cycle.
CREATE OR REPLACE FUNCTION bulk_sync._lock_users(p_user_ids uuid[])
RETURNS void
LANGUAGE plpgsql
AS $$
BEGIN
    -- ON CONFLICT DO UPDATE locks the existing row even when its WHERE is false.
    INSERT INTO bulk_sync.user_stats AS s (user_id)
    SELECT DISTINCT u.user_id FROM unnest(p_user_ids) AS u(user_id) ORDER BY 1
        ON CONFLICT (user_id) DO UPDATE SET last_updated = excluded.last_updated WHERE false;
END
$$;
