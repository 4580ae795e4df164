-- _recent_actions: the counted actions most recently stored, newest first, as reconcile's mismatch
-- report lists them (the seed's "log mismatch with diff and list of recent actions").
CREATE OR REPLACE FUNCTION bulk_sync._recent_actions(p_limit integer)
RETURNS jsonb
LANGUAGE sql
STABLE PARALLEL SAFE
-- STABLE: called inside reconcile's check statement, it reads that statement's snapshot.
AS $$
    SELECT coalesce(jsonb_agg(jsonb_build_object('action_id',  r.action_id,
                                                 'user_id',    r.user_id,
                                                 'lbs',        bulk_sync._amount(r.emissions_saved_lbs),
                                                 'logged_at',  bulk_sync._iso(r.logged_at),
                                                 'created_at', bulk_sync._iso(r.created_at))
                              ORDER BY r.created_at DESC, r.action_id DESC), '[]'::jsonb)
      FROM (SELECT a.action_id, a.user_id, a.emissions_saved_lbs, a.logged_at, a.created_at
              FROM bulk_sync.user_actions AS a
             WHERE a.verified AND NOT a.revoked
             ORDER BY a.created_at DESC, a.action_id DESC
             LIMIT p_limit) AS r
$$;
