-- _apply_deltas: applies per-user changes of the counted set to user_stats, one global slot and the event
-- outbox, in the caller's transaction. With its one-row twin _apply_gain, the only code that moves totals.
CREATE OR REPLACE FUNCTION bulk_sync._apply_deltas(
    p_user_ids    uuid[],
    p_lbs         numeric[],
    p_counts      integer[],
    p_latest      timestamptz[],
    p_removed     boolean[],
    p_action_ids  uuid[],
    p_kinds       text[])
RETURNS void
LANGUAGE plpgsql
-- Its statements take array parameters, for which PL/pgSQL keeps choosing custom plans and so
-- re-plans the big statement below on every call; the generic plan is as good and saves ~0.4 ms.
SET plan_cache_mode = force_generic_plan
AS $$
DECLARE
    v_delta     numeric;
    v_removed   uuid[];
    v_slots     bigint;
    v_global    numeric;
BEGIN
    SELECT coalesce(sum(d.lbs), 0), array_agg(d.user_id ORDER BY d.user_id) FILTER (WHERE d.removed)
      INTO v_delta, v_removed
      FROM unnest(p_lbs, p_removed, p_user_ids) AS d(lbs, removed, user_id);

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
          FROM unnest(p_user_ids, p_lbs, p_counts, p_removed) AS d(user_id, lbs, n, removed)
         WHERE d.removed AND s.user_id = d.user_id;
    END IF;

    -- The slots are read before the statement below moves one of them, hence "+ v_delta".
    v_global := bulk_sync._current_global_total() + v_delta;

    -- Everything else in one statement: users who only gained counted actions (the row is created
    -- on a user's first action), the writer's global slot, and one outbox event per user.
    WITH d AS (
        SELECT * FROM unnest(p_user_ids, p_lbs, p_counts, p_latest, p_removed, p_action_ids, p_kinds)
                   AS d(user_id, lbs, n, latest, removed, action_id, kind)
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
         WHERE g.slot = pg_backend_pid() % 64 AND v_delta <> 0
        RETURNING g.slot
    ), events AS (
        INSERT INTO bulk_sync._event_outbox (payload)
        SELECT bulk_sync._event_payload(d.kind, d.user_id, d.action_id, t.total_emissions_lbs, t.action_count, v_global)
          FROM d JOIN totals AS t ON t.user_id = d.user_id
         ORDER BY d.user_id
    )
    SELECT count(*) INTO v_slots FROM slot;

    IF v_delta <> 0 AND v_slots = 0 THEN
        RAISE EXCEPTION 'global slot % is missing', pg_backend_pid() % 64
            USING ERRCODE = 'P0002', HINT = 'Restore the rows of bulk_sync._global_slots, then run SELECT bulk_sync.reconcile().';
    END IF;
END
$$;
