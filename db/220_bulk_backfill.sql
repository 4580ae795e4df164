-- bulk_backfill: loads a batch of actions in one transaction, all or nothing.
-- Checks every action, then applies them: the same core as bulk-sync backfill of a file (_stage_open ...
-- _stage_close), with its rules and its INSERT, but without staging the request when every action is
-- valid; the cost follows the batch size, never the size of user_actions.
CREATE OR REPLACE FUNCTION bulk_sync.bulk_backfill(request jsonb)
RETURNS jsonb
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = bulk_sync, pg_catalog, pg_temp
AS $$
DECLARE
    v_actions       jsonb;
    v_key           text;
    v_response      jsonb;
    v_total         integer;
    v_load          uuid;
    v_problem       jsonb;
    v_applied       jsonb;
    v_inserted      bigint;
    v_verified      bigint;
    v_affected      bigint;
    v_rows          bulk_sync._checked_action[];
    v_in_form       boolean;
    v_checked       boolean;
    v_staged        boolean := true;
    v_problems      jsonb;
BEGIN
    v_actions := bulk_sync._request_actions(request, 'bulk_backfill', ARRAY['actions', 'idempotency_key']);
    v_total := jsonb_array_length(v_actions);

    CASE coalesce(jsonb_typeof(request -> 'idempotency_key'), 'null')
        WHEN 'null' THEN v_key := NULL;
        WHEN 'string' THEN v_key := request ->> 'idempotency_key';
        ELSE v_key := '';
    END CASE;
    IF v_key = '' OR length(v_key) > 200 THEN
        RAISE EXCEPTION 'bulk_backfill: idempotency_key must be a non-empty string of at most 200 characters'
            USING ERRCODE = 'BS001', DETAIL = format('idempotency_key: %s', request -> 'idempotency_key');
    END IF;

    -- Idempotency: the first call with a key stores its response; a repeat with the same actions replays it.
    IF v_key IS NOT NULL THEN
        v_response := bulk_sync._claim_idempotency_key(v_key, sha256(convert_to(v_actions::text, 'UTF8')), 'bulk_backfill');
        IF v_response IS NOT NULL THEN
            RETURN v_response || jsonb_build_object('replayed', true);
        END IF;
    END IF;

    -- The forms of the uuids and times, matched for the whole batch at once, spare the rules their
    -- costliest tests.
    v_in_form := bulk_sync._actions_in_form(v_actions);

    -- Every action valid (the rules, asked of the request as _stage_check asks them of a stage): typed
    -- straight from the request, unstaged. When none is stored (one primary-key lookup each, which waits
    -- for nobody), as in most batches, they are inserted at once, as one chunk of a load would be. An
    -- attempt that succeeds was right to take them for new. One fails when an action_id repeats in the
    -- batch (the INSERT meets its own row), or, counted once too many, a total overflows first; or when
    -- another writer stores one of them meanwhile, or deadlocks with it. It is undone, and the load's
    -- rows below settle what really happens.
    v_checked := NOT EXISTS (SELECT FROM jsonb_array_elements(v_actions) AS e(doc)
                              CROSS JOIN LATERAL bulk_sync._action_problems(e.doc, p_in_form => v_in_form) AS p);
    IF v_checked THEN
        SELECT coalesce(array_agg((e.idx - 1, t.action_id, t.user_id, t.lbs, t.logged_at, t.verified,
                                   t.metadata)::bulk_sync._checked_action), '{}'),
               coalesce(bool_or(EXISTS (SELECT FROM bulk_sync.user_actions AS a WHERE a.action_id = t.action_id)), false)
          INTO v_rows, v_staged
          FROM jsonb_array_elements(v_actions) WITH ORDINALITY AS e(doc, idx)
         CROSS JOIN LATERAL bulk_sync._action_values(e.doc) AS t;
        IF NOT v_staged THEN
            BEGIN
                SELECT n.inserted, (SELECT count(DISTINCT u) FROM unnest(n.users) AS u)
                  INTO v_inserted, v_affected
                  FROM bulk_sync._insert_new_actions(v_rows, true) AS n;
                v_verified := 0;
            EXCEPTION WHEN unique_violation OR numeric_value_out_of_range OR deadlock_detected THEN
                v_staged := true;
            END;
        END IF;
    END IF;

    -- Otherwise the one bulk core of file loads: the load's rows, BS002 in _stage_load, then one chunk.
    -- The rows are the typed ones above, each probed (_stored_facts) as _stage_check probes, or, with a
    -- bad action, the request staged and checked by _stage_check, so that the first problem in index
    -- order is reported, BS001 or BS002 alike. The load's rows go with the transaction, whether it
    -- commits or not.
    IF v_staged THEN
        v_load := bulk_sync._stage_open();
        IF v_checked THEN
            INSERT INTO bulk_sync._load_rows
                   (load, line, action_id, user_id, lbs, logged_at, verified, metadata, known, pending, conflicts)
            SELECT v_load, r.line, r.action_id, r.user_id, r.lbs, r.logged_at, r.verified, r.metadata,
                   k.pending IS NOT NULL, coalesce(k.pending, false), coalesce(k.conflicts, false)
              FROM unnest(v_rows) AS r
              LEFT JOIN LATERAL bulk_sync._stored_facts(r.action_id, r.user_id, r.lbs, r.logged_at) AS k ON true
             ORDER BY r.user_id;
            v_problems := '[]';
        ELSE
            INSERT INTO pg_temp.bulk_sync_stage (line, doc)
            SELECT e.idx - 1, e.doc FROM jsonb_array_elements(v_actions) WITH ORDINALITY AS e(doc, idx);
            v_problems := bulk_sync._stage_check(v_load, 1, 1) -> 'problems';
        END IF;
        v_problem := bulk_sync._stage_load(v_load, NULL, 1, v_problems) -> 'problems' -> 0;
        IF v_problem IS NOT NULL THEN
            PERFORM bulk_sync._raise_problem(
                concat_ws(' ', format('actions[%s]', v_problem ->> 'line'), '(action_id ' || (v_problem ->> 'action_id') || ')'),
                v_problem ->> 'field',
                (v_problem ->> 'reason') || CASE WHEN v_problem ? 'first_line' AND v_problem -> 'first_line' <> 'null'
                                                 THEN format(', actions[%s]', v_problem ->> 'first_line') ELSE '' END,
                v_problem ->> 'value', v_problem ->> 'code');
        END IF;
        v_applied := bulk_sync._stage_apply(v_load, NULL, NULL, 'actions[%s]', 'bulk_backfill');
        PERFORM bulk_sync._stage_close(v_load);
        v_inserted := (v_applied ->> 'inserted_count')::bigint;
        v_verified := (v_applied ->> 'verified_count')::bigint;
        v_affected := (v_applied ->> 'affected_users')::bigint;
    END IF;

    v_response := jsonb_build_object(
        'success',          true,
        'inserted_count',   v_inserted,
        'skipped_count',    v_total - v_inserted - v_verified,
        'verified_count',   v_verified,
        'global_total_lbs', bulk_sync._amount(bulk_sync._current_global_total()),
        'affected_users',   v_affected,
        'message',          format('Bulk backfill completed: %s inserted, %s skipped', v_inserted, v_total - v_inserted - v_verified)
                            || CASE WHEN v_verified > 0 THEN format(', %s verified', v_verified) ELSE '' END,
        'idempotency_key',  v_key,
        'replayed',         false);

    IF v_key IS NOT NULL THEN
        UPDATE bulk_sync.idempotency_keys AS k SET response = v_response WHERE k.idempotency_key = v_key;
    END IF;
    RETURN v_response;
END
$$;
COMMENT ON FUNCTION bulk_sync.bulk_backfill(jsonb) IS
    'Loads {"actions": [...], "idempotency_key"?} in one transaction: all valid or nothing changes (BS001/BS002 name the index and action_id), at most 50000 actions (BS005), a reused key replays or is BS003. Returns counts and the global total.';
