-- revoke_action: takes an action out of the counted set for good; the totals follow atomically.
-- Records the transition (who, when, why) in action_transitions. The reason is required (BS001).
CREATE OR REPLACE FUNCTION bulk_sync.revoke_action(p_action_id uuid, p_reason text, p_performed_by text DEFAULT NULL)
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
        RAISE EXCEPTION 'revoke_action: action_id is required' USING ERRCODE = 'BS001', DETAIL = 'p_action_id: null';
    ELSIF p_reason IS NULL OR btrim(p_reason) = '' THEN
        RAISE EXCEPTION 'revoke_action: reason must not be empty'
            USING ERRCODE = 'BS001', DETAIL = format('reason: %s', coalesce(quote_literal(p_reason), 'null')),
                  HINT = 'Say why the action is revoked; it is kept in bulk_sync.action_transitions.';
    END IF;

    -- The user first, then the action (see _lock_users); an action's user_id never changes.
    PERFORM bulk_sync._lock_users(ARRAY(SELECT a.user_id FROM bulk_sync.user_actions AS a WHERE a.action_id = p_action_id));
    SELECT * INTO v_action FROM bulk_sync.user_actions AS a WHERE a.action_id = p_action_id FOR UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'revoke_action: unknown action_id' USING ERRCODE = 'BS004', DETAIL = format('action_id: %s', p_action_id);
    ELSIF v_action.revoked THEN
        v_status := 'already_revoked';
    ELSE
        UPDATE bulk_sync.user_actions AS a SET revoked = true, revoked_at = now() WHERE a.action_id = p_action_id;
        INSERT INTO bulk_sync.action_transitions (action_id, user_id, from_status, to_status, reason, performed_by, via)
        VALUES (p_action_id, v_action.user_id, CASE WHEN v_action.verified THEN 'verified' ELSE 'pending' END,
                'revoked', p_reason, coalesce(p_performed_by, session_user), 'revoke_action');
        v_status := 'revoked';
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
COMMENT ON FUNCTION bulk_sync.revoke_action(uuid, text, text) IS
    'Revokes an action for good (it stops counting); status revoked | already_revoked. BS001 empty reason, BS004 unknown action. Audited in action_transitions.';
