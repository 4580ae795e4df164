-- bulk_backfill: loads a batch of actions in one transaction, all or nothing.
-- Validates every action first (set-based), applies them with one INSERT ... ON CONFLICT and one
-- verify UPDATE, so the cost follows the batch size, never the size of user_actions.
CREATE OR REPLACE FUNCTION bulk_sync.bulk_backfill(request jsonb)
RETURNS jsonb
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = bulk_sync, pg_catalog, pg_temp
AS $$
DECLARE
    c_max_actions   CONSTANT integer := 50000;
    v_actions       jsonb;
    v_key           text;
    v_sha           bytea;
    v_stored_sha    bytea;
    v_response      jsonb;
    v_total         integer;
    v_rows          bulk_sync._batch_action[];
    v_conflict      record;
    v_inserted      integer;
    v_verified      integer;
    v_affected      integer;
    v_counted_users uuid[];
BEGIN
    IF request IS NULL OR jsonb_typeof(request) <> 'object' THEN
        RAISE EXCEPTION 'bulk_backfill: the request must be a JSON object'
            USING ERRCODE = 'BS001', DETAIL = format('request: %s', coalesce(left(request::text, 200), 'null'));
    ELSIF (request - ARRAY['actions', 'idempotency_key']) <> '{}'::jsonb THEN
        RAISE EXCEPTION 'bulk_backfill: unknown key %',
              (SELECT string_agg(k, ', ' ORDER BY k) FROM jsonb_object_keys(request - ARRAY['actions', 'idempotency_key']) AS k)
            USING ERRCODE = 'BS001', HINT = 'Allowed keys: actions, idempotency_key.';
    END IF;

    v_actions := request -> 'actions';
    IF v_actions IS NULL OR jsonb_typeof(v_actions) <> 'array' THEN
        RAISE EXCEPTION 'bulk_backfill: actions must be a JSON array'
            USING ERRCODE = 'BS001', DETAIL = format('actions: %s', coalesce(left(v_actions::text, 200), 'missing'));
    END IF;

    CASE coalesce(jsonb_typeof(request -> 'idempotency_key'), 'null')
        WHEN 'null' THEN v_key := NULL;
        WHEN 'string' THEN v_key := request ->> 'idempotency_key';
        ELSE v_key := '';
    END CASE;
    IF v_key = '' OR length(v_key) > 200 THEN
        RAISE EXCEPTION 'bulk_backfill: idempotency_key must be a non-empty string of at most 200 characters'
            USING ERRCODE = 'BS001', DETAIL = format('idempotency_key: %s', request -> 'idempotency_key');
    END IF;

    v_total := jsonb_array_length(v_actions);
    IF v_total > c_max_actions THEN
        RAISE EXCEPTION 'bulk_backfill: % actions exceed the limit of % per call', v_total, c_max_actions
            USING ERRCODE = 'BS005', DETAIL = format('actions: %s', v_total),
                  HINT = 'Split the batch, or stream a file with: bulk-sync backfill FILE.';
    END IF;

    -- Idempotency: the first call with a key stores its response; a repeat with the same actions
    -- replays it. A concurrent repeat waits on the key's unique index until the first commits.
    IF v_key IS NOT NULL THEN
        v_sha := sha256(convert_to(v_actions::text, 'UTF8'));
        INSERT INTO bulk_sync.idempotency_keys (idempotency_key, request_sha256)
        VALUES (v_key, v_sha)
            ON CONFLICT (idempotency_key) DO NOTHING;
        IF NOT FOUND THEN
            SELECT k.request_sha256, k.response INTO v_stored_sha, v_response
              FROM bulk_sync.idempotency_keys AS k WHERE k.idempotency_key = v_key;
            IF v_stored_sha <> v_sha THEN
                RAISE EXCEPTION 'bulk_backfill: idempotency_key % was already used with different actions', v_key
                    USING ERRCODE = 'BS003', DETAIL = format('idempotency_key: %s', v_key),
                          HINT = 'Use a new key for a new batch.';
            END IF;
            RETURN v_response || jsonb_build_object('replayed', true);
        END IF;
    END IF;

    SELECT array_agg(ROW(p.idx, p.action_id, p.user_id, p.lbs, p.logged_at, p.verified, p.metadata)::bulk_sync._batch_action)
      INTO v_rows
      FROM bulk_sync._parse_actions(v_actions) AS p;

    -- The same action_id twice in one batch: identical facts count once, different facts are BS002.
    SELECT b.idx, b.action_id, b.user_id, b.lbs, b.logged_at, f.idx AS first_idx,
           f.user_id AS first_user_id, f.lbs AS first_lbs, f.logged_at AS first_logged_at
      INTO v_conflict
      FROM unnest(v_rows) AS b
      JOIN (SELECT DISTINCT ON (r.action_id) r.* FROM unnest(v_rows) AS r ORDER BY r.action_id, r.idx) AS f
        ON f.action_id = b.action_id
     WHERE (b.user_id, b.lbs, b.logged_at) IS DISTINCT FROM (f.user_id, f.lbs, f.logged_at)
     ORDER BY b.idx
     LIMIT 1;
    IF FOUND THEN
        PERFORM bulk_sync._check_same_facts(
            v_conflict.first_user_id, v_conflict.first_lbs, v_conflict.first_logged_at,
            v_conflict.user_id, v_conflict.lbs, v_conflict.logged_at,
            format('actions[%s] (action_id %s)', v_conflict.idx, v_conflict.action_id),
            format('actions[%s]', v_conflict.first_idx));
    END IF;

    -- Users first (see _lock_users): every user the batch may count for, in user_id order, so the
    -- trigger runs of the INSERT and of the verify UPDATE below only touch rows already held.
    PERFORM bulk_sync._lock_users(ARRAY(SELECT r.user_id FROM unnest(v_rows) AS r WHERE r.verified));

    -- New actions, in action_id order so concurrent batches lock index entries in one order.
    -- The triggers on user_actions move the totals for the verified ones.
    WITH inserted AS (
        INSERT INTO bulk_sync.user_actions AS a
               (action_id, user_id, emissions_saved_lbs, verified, logged_at, metadata, verified_at)
        SELECT d.action_id, d.user_id, d.lbs, d.verified, d.logged_at, d.metadata,
               CASE WHEN d.verified THEN now() END
          FROM (SELECT DISTINCT ON (r.action_id) r.*
                  FROM unnest(v_rows) AS r
                 ORDER BY r.action_id, r.verified DESC, r.idx) AS d
         ORDER BY d.action_id
            ON CONFLICT (action_id) DO NOTHING
        RETURNING a.user_id, a.verified
    )
    SELECT count(*), coalesce(array_agg(i.user_id) FILTER (WHERE i.verified), '{}')
      INTO v_inserted, v_counted_users
      FROM inserted AS i;

    -- Every distinct action_id was new (the usual backfill): nothing is known, nothing to check or
    -- verify. Otherwise the known ones must carry the same facts, and may be verified.
    v_verified := 0;
    IF v_inserted < (SELECT count(DISTINCT r.action_id) FROM unnest(v_rows) AS r) THEN
        -- Known actions must carry the same facts (checked after the insert: a concurrent batch that
        -- inserted the same action_id has committed by now, or we inserted it ourselves).
        -- One primary-key lookup per action (LATERAL ... LIMIT 1): a join lets the planner pick a
        -- hash join over all of user_actions, whose cost grows with the ledger, not the batch.
        SELECT r.idx, r.action_id, r.user_id, r.lbs, r.logged_at,
               a.user_id AS stored_user_id, a.emissions_saved_lbs AS stored_lbs, a.logged_at AS stored_logged_at
          INTO v_conflict
          FROM unnest(v_rows) AS r
         CROSS JOIN LATERAL (SELECT x.user_id, x.emissions_saved_lbs, x.logged_at
                               FROM bulk_sync.user_actions AS x
                              WHERE x.action_id = r.action_id
                              LIMIT 1) AS a
         WHERE (r.user_id, r.lbs, r.logged_at) IS DISTINCT FROM (a.user_id, a.emissions_saved_lbs, a.logged_at)
         ORDER BY r.idx
         LIMIT 1;
        IF FOUND THEN
            PERFORM bulk_sync._check_same_facts(
                v_conflict.stored_user_id, v_conflict.stored_lbs, v_conflict.stored_logged_at,
                v_conflict.user_id, v_conflict.lbs, v_conflict.logged_at,
                format('actions[%s] (action_id %s)', v_conflict.idx, v_conflict.action_id));
        END IF;

        -- A verified resubmission verifies a stored unverified action (never a revoked one).
        WITH wanted AS (
            SELECT DISTINCT r.action_id FROM unnest(v_rows) AS r WHERE r.verified
        ), locked AS (
            SELECT a.action_id
              FROM bulk_sync.user_actions AS a
              JOIN wanted AS w ON w.action_id = a.action_id
             WHERE NOT a.verified AND NOT a.revoked
             ORDER BY a.action_id
               FOR UPDATE OF a
        ), verified AS (
            UPDATE bulk_sync.user_actions AS a
               SET verified = true, verified_at = now()
              FROM locked AS l
             WHERE a.action_id = l.action_id
            RETURNING a.action_id, a.user_id
        ), audit AS (
            INSERT INTO bulk_sync.action_transitions (action_id, user_id, from_status, to_status, performed_by, via)
            SELECT v.action_id, v.user_id, 'pending', 'verified', session_user, 'bulk_backfill'
              FROM verified AS v
             ORDER BY v.action_id
        )
        SELECT count(*), v_counted_users || coalesce(array_agg(v.user_id), '{}')
          INTO v_verified, v_counted_users
          FROM verified AS v;
    END IF;

    SELECT count(DISTINCT u) INTO v_affected FROM unnest(v_counted_users) AS u;

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
