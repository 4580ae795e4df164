-- _apply_deltas: applies changes of the counted set to user_stats, one global slot (_take_slot) and
-- the event outbox (one row per call), in the caller's transaction: one _user_delta per user, in
-- user_id order. The only code that moves totals. Its callers: the three count triggers (db/120-122),
-- _insert_new_actions, which applies a bulk load's gains before inserting its actions, and log_action,
-- which applies its one action's gain after inserting it (the insert trigger skips that statement).
-- Returns the global total its event carries and, for one delta, that user's new total.

-- Earlier releases returned void, and CREATE OR REPLACE cannot change a return type.
DO $$
BEGIN
    IF to_regprocedure('bulk_sync._apply_deltas(bulk_sync._user_delta[])') IS NOT NULL
       AND (SELECT p.prorettype FROM pg_catalog.pg_proc AS p
             WHERE p.oid = to_regprocedure('bulk_sync._apply_deltas(bulk_sync._user_delta[])')) = 'pg_catalog.void'::regtype THEN
        DROP FUNCTION bulk_sync._apply_deltas(bulk_sync._user_delta[]);
    END IF;
END
$$;

CREATE OR REPLACE FUNCTION bulk_sync._apply_deltas(
    p_deltas          bulk_sync._user_delta[],
    OUT global_total  numeric,
    OUT user_total    numeric)
LANGUAGE plpgsql
AS $$
DECLARE
    v_one        bulk_sync._user_delta := p_deltas[1];
    v_total      numeric;
    v_count      integer;
    v_delta      numeric;
    v_removed    uuid[];
    v_slots      bigint;
    v_plan_mode  text;
    v_slot       integer;
BEGIN
    -- One user gaining (every log_action that counts): the same writes as below, as three one-row
    -- statements with scalar parameters, which at 32 clients run faster than the set statement.
    IF cardinality(p_deltas) = 1 AND NOT v_one.removed THEN
        INSERT INTO bulk_sync.user_stats AS s (user_id, total_emissions_lbs, action_count, last_action_at, last_updated)
        VALUES (v_one.user_id, v_one.lbs, v_one.n, v_one.latest, now())
            ON CONFLICT (user_id) DO UPDATE
           SET total_emissions_lbs = s.total_emissions_lbs + excluded.total_emissions_lbs,
               action_count        = s.action_count + excluded.action_count,
               last_action_at      = greatest(s.last_action_at, excluded.last_action_at),
               last_updated        = excluded.last_updated
        RETURNING s.total_emissions_lbs, s.action_count INTO v_total, v_count;

        IF v_one.lbs <> 0 THEN
            -- _take_slot's first try, inline: calling it costs this path about 5 %.
            v_slot := pg_backend_pid() % 64;
            IF NOT pg_try_advisory_xact_lock(1651862635, 100 + v_slot) THEN
                v_slot := bulk_sync._take_slot();
            END IF;
            UPDATE bulk_sync._global_slots AS g
               SET total_lbs = g.total_lbs + v_one.lbs, last_updated = now()
             WHERE g.slot = v_slot;
            IF NOT FOUND THEN
                RAISE EXCEPTION 'global slot % is missing', v_slot
                    USING ERRCODE = 'P0002', HINT = 'Restore the rows of bulk_sync._global_slots, then run SELECT bulk_sync.reconcile().';
            END IF;
        END IF;

        -- Read after the slot moved above, so the event carries the total after the change.
        global_total := bulk_sync._current_global_total();
        user_total := v_total;
        INSERT INTO bulk_sync._event_outbox (events, event_count, global_total)
        VALUES (ARRAY[(v_one.kind, v_one.user_id, v_one.action_id, v_total, v_count)::bulk_sync._user_event], 1,
                _apply_deltas.global_total);
        RETURN;
    END IF;

    -- The statements below take the array as a parameter, for which the plan cache keeps choosing
    -- custom plans and so re-plans the big statement on every call; the generic plan is as good and
    -- saves ~0.4 ms. Forced for these statements only: as a SET clause of the function it would cost
    -- every one-user call above too. An error undoes it with the (sub)transaction that fails.
    v_plan_mode := current_setting('plan_cache_mode');
    PERFORM set_config('plan_cache_mode', 'force_generic_plan', true);

    SELECT coalesce(sum(d.lbs), 0), array_agg(d.user_id ORDER BY d.user_id) FILTER (WHERE d.removed)
      INTO v_delta, v_removed
      FROM unnest(p_deltas) AS d;

    -- A user who lost a counted action already has a row (a CHECK would reject a negative insert):
    -- lock those rows first, in user_id order, so that the UPDATE below takes its snapshot after
    -- every concurrent change to them committed and recomputes last_action_at from the actions.
    IF v_removed IS NOT NULL THEN
        PERFORM FROM bulk_sync.user_stats AS s
          WHERE s.user_id = ANY (v_removed)
          ORDER BY s.user_id
            FOR UPDATE;

        UPDATE bulk_sync.user_stats AS s
           SET total_emissions_lbs = s.total_emissions_lbs + d.lbs,
               action_count        = s.action_count + d.n,
               last_action_at      = (SELECT max(a.logged_at)
                                        FROM bulk_sync.user_actions AS a
                                       WHERE a.user_id = s.user_id AND a.verified AND NOT a.revoked),
               last_updated        = now()
          FROM unnest(p_deltas) AS d
         WHERE d.removed AND s.user_id = d.user_id;
    END IF;

    -- The slots are read before the statement below moves one of them, hence "+ v_delta".
    global_total := bulk_sync._current_global_total() + v_delta;
    IF v_delta <> 0 THEN
        v_slot := bulk_sync._take_slot();
    END IF;

    -- Everything else in one statement: users who only gained counted actions (the row is created
    -- on a user's first action), the writer's global slot, and one event per user, all in one
    -- outbox row (publish_events renders them).
    WITH d AS (
        SELECT * FROM unnest(p_deltas)
    ), gained AS (
        INSERT INTO bulk_sync.user_stats AS s (user_id, total_emissions_lbs, action_count, last_action_at, last_updated)
        SELECT d.user_id, d.lbs, d.n, d.latest, now() FROM d WHERE NOT d.removed ORDER BY d.user_id
            ON CONFLICT (user_id) DO UPDATE
           SET total_emissions_lbs = s.total_emissions_lbs + excluded.total_emissions_lbs,
               action_count        = s.action_count + excluded.action_count,
               last_action_at      = greatest(s.last_action_at, excluded.last_action_at),
               last_updated        = excluded.last_updated
        RETURNING s.user_id, s.total_emissions_lbs, s.action_count
    ), totals AS (
        SELECT g.user_id, g.total_emissions_lbs, g.action_count FROM gained AS g
        UNION ALL
        SELECT s.user_id, s.total_emissions_lbs, s.action_count
          FROM bulk_sync.user_stats AS s WHERE s.user_id = ANY (v_removed)
    ), slot AS (
        UPDATE bulk_sync._global_slots AS g
           SET total_lbs = g.total_lbs + v_delta, last_updated = now()
         WHERE g.slot = v_slot
        RETURNING g.slot
    ), events AS (
        INSERT INTO bulk_sync._event_outbox (events, event_count, global_total)
        SELECT array_agg((d.kind, d.user_id, d.action_id, t.total_emissions_lbs, t.action_count)::bulk_sync._user_event
                         ORDER BY d.user_id),
               count(*),
               _apply_deltas.global_total
          FROM d JOIN totals AS t ON t.user_id = d.user_id
        HAVING count(*) > 0
    )
    SELECT count(*) INTO v_slots FROM slot;
    PERFORM set_config('plan_cache_mode', v_plan_mode, true);

    IF v_delta <> 0 AND v_slots = 0 THEN
        RAISE EXCEPTION 'global slot % is missing', v_slot
            USING ERRCODE = 'P0002', HINT = 'Restore the rows of bulk_sync._global_slots, then run SELECT bulk_sync.reconcile().';
    END IF;
END
$$;
