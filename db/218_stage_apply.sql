-- _stage_apply: applies the checked rows of load p_load for users p_from <= user_id < p_below (NULL:
-- unbounded) in the caller's transaction: one INSERT of the new actions (_insert_new_actions), then the
-- verification of known pending ones. The totals move once per user.
CREATE OR REPLACE FUNCTION bulk_sync._stage_apply(
    p_load             uuid,
    p_from             uuid,
    p_below            uuid,
    p_row_format       text DEFAULT 'line %s',
    p_via              text DEFAULT 'bulk_backfill',
    p_idempotency_key  text DEFAULT NULL)
RETURNS jsonb
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = bulk_sync, pg_catalog, pg_temp
AS $$
DECLARE
    v_rows      bigint;
    v_pending   bigint;
    v_raced     boolean := false;
    v_inserted  bigint;
    v_verified  bigint := 0::bigint;
    v_users     uuid[];
    v_held      uuid[];
    v_conflict  record;
    v_result    jsonb;
    v_new       bulk_sync._checked_action[];
BEGIN
    PERFORM bulk_sync._load_held(p_load);

    -- With a key, the chunk is idempotent like a bulk_backfill call: a repeat of the same rows replays.
    IF p_idempotency_key IS NOT NULL THEN
        v_result := bulk_sync._claim_idempotency_key(
            p_idempotency_key,
            (SELECT sha256(convert_to(string_agg(format('%s %s %s %s %s %s', l.action_id, l.user_id, l.lbs,
                                                        l.logged_at, l.verified, l.metadata), E'\n'
                                                 ORDER BY l.line), 'UTF8'))
               FROM bulk_sync._load_rows AS l
              WHERE l.load = p_load AND (l.user_id >= p_from OR p_from IS NULL) AND (l.user_id < p_below OR p_below IS NULL)),
            p_via);
        IF v_result IS NOT NULL THEN
            RETURN v_result || jsonb_build_object('replayed', true,
                                                  'global_total_lbs', bulk_sync._amount(bulk_sync._current_global_total()));
        END IF;
    END IF;

    SELECT coalesce(sum(l.copies), 0)::bigint, count(*) FILTER (WHERE l.verified AND l.pending) INTO v_rows, v_pending
      FROM bulk_sync._load_rows AS l
     WHERE l.load = p_load AND (l.user_id >= p_from OR p_from IS NULL) AND (l.user_id < p_below OR p_below IS NULL);

    -- Users first (see _lock_users), in user_id order, so the triggers below only touch rows already held:
    -- the users of verified rows that are new or would verify a pending action. A rerun of a load that
    -- was applied changes no user, and locks none.
    v_held := ARRAY(SELECT l.user_id FROM bulk_sync._load_rows AS l
                     WHERE l.load = p_load AND l.verified AND (NOT l.known OR l.pending)
                       AND (l.user_id >= p_from OR p_from IS NULL) AND (l.user_id < p_below OR p_below IS NULL));

    -- New actions in one INSERT (_insert_new_actions). A chunk that verifies no stored action knows
    -- its gains before it inserts: they are applied first, which locks (or creates) the same users in
    -- the same order. Should another writer have stored one of them since _stage_load, all of this is
    -- undone and the chunk is inserted again skipping stored actions, every row of it then treated as
    -- possibly known, and the triggers count what was inserted.
    v_new := ARRAY(SELECT (l.line, l.action_id, l.user_id, l.lbs, l.logged_at, l.verified, l.metadata)::bulk_sync._checked_action
                     FROM bulk_sync._load_rows AS l
                    WHERE l.load = p_load AND NOT l.known
                      AND (l.user_id >= p_from OR p_from IS NULL) AND (l.user_id < p_below OR p_below IS NULL));
    BEGIN
        IF v_pending > 0 THEN
            PERFORM bulk_sync._lock_users(v_held);
        END IF;
        SELECT n.inserted, n.users INTO v_inserted, v_users FROM bulk_sync._insert_new_actions(v_new, v_pending = 0) AS n;
    EXCEPTION WHEN unique_violation OR deadlock_detected THEN
        -- A deadlock can only be with a writer that holds one of these action_ids and waits for one
        -- of these users (a DBA's direct DML takes the action first), or that found all 64 slots
        -- claimed (docs/DESIGN.md, lock order): undone, the chunk lets it finish and then finds
        -- what it stored as after any other race.
        v_raced := true;
    END;

    IF v_raced THEN
        PERFORM bulk_sync._lock_users(v_held);
        SELECT n.inserted, n.users INTO v_inserted, v_users FROM bulk_sync._insert_new_actions(v_new, false, true) AS n;
    END IF;

    -- Known actions (a rerun, a resubmission): the same facts were checked by _stage_load, and after a
    -- race they are checked here; a verified row verifies a stored pending action (never a revoked one),
    -- which the row lock below finds still pending or not.
    IF v_pending > 0 OR v_raced THEN
        IF v_raced THEN
            SELECT l.line, l.action_id, l.user_id, l.lbs, l.logged_at,
                   a.user_id AS stored_user_id, a.emissions_saved_lbs AS stored_lbs, a.logged_at AS stored_logged_at
              INTO v_conflict
              FROM bulk_sync._load_rows AS l
             CROSS JOIN LATERAL (SELECT x.user_id, x.emissions_saved_lbs, x.logged_at
                                   FROM bulk_sync.user_actions AS x
                                  WHERE x.action_id = l.action_id
                                  LIMIT 1) AS a
             WHERE l.load = p_load AND (l.user_id >= p_from OR p_from IS NULL) AND (l.user_id < p_below OR p_below IS NULL)
               AND (a.user_id, a.emissions_saved_lbs, a.logged_at) IS DISTINCT FROM (l.user_id, l.lbs, l.logged_at)
             ORDER BY l.line
             LIMIT 1;
            IF FOUND THEN
                PERFORM bulk_sync._check_same_facts(
                    v_conflict.stored_user_id, v_conflict.stored_lbs, v_conflict.stored_logged_at,
                    v_conflict.user_id, v_conflict.lbs, v_conflict.logged_at,
                    format('%s (action_id %s)', format(p_row_format, v_conflict.line), v_conflict.action_id));
            END IF;
        END IF;

        WITH locked AS (
            -- One primary-key probe per wanted action, locked in action_id order.
            SELECT a.action_id
              FROM (SELECT l.action_id FROM bulk_sync._load_rows AS l
                     WHERE l.load = p_load AND l.verified AND (l.pending OR v_raced)
                       AND (l.user_id >= p_from OR p_from IS NULL) AND (l.user_id < p_below OR p_below IS NULL)
                     ORDER BY l.action_id) AS w
             CROSS JOIN LATERAL (SELECT x.action_id FROM bulk_sync.user_actions AS x
                                  WHERE x.action_id = w.action_id AND NOT x.verified AND NOT x.revoked
                                    FOR UPDATE) AS a
        ), verified AS (
            UPDATE bulk_sync.user_actions AS a
               SET verified = true, verified_at = now()
              FROM locked AS k
             WHERE a.action_id = k.action_id
            RETURNING a.action_id, a.user_id
        ), audit AS (
            INSERT INTO bulk_sync.action_transitions (action_id, user_id, from_status, to_status, performed_by, via)
            SELECT v.action_id, v.user_id, 'pending', 'verified', session_user, p_via
              FROM verified AS v
             ORDER BY v.action_id
        )
        SELECT count(*), v_users || coalesce(array_agg(v.user_id), '{}')
          INTO v_verified, v_users
          FROM verified AS v;
    END IF;

    v_result := jsonb_build_object(
        'rows',           v_rows,
        'inserted_count', v_inserted,
        'skipped_count',  v_rows - v_inserted - v_verified,
        'verified_count', v_verified,
        'affected_users', (SELECT count(DISTINCT u) FROM unnest(v_users) AS u),
        'replayed',       false);
    -- The global total after the chunk, as every writer's response carries it (a replay reports its own).
    v_result := v_result || jsonb_build_object('global_total_lbs', bulk_sync._amount(bulk_sync._current_global_total()));
    IF p_idempotency_key IS NOT NULL THEN
        UPDATE bulk_sync.idempotency_keys AS k SET response = v_result WHERE k.idempotency_key = p_idempotency_key;
    END IF;
    RETURN v_result;
END
$$;
COMMENT ON FUNCTION bulk_sync._stage_apply(uuid, uuid, uuid, text, text, text) IS
    'Internal to bulk loads: applies the checked rows of load p_load for users in [p_from, p_below) (NULL: unbounded). With p_idempotency_key a repeat of the same rows replays the first result. Returns {"rows", "inserted_count", "skipped_count", "verified_count", "affected_users", "replayed", "global_total_lbs"}.';
