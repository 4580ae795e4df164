-- _log_response: log_action's JSON response for one action, the same whether it came alone (log_action)
-- or in a batch (each result of log_actions). Amounts as six-decimal strings, timestamp the call's.
CREATE OR REPLACE FUNCTION bulk_sync._log_response(
    p_status        text,
    p_action_id     uuid,
    p_user_id       uuid,
    p_lbs           numeric,
    p_verified      boolean,
    p_revoked       boolean,
    p_user_total    numeric,
    p_global_total  numeric)
RETURNS jsonb
LANGUAGE sql
STABLE PARALLEL SAFE
AS $$
    SELECT jsonb_build_object(
        'success',          true,
        'status',           p_status,
        'action_id',        p_action_id,
        'user_id',          p_user_id,
        'emissions_lbs',    bulk_sync._amount(p_lbs),
        'user_total_lbs',   bulk_sync._amount(p_user_total),
        'global_total_lbs', bulk_sync._amount(p_global_total),
        'is_duplicate',     p_status <> 'inserted',
        'message',          CASE
                                WHEN p_status = 'inserted' AND p_verified THEN 'Emission logged successfully'
                                WHEN p_status = 'inserted' THEN 'Action logged; it counts once verified'
                                WHEN p_status = 'verified' THEN 'Duplicate action_id: the stored action is now verified and counts'
                                WHEN p_revoked THEN 'Duplicate action_id: the action is revoked and stays revoked'
                                ELSE 'Duplicate action_id: already recorded, totals unchanged'
                            END,
        'timestamp',        bulk_sync._iso(now()))
$$;
