-- _log_batch: log_actions' set-based core: valid, typed actions in, in one statement; out, for each of
-- them in the same order, log_action's response or its BS002 error. Raises unique_violation when another
-- writer stored one of the new actions meanwhile.
-- An array, not a jsonb object keyed by index: every jsonb built from other jsonb values copies them
-- token by token, and the object cost log_actions two such copies of all its results.

-- Earlier releases returned that object, and CREATE OR REPLACE cannot change a return type.
DO $$
BEGIN
    IF (SELECT p.prorettype FROM pg_catalog.pg_proc AS p
         WHERE p.oid = to_regprocedure('bulk_sync._log_batch(bulk_sync._batch_action[])')) = 'pg_catalog.jsonb'::regtype THEN
        DROP FUNCTION bulk_sync._log_batch(bulk_sync._batch_action[]);
    END IF;
END
$$;

CREATE OR REPLACE FUNCTION bulk_sync._log_batch(p_items bulk_sync._batch_action[])
RETURNS jsonb[]
LANGUAGE plpgsql
AS $$
DECLARE
    v_global    numeric;
    v_results   jsonb[];
    v_users     uuid[];
    v_new_users uuid[];
    v_plan_mode text;
BEGIN
    IF cardinality(p_items) = 0 THEN
        RETURN '{}'::jsonb[];
    END IF;

    -- Users first, as log_action: the users of the verified actions, in user_id order. Which of them
    -- had no row yet is noted: _lock_users creates one, which a user named only by conflicting
    -- actions must not keep (log_action's BS002 rolls its own back).
    v_users := ARRAY(SELECT DISTINCT i.user_id FROM unnest(p_items) AS i WHERE i.verified);
    v_new_users := bulk_sync._lock_users(v_users);
    v_global := bulk_sync._current_global_total();

    -- Each action is decided as log_action decides it against what the earlier actions of the batch left:
    -- an action_id's facts are the stored action's, else those of its first action (which inserts it);
    -- other facts are BS002; the first verified action of a pending action_id verifies it; the rest are
    -- duplicates. Totals after each action are running sums in array order.
    -- The plan cache would re-plan this statement on every call, as it takes the batch as a parameter;
    -- its generic plan (hash and index joins) is as good at any size. Forced for it only: the DELETE
    -- below needs the custom plan's sizes to choose a hash join.
    v_plan_mode := current_setting('plan_cache_mode');
    PERFORM set_config('plan_cache_mode', 'force_generic_plan', true);
    WITH items AS (
        SELECT i.* FROM unnest(p_items) AS i
    ), stored AS (
        -- The stored actions the batch names, locked in action_id order (after the users).
        SELECT x.action_id, x.user_id, x.emissions_saved_lbs, x.logged_at, x.verified, x.revoked
          FROM (SELECT DISTINCT i.action_id FROM items AS i ORDER BY 1) AS d
         CROSS JOIN LATERAL (SELECT a.* FROM bulk_sync.user_actions AS a
                              WHERE a.action_id = d.action_id
                                FOR UPDATE) AS x
    ), judged AS (
        SELECT i.*,
               s.action_id IS NOT NULL AS known,
               coalesce(s.revoked, false) AS revoked,
               coalesce(s.user_id, first_value(i.user_id) OVER g) AS ref_user_id,
               coalesce(s.emissions_saved_lbs, first_value(i.lbs) OVER g) AS ref_lbs,
               coalesce(s.logged_at, first_value(i.logged_at) OVER g) AS ref_logged_at,
               CASE WHEN s.action_id IS NOT NULL THEN s.verified ELSE first_value(i.verified) OVER g END AS start_verified,
               row_number() OVER g AS nth
          FROM items AS i
          LEFT JOIN stored AS s ON s.action_id = i.action_id
        WINDOW g AS (PARTITION BY i.action_id ORDER BY i.idx)
    ), compared AS (
        SELECT j.*, bulk_sync._differing_facts(j.ref_user_id, j.ref_lbs, j.ref_logged_at, j.user_id, j.lbs, j.logged_at) AS differs
          FROM judged AS j
    ), decided AS (
        SELECT c.*,
               CASE WHEN c.differs IS NOT NULL THEN 'BS002'
                    WHEN NOT c.known AND c.nth = 1 THEN 'inserted'
                    WHEN c.revoked OR c.start_verified THEN 'duplicate'
                    WHEN c.idx = min(c.idx) FILTER (WHERE c.verified AND c.differs IS NULL) OVER (PARTITION BY c.action_id)
                    THEN 'verified'
                    ELSE 'duplicate'
               END AS status
          FROM compared AS c
    ), outcome AS (
        SELECT d.*,
               bool_or(d.status = 'verified') OVER (PARTITION BY d.action_id) AS becomes_verified,
               coalesce(u.total_emissions_lbs, 0)
                 + sum(CASE WHEN (d.status = 'inserted' AND d.verified) OR d.status = 'verified' THEN d.ref_lbs ELSE 0 END)
                       OVER (PARTITION BY d.user_id ORDER BY d.idx) AS user_total,
               v_global
                 + sum(CASE WHEN (d.status = 'inserted' AND d.verified) OR d.status = 'verified' THEN d.ref_lbs ELSE 0 END)
                       OVER (ORDER BY d.idx) AS global_total
          FROM decided AS d
          LEFT JOIN bulk_sync.user_stats AS u ON u.user_id = d.user_id
    ), inserted AS (
        -- A pending action that a later action of the batch verifies is stored verified at once.
        -- No ON CONFLICT: the stored ones are known, and one that another writer stored meanwhile
        -- must fail the attempt (unique_violation), not be skipped.
        INSERT INTO bulk_sync.user_actions AS a
               (action_id, user_id, emissions_saved_lbs, verified, logged_at, metadata, verified_at)
        SELECT o.action_id, o.user_id, o.lbs, o.verified OR o.becomes_verified, o.logged_at, o.metadata,
               CASE WHEN o.verified OR o.becomes_verified THEN now() END
          FROM outcome AS o
         WHERE o.status = 'inserted'
         ORDER BY o.action_id
    ), verified AS (
        UPDATE bulk_sync.user_actions AS a
           SET verified = true, verified_at = now()
          FROM outcome AS o
         WHERE o.status = 'verified' AND o.known AND a.action_id = o.action_id
        RETURNING a.action_id
    ), audit AS (
        INSERT INTO bulk_sync.action_transitions (action_id, user_id, from_status, to_status, performed_by, via)
        SELECT o.action_id, o.user_id, 'pending', 'verified', session_user, 'log_action'
          FROM outcome AS o
         WHERE o.status = 'verified'
         ORDER BY o.idx
    )
    SELECT array_agg(CASE
               WHEN o.status = 'BS002'
               THEN jsonb_build_object(
                        'success', false, 'action_id', o.action_id,
                        'error', jsonb_build_object(
                            'code', 'BS002',
                            'message', bulk_sync._facts_conflict_message('log_action', o.differs),
                            'detail', bulk_sync._facts_detail(o.ref_user_id, o.ref_lbs, o.ref_logged_at,
                                                              o.user_id, o.lbs, o.logged_at)))
               ELSE bulk_sync._log_response(o.status, o.action_id, o.user_id, o.lbs, o.verified, o.revoked,
                                            o.user_total, o.global_total)
           END ORDER BY o.idx)
      INTO v_results
      FROM outcome AS o;  -- inserted, verified and audit run too: a data-modifying WITH always runs to completion
    PERFORM set_config('plan_cache_mode', v_plan_mode, true);

    IF cardinality(v_new_users) > 0 THEN
        DELETE FROM bulk_sync.user_stats AS s
         WHERE s.user_id = ANY (v_new_users) AND s.action_count = 0
           AND s.user_id IN (SELECT r.user_id
                               FROM unnest(p_items, v_results)
                                    AS r(idx, action_id, user_id, lbs, logged_at, verified, metadata, result)
                              WHERE r.verified
                              GROUP BY r.user_id
                             HAVING bool_and(r.result -> 'error' ->> 'code' = 'BS002'));
    END IF;
    RETURN v_results;
END
$$;
