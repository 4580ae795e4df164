-- reconcile: compares the global total and every user's stats with the counted actions, and fixes
-- and audits any drift. Safe under any concurrent load: see docs/DESIGN.md, "Reconcile".
CREATE OR REPLACE FUNCTION bulk_sync.reconcile(request jsonb DEFAULT '{}')
RETURNS jsonb
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = bulk_sync, pg_catalog, pg_temp
AS $$
DECLARE
    v_request         jsonb := coalesce(request, '{}');
    v_performed_by    text;
    v_auto_correct    boolean;
    v_run_id          uuid := gen_random_uuid();
    v_started_at      timestamptz := clock_timestamp();
    v_truth           numeric;
    v_global          numeric;
    v_drifted         uuid[];
    v_out_of_sync     integer;
    v_fixed_users     uuid[];
    v_in_sync         boolean;
    v_fixed           boolean := false;
    v_correction_id   uuid;
    v_user_fixes      integer := 0;
    v_recent          jsonb;
    v_result          jsonb;
BEGIN
    IF jsonb_typeof(v_request) <> 'object' THEN
        RAISE EXCEPTION 'reconcile: the request must be a JSON object' USING ERRCODE = 'BS001', DETAIL = format('request: %s', v_request);
    ELSIF (v_request - ARRAY['performed_by', 'auto_correct']) <> '{}'::jsonb THEN
        RAISE EXCEPTION 'reconcile: unknown key %',
              (SELECT string_agg(k, ', ' ORDER BY k) FROM jsonb_object_keys(v_request - ARRAY['performed_by', 'auto_correct']) AS k)
            USING ERRCODE = 'BS001', HINT = 'Allowed keys: performed_by, auto_correct.';
    END IF;
    CASE coalesce(jsonb_typeof(v_request -> 'performed_by'), 'null')
        WHEN 'null' THEN v_performed_by := 'system';
        WHEN 'string' THEN v_performed_by := nullif(btrim(v_request ->> 'performed_by'), '');
        ELSE v_performed_by := NULL;
    END CASE;
    -- Bounded, because the run's notification carries it and NOTIFY takes at most 8000 bytes.
    IF v_performed_by IS NULL OR length(v_performed_by) > 200 THEN
        RAISE EXCEPTION 'reconcile: performed_by must be a non-empty string of at most 200 characters'
            USING ERRCODE = 'BS001', DETAIL = format('performed_by: %s', v_request -> 'performed_by');
    END IF;
    CASE coalesce(jsonb_typeof(v_request -> 'auto_correct'), 'null')
        WHEN 'null' THEN v_auto_correct := true;
        WHEN 'boolean' THEN v_auto_correct := (v_request -> 'auto_correct')::boolean;
        ELSE
            RAISE EXCEPTION 'reconcile: auto_correct must be true or false'
                USING ERRCODE = 'BS001', DETAIL = format('auto_correct: %s', v_request -> 'auto_correct');
    END CASE;

    -- One run at a time; the statements below take their snapshots after this lock is granted.
    PERFORM pg_advisory_xact_lock(1651862635, 3);

    -- One statement, one snapshot: every writer changes actions, user_stats and a slot in one
    -- transaction, so what the check sees is consistent and any difference is real drift. When
    -- the global total differs, the mismatch report's recent actions come from that snapshot too.
    SELECT c.counted_total, c.slots_total, c.drifted,
           CASE WHEN c.counted_total <> c.slots_total THEN bulk_sync._recent_actions(100) END
      INTO v_truth, v_global, v_drifted, v_recent
      FROM bulk_sync._compare_all_users() AS c;

    v_out_of_sync := coalesce(cardinality(v_drifted), 0);
    v_in_sync := v_truth = v_global AND v_out_of_sync = 0;

    IF NOT v_in_sync AND v_auto_correct THEN
        IF v_truth <> v_global THEN
            -- Correct writers move slots and actions together, so the drift is the same in every
            -- later snapshot: an increment of reconcile's own slot fixes it without locking writers.
            UPDATE bulk_sync._global_slots
               SET total_lbs = total_lbs + (v_truth - v_global), last_updated = now()
             WHERE slot = 64;
            INSERT INTO bulk_sync.emissions_corrections
                   (previous_total, corrected_total, discrepancy, reason, performed_by, reconciliation_run_id, metadata)
            VALUES (v_global, v_truth, abs(v_global - v_truth),
                    'Global total differed from the sum of counted actions', v_performed_by, v_run_id,
                    jsonb_build_object('scope', 'global', 'recent_actions', v_recent))
            RETURNING correction_id INTO v_correction_id;
        END IF;

        IF v_drifted IS NOT NULL THEN
            -- Take the drifted users as writers do (_lock_users: user_id order, a missing row created),
            -- then recompute them in a new snapshot: a writer of one of them either committed before
            -- (and is seen) or waits. Locking only the rows that exist would miss a writer creating a
            -- missing one, whose totals the fix below would then overwrite.
            PERFORM bulk_sync._lock_users(v_drifted);

            WITH truth AS (
                SELECT u.user_id, coalesce(sum(a.emissions_saved_lbs), 0) AS total,
                       count(a.action_id)::integer AS n, max(a.logged_at) AS last_at
                  FROM unnest(v_drifted) AS u(user_id)
                  LEFT JOIN bulk_sync.user_actions AS a
                    ON a.user_id = u.user_id AND a.verified AND NOT a.revoked
                 GROUP BY u.user_id
            ), fixes AS (
                SELECT t.*, s.total_emissions_lbs AS old_total, s.action_count AS old_n, s.last_action_at AS old_last_at
                  FROM truth AS t
                  LEFT JOIN bulk_sync.user_stats AS s ON s.user_id = t.user_id
                 WHERE (t.total, t.n, t.last_at)
                       IS DISTINCT FROM (coalesce(s.total_emissions_lbs, 0), coalesce(s.action_count, 0), s.last_action_at)
            ), applied AS (
                INSERT INTO bulk_sync.user_stats AS s (user_id, total_emissions_lbs, action_count, last_action_at, last_updated)
                SELECT f.user_id, f.total, f.n, f.last_at, now() FROM fixes AS f ORDER BY f.user_id
                    ON CONFLICT (user_id) DO UPDATE
                   SET total_emissions_lbs = excluded.total_emissions_lbs,
                       action_count        = excluded.action_count,
                       last_action_at      = excluded.last_action_at,
                       last_updated        = excluded.last_updated
                RETURNING s.user_id
            ), audited AS (
                INSERT INTO bulk_sync.emissions_corrections
                       (previous_total, corrected_total, discrepancy, reason, performed_by, reconciliation_run_id, metadata)
                SELECT coalesce(f.old_total, 0), f.total, abs(coalesce(f.old_total, 0) - f.total),
                       'User stats differed from the user''s counted actions', v_performed_by, v_run_id,
                       jsonb_build_object('scope', 'user', 'user_id', f.user_id,
                                          'previous_action_count', coalesce(f.old_n, 0), 'corrected_action_count', f.n,
                                          'previous_last_action_at', bulk_sync._iso(f.old_last_at),
                                          'corrected_last_action_at', bulk_sync._iso(f.last_at))
                  FROM fixes AS f
                 ORDER BY f.user_id
                RETURNING correction_id, metadata ->> 'user_id' AS user_id
            )
            SELECT count(*)::integer,
                   coalesce(v_correction_id, (array_agg(a.correction_id ORDER BY a.user_id))[1]),
                   array_agg(a.user_id::uuid ORDER BY a.user_id)
              INTO v_user_fixes, v_correction_id, v_fixed_users
              FROM audited AS a;

            IF v_user_fixes > 0 THEN
                PERFORM bulk_sync._emit_user_events(v_fixed_users, 'reconciled');
            END IF;
        END IF;
        v_fixed := v_correction_id IS NOT NULL;
    END IF;

    v_result := jsonb_build_object(
        'in_sync',           v_in_sync,
        'user_stats_sum',    bulk_sync._amount(v_truth),
        'global_total',      bulk_sync._amount(v_global),
        'discrepancy',       bulk_sync._amount(abs(v_global - v_truth)),
        'fixed',             v_fixed,
        'correction_id',     v_correction_id,
        'users_out_of_sync', v_out_of_sync,
        'run_id',            v_run_id,
        'timestamp',         bulk_sync._iso(v_started_at),
        'performed_by',      v_performed_by,
        'auto_correct',      v_auto_correct);

    INSERT INTO bulk_sync.reconciliation_runs
           (run_id, started_at, finished_at, performed_by, auto_correct, in_sync, fixed, users_out_of_sync, result)
    VALUES (v_run_id, v_started_at, clock_timestamp(), v_performed_by, v_auto_correct, v_in_sync, v_fixed,
            v_out_of_sync, v_result);

    -- The notification carries the recent actions too, as many of the newest as NOTIFY's limit
    -- allows; the correction row (correction_id) always has the whole list.
    PERFORM pg_notify('bulk_sync_ops',
                      bulk_sync._ops_payload(jsonb_build_object('event', 'reconcile') || v_result,
                                             'recent_actions', v_recent));
    RETURN v_result;
END
$$;
COMMENT ON FUNCTION bulk_sync.reconcile(jsonb) IS
    'Checks the global total and every user''s stats against the counted actions; with auto_correct (default) fixes drift and records each fix in emissions_corrections; a global fix lists the 100 counted actions most recently stored (metadata.recent_actions). Notifies bulk_sync_ops. Request: {"performed_by"?, "auto_correct"?}.';
