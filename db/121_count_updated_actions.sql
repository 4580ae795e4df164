-- _count_updated_actions: statement-level AFTER UPDATE trigger on user_actions.
-- Moves the totals for every action whose counted state or facts changed (verify, revoke, or a
-- DBA's correction), one aggregated change per user; other updates (metadata) change nothing.
CREATE OR REPLACE FUNCTION bulk_sync._count_updated_actions()
RETURNS trigger
LANGUAGE plpgsql
SET search_path = bulk_sync, pg_catalog, pg_temp
AS $$
DECLARE
    v_deltas  bulk_sync._user_delta[];
BEGIN
    WITH changed AS (
        SELECT o.action_id AS old_id, n.action_id AS new_id,
               o.user_id AS old_user, n.user_id AS new_user,
               CASE WHEN o.verified AND NOT o.revoked THEN o.emissions_saved_lbs END AS old_lbs,
               CASE WHEN n.verified AND NOT n.revoked THEN n.emissions_saved_lbs END AS new_lbs,
               o.logged_at AS old_at, n.logged_at AS new_at
          FROM old_actions AS o
          FULL JOIN new_actions AS n ON n.action_id = o.action_id
    ), moves AS (
        -- an action leaving the counted set, or counted with facts that changed
        SELECT c.old_user AS user_id, -c.old_lbs AS lbs, -1 AS n, NULL::timestamptz AS latest,
               true AS removed, coalesce(c.old_id, c.new_id) AS action_id
          FROM changed AS c
         WHERE c.old_lbs IS NOT NULL
           AND (c.new_lbs IS NULL OR (c.old_user, c.old_lbs, c.old_at) IS DISTINCT FROM (c.new_user, c.new_lbs, c.new_at)
                OR c.new_id IS DISTINCT FROM c.old_id)
        UNION ALL
        -- an action entering the counted set, or counted with facts that changed
        SELECT c.new_user, c.new_lbs, 1, c.new_at, false, coalesce(c.new_id, c.old_id)
          FROM changed AS c
         WHERE c.new_lbs IS NOT NULL
           AND (c.old_lbs IS NULL OR (c.old_user, c.old_lbs, c.old_at) IS DISTINCT FROM (c.new_user, c.new_lbs, c.new_at)
                OR c.new_id IS DISTINCT FROM c.old_id)
    ), per_user AS (
        SELECT m.user_id,
               sum(m.lbs) AS lbs,
               sum(m.n)::integer AS n,
               max(m.latest) AS latest,
               bool_or(m.removed) AS removed,
               CASE WHEN count(DISTINCT m.action_id) = 1 THEN (array_agg(m.action_id))[1] END AS action_id,
               CASE WHEN bool_and(m.removed) THEN 'revoked'
                    WHEN NOT bool_or(m.removed) THEN 'verified'
                    ELSE 'changed' END AS kind
          FROM moves AS m
         GROUP BY m.user_id
    )
    SELECT array_agg((p.user_id, p.lbs, p.n, p.latest, p.removed, p.action_id, p.kind)::bulk_sync._user_delta
                     ORDER BY p.user_id)
      INTO v_deltas
      FROM per_user AS p;

    IF v_deltas IS NOT NULL THEN
        PERFORM bulk_sync._apply_deltas(v_deltas);
    END IF;
    RETURN NULL;
END
$$;

CREATE OR REPLACE TRIGGER _100_count_updated
    AFTER UPDATE ON bulk_sync.user_actions
    REFERENCING OLD TABLE AS old_actions NEW TABLE AS new_actions
    FOR EACH STATEMENT
    EXECUTE FUNCTION bulk_sync._count_updated_actions();
