-- _stored_facts: whether action p_action_id is stored (one row, else none), pending (stored unverified and
-- not revoked), and stored with other facts than these (a BS002). One primary-key probe, inlined into
-- the statement that asks it for every row of a load, so the cost follows the load and never the
-- ledger (a join may be planned as a scan of all of user_actions).
CREATE OR REPLACE FUNCTION bulk_sync._stored_facts(p_action_id uuid, p_user_id uuid, p_lbs numeric, p_logged_at timestamptz)
RETURNS TABLE (pending boolean, conflicts boolean)
LANGUAGE sql
STABLE PARALLEL SAFE
AS $$
    SELECT NOT a.verified AND NOT a.revoked,
           (a.user_id, a.emissions_saved_lbs, a.logged_at) IS DISTINCT FROM (p_user_id, p_lbs, p_logged_at)
      FROM bulk_sync.user_actions AS a
     WHERE a.action_id = p_action_id
     LIMIT 1
$$;
