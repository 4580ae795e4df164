-- verify_action: moves a pending action into the counted set; the totals follow atomically.
-- Records the transition (who, when) in action_transitions. A revoked action cannot be verified (BS006).
CREATE OR REPLACE FUNCTION bulk_sync.verify_action(p_action_id uuid, p_performed_by text DEFAULT NULL)
RETURNS jsonb
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = bulk_sync, pg_catalog, pg_temp
AS $$
DECLARE
    v_action  bulk_sync.user_actions;
    v_status  text;
BEGIN
    IF p_action_id IS NULL THEN
        RAISE EXCEPTION 'verify_action: action_id is required' USING ERRCODE = 'BS001', DETAIL = 'p_action_id: null';
    END IF;

    -- The user first, then the action (see _lock_users); an action's user_id never changes.
    PERFORM bulk_sync._lock_users(ARRAY(SELECT a.user_id FROM bulk_sync.user_actions AS a WHERE a.action_id = p_action_id));
    SELECT * INTO v_action FROM bulk_sync.user_actions AS a WHERE a.action_id = p_action_id FOR UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'verify_action: unknown action_id' USING ERRCODE = 'BS004', DETAIL = format('action_id: %s', p_action_id);
    ELSIF v_action.revoked THEN
        RAISE EXCEPTION 'verify_action: the action is revoked and cannot be verified'
            USING ERRCODE = 'BS006', DETAIL = format('action_id: %s, revoked_at: %s', p_action_id, bulk_sync._iso(v_action.revoked_at)),
                  HINT = 'Revocation is final; log a new action instead.';
    ELSIF v_action.verified THEN
        v_status := 'already_verified';
    ELSE
        UPDATE bulk_sync.user_actions AS a SET verified = true, verified_at = now() WHERE a.action_id = p_action_id;
        INSERT INTO bulk_sync.action_transitions (action_id, user_id, from_status, to_status, performed_by, via)
        VALUES (p_action_id, v_action.user_id, 'pending', 'verified', coalesce(p_performed_by, session_user), 'verify_action');
        v_status := 'verified';
    END IF;

    RETURN jsonb_build_object(
        'success',          true,
        'action_id',        p_action_id,
        'user_id',          v_action.user_id,
        'status',           v_status,
        'user_total_lbs',   bulk_sync._amount(bulk_sync._current_user_total(v_action.user_id)),
        'global_total_lbs', bulk_sync._amount(bulk_sync._current_global_total()));
END
$$;
COMMENT ON FUNCTION bulk_sync.verify_action(uuid, text) IS
    'Verifies an action so that it counts; status verified | already_verified. BS004 unknown action, BS006 revoked action. Audited in action_transitions.';
