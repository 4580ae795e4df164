-- log_actions: many independent log_action calls in one: each action is judged and answered exactly as
-- a separate log_action made in array order would be, but checked, stored and counted set-based.
CREATE OR REPLACE FUNCTION bulk_sync.log_actions(request jsonb)
RETURNS jsonb
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = bulk_sync, pg_catalog, pg_temp
AS $$
DECLARE
    v_actions      jsonb;
    v_in_form      boolean;
    v_failed       jsonb;
    v_items        bulk_sync._batch_action[];
    v_results      jsonb[];
    v_item         bulk_sync._batch_action;
    v_result       jsonb;
    v_state        text;
    v_message      text;
    v_detail       text;
    v_created      uuid[];
    v_plan_mode    text;
    v_response     jsonb;
BEGIN
    v_actions := bulk_sync._request_actions(request, 'log_actions', ARRAY['actions']);

    -- 1. Each invalid action's error, as log_action(jsonb) raises it (_parse_action: the first problem).
    -- The forms of the uuids and times are matched for the whole batch at once (_actions_in_form).
    -- Given the batch as a parameter, the plan cache re-plans this statement on every call, and
    -- planning it (with _action_problems inlined) cost more than running it; its generic plan is a
    -- loop over the actions at any size. Forced around 1, 2 and the results only, as in _apply_deltas
    -- (_log_batch forces its own).
    v_in_form := bulk_sync._actions_in_form(v_actions);
    v_plan_mode := current_setting('plan_cache_mode');
    PERFORM set_config('plan_cache_mode', 'force_generic_plan', true);
    SELECT jsonb_object_agg(e.idx - 1, jsonb_build_object(
               'success', false,
               'action_id', CASE WHEN jsonb_typeof(e.doc) = 'object' THEN e.doc -> 'action_id' END,
               'error', jsonb_build_object('code', 'BS001',
                                           'message', format('request: %s %s', p.field, p.reason),
                                           'detail', format('%s: %s', p.field, coalesce(p.value, 'missing')))))
      INTO v_failed
      FROM jsonb_array_elements(v_actions) WITH ORDINALITY AS e(doc, idx)
     CROSS JOIN LATERAL (SELECT * FROM bulk_sync._action_problems(e.doc, p_in_form => v_in_form) LIMIT 1) AS p;
    v_failed := coalesce(v_failed, '{}');

    -- 2. The valid ones, typed, with their 0-based index.
    SELECT coalesce(array_agg(ROW(e.idx - 1, v.action_id, v.user_id, v.lbs, v.logged_at, v.verified, v.metadata)
                                  ::bulk_sync._batch_action ORDER BY e.idx), '{}')
      INTO v_items
      FROM jsonb_array_elements(v_actions) WITH ORDINALITY AS e(doc, idx)
     CROSS JOIN LATERAL bulk_sync._action_values(e.doc) AS v
     WHERE NOT v_failed ? (e.idx - 1)::text;
    PERFORM set_config('plan_cache_mode', v_plan_mode, true);

    BEGIN
        v_results := bulk_sync._log_batch(v_items);
    EXCEPTION WHEN unique_violation OR numeric_value_out_of_range THEN
        -- Another writer stored one of the new actions meanwhile, or a total would overflow
        -- NUMERIC(30,6): nothing of the set-based attempt stays, and each action is logged on its
        -- own, in order. Its users are taken first, all of them in user_id order, as one call takes
        -- them: otherwise a change made here would hold its user while the next action waits for
        -- another, out of order, and two such batches could each wait for the other.
        v_created := bulk_sync._lock_users(ARRAY(SELECT i.user_id FROM unnest(v_items) AS i WHERE i.verified));
        v_results := '{}';
        FOREACH v_item IN ARRAY v_items LOOP
            BEGIN
                v_result := bulk_sync.log_action(v_actions -> v_item.idx);
            EXCEPTION WHEN SQLSTATE 'BS002' OR numeric_value_out_of_range THEN
                GET STACKED DIAGNOSTICS v_state = RETURNED_SQLSTATE, v_message = MESSAGE_TEXT, v_detail = PG_EXCEPTION_DETAIL;
                v_result := jsonb_build_object(
                    'success', false, 'action_id', v_actions -> v_item.idx -> 'action_id',
                    'error', jsonb_build_object('code', v_state, 'message', v_message, 'detail', nullif(v_detail, '')));
            END;
            v_results := array_append(v_results, v_result);  -- position for position with v_items
        END LOOP;
        -- A failed log_action undoes the row it created for its user; so does this, for users none
        -- of whose actions here succeeded.
        DELETE FROM bulk_sync.user_stats AS s
         WHERE s.user_id = ANY (v_created)
           AND NOT EXISTS (SELECT FROM unnest(v_items, v_results)
                                       AS r(idx, action_id, user_id, lbs, logged_at, verified, metadata, result)
                            WHERE r.user_id = s.user_id AND r.verified AND r.result ? 'status');
    END;

    -- The results in order, planned once too: a custom plan would differ only in the batch's size.
    -- v_results holds those of v_items, position for position. Given as a jsonb[], they are copied
    -- into the response once; a jsonb_agg would be copied into it again.
    PERFORM set_config('plan_cache_mode', 'force_generic_plan', true);
    v_response := jsonb_build_object(
        'results',          ARRAY(SELECT r.result
                                    FROM (SELECT b.idx, b.result
                                            FROM unnest(v_items, v_results)
                                                 AS b(idx, action_id, user_id, lbs, logged_at, verified, metadata, result)
                                          UNION ALL
                                          SELECT f.key::integer, f.value
                                            FROM jsonb_each(v_failed) AS f) AS r
                                   ORDER BY r.idx),
        'global_total_lbs', bulk_sync._amount(bulk_sync._current_global_total()));
    PERFORM set_config('plan_cache_mode', v_plan_mode, true);
    RETURN v_response;
END
$$;
COMMENT ON FUNCTION bulk_sync.log_actions(jsonb) IS
    'Logs {"actions": [...]} as independent log_action calls made in array order in one transaction: {"results": [log_action''s response or {"success": false, "action_id", "error": {code, message, detail}}], "global_total_lbs"}. At most 50000 actions (BS005).';
