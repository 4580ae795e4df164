-- bulk_backfill: loads a batch of actions in one transaction, all or nothing.
-- Stages the actions, checks them all, then applies them: the same core as bulk-sync backfill of a file
-- (_stage_open ... _stage_close), so the cost follows the batch size, never the size of user_actions.
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
    v_inserted      integer;
    v_verified      integer;
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

    -- The one bulk core: stage the actions, check them all (_stage_check, then BS002 in _stage_load), apply
    -- them as one chunk. The load's rows go with it, whether this transaction commits or not.
    v_load := bulk_sync._stage_open();
    INSERT INTO pg_temp.bulk_sync_stage (line, doc)
    SELECT e.idx - 1, e.doc FROM jsonb_array_elements(v_actions) WITH ORDINALITY AS e(doc, idx);
    v_problem := bulk_sync._stage_load(v_load, NULL, 1, bulk_sync._stage_check(v_load, 1, 1) -> 'problems') -> 'problems' -> 0;
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
    v_inserted := (v_applied ->> 'inserted_count')::integer;
    v_verified := (v_applied ->> 'verified_count')::integer;

    v_response := jsonb_build_object(
        'success',          true,
        'inserted_count',   v_inserted,
        'skipped_count',    v_total - v_inserted - v_verified,
        'verified_count',   v_verified,
        'global_total_lbs', bulk_sync._amount(bulk_sync._current_global_total()),
        'affected_users',   (v_applied -> 'affected_users')::integer,
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
