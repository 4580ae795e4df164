-- log_action (positional form): records one action exactly once and returns the totals it produced.
-- The hot path of the API: one INSERT ... ON CONFLICT, after which the call applies its gain itself
-- (_apply_deltas, which returns the totals for the response; the insert trigger skips the statement).
-- A verification moves the totals through the update trigger. Status: inserted, duplicate, verified;
-- BS002 for conflicting facts.
CREATE OR REPLACE FUNCTION bulk_sync.log_action(
    p_action_id  uuid,
    p_user_id    uuid,
    p_lbs        numeric,
    p_logged_at  timestamptz,
    p_verified   boolean DEFAULT false,
    p_metadata   jsonb   DEFAULT '{}')
RETURNS jsonb
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = bulk_sync, pg_catalog, pg_temp
AS $$
DECLARE
    v_lbs       numeric(30,6);
    v_metadata  jsonb := coalesce(p_metadata, '{}');
    v_stored    bulk_sync.user_actions;
    v_status    text := 'inserted';
    v_reason    text;
    v_inserted  boolean;
    v_totals    record;
BEGIN
    IF p_action_id IS NULL OR p_user_id IS NULL OR p_verified IS NULL THEN
        RAISE EXCEPTION 'log_action: % is required',
              concat_ws(', ', CASE WHEN p_action_id IS NULL THEN 'action_id' END,
                              CASE WHEN p_user_id IS NULL THEN 'user_id' END,
                              CASE WHEN p_verified IS NULL THEN 'verified' END)
            USING ERRCODE = 'BS001', DETAIL = 'null argument';
    END IF;
    IF jsonb_typeof(v_metadata) <> 'object' THEN
        RAISE EXCEPTION 'log_action: metadata must be a JSON object'
            USING ERRCODE = 'BS001', DETAIL = format('metadata: %s', v_metadata);
    END IF;
    -- The amount and time rules every entry point shares, on the typed arguments.
    v_reason := bulk_sync._lbs_problem(p_lbs);
    IF v_reason IS NOT NULL THEN
        PERFORM bulk_sync._raise_problem('log_action', 'lbs', v_reason, p_lbs::text);
    END IF;
    v_reason := bulk_sync._logged_at_problem(p_logged_at);
    IF v_reason IS NOT NULL THEN
        PERFORM bulk_sync._raise_problem('log_action', 'logged_at', v_reason, p_logged_at::text);
    END IF;
    v_lbs := p_lbs;

    -- A verified submission may move the user's totals: take the user first (see _lock_users).
    IF p_verified THEN
        PERFORM bulk_sync._lock_users(ARRAY[p_user_id]);
    END IF;

    -- Counted here rather than by the insert trigger (see _count_inserted_actions): the gain's writes
    -- are the same, and their totals are the response's, without reading them again.
    PERFORM set_config('bulk_sync.counted_by_caller', 'on', true);
    INSERT INTO bulk_sync.user_actions AS a
           (action_id, user_id, emissions_saved_lbs, verified, logged_at, metadata, verified_at)
    VALUES (p_action_id, p_user_id, v_lbs, p_verified, p_logged_at, v_metadata,
            CASE WHEN p_verified THEN now() END)
        ON CONFLICT (action_id) DO NOTHING;
    v_inserted := FOUND;
    PERFORM set_config('bulk_sync.counted_by_caller', '', true);

    IF v_inserted AND p_verified THEN
        v_totals := bulk_sync._apply_deltas(ARRAY[(p_user_id, v_lbs, 1, p_logged_at, false, p_action_id, 'logged')
                                                  ::bulk_sync._user_delta]);
        RETURN bulk_sync._log_response(v_status, p_action_id, p_user_id, v_lbs, true, false,
                                       v_totals.user_total, v_totals.global_total);
    ELSIF NOT v_inserted THEN
        SELECT * INTO v_stored FROM bulk_sync.user_actions AS a WHERE a.action_id = p_action_id FOR UPDATE;
        PERFORM bulk_sync._check_same_facts(v_stored.user_id, v_stored.emissions_saved_lbs, v_stored.logged_at,
                                            p_user_id, v_lbs, p_logged_at, 'log_action');
        IF p_verified AND NOT v_stored.verified AND NOT v_stored.revoked THEN
            UPDATE bulk_sync.user_actions AS a
               SET verified = true, verified_at = now()
             WHERE a.action_id = p_action_id;
            INSERT INTO bulk_sync.action_transitions (action_id, user_id, from_status, to_status, performed_by, via)
            VALUES (p_action_id, p_user_id, 'pending', 'verified', session_user, 'log_action');
            v_status := 'verified';
        ELSE
            v_status := 'duplicate';
        END IF;
    END IF;

    RETURN bulk_sync._log_response(v_status, p_action_id, p_user_id, v_lbs, p_verified, coalesce(v_stored.revoked, false),
                                   bulk_sync._current_user_total(p_user_id), bulk_sync._current_global_total());
END
$$;
COMMENT ON FUNCTION bulk_sync.log_action(uuid, uuid, numeric, timestamptz, boolean, jsonb) IS
    'Records one action exactly once (idempotent by action_id) and returns JSON with the user and global totals. status: inserted | duplicate | verified; BS001 invalid input, BS002 action_id reused with different facts.';
