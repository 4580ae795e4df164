-- _count_inserted_actions: statement-level AFTER INSERT trigger on user_actions.
-- Adds the statement's counted actions to the totals, one aggregated change per user.
CREATE OR REPLACE FUNCTION bulk_sync._count_inserted_actions()
RETURNS trigger
LANGUAGE plpgsql
SET search_path = bulk_sync, pg_catalog, pg_temp
AS $$
DECLARE
    v_user_ids    uuid[];
    v_lbs         numeric[];
    v_counts      integer[];
    v_latest      timestamptz[];
    v_action_ids  uuid[];
    v_one         record;
BEGIN
    -- One counted action (a log_action call): the single-row path, no per-user arrays.
    SELECT n.user_id, n.emissions_saved_lbs, n.logged_at, n.action_id, count(*) OVER () AS counted
      INTO v_one
      FROM new_actions AS n
     WHERE n.verified AND NOT n.revoked
     LIMIT 1;
    IF NOT FOUND THEN
        RETURN NULL;
    ELSIF v_one.counted = 1 THEN
        PERFORM bulk_sync._apply_gain(v_one.user_id, v_one.emissions_saved_lbs, v_one.logged_at, v_one.action_id, 'logged');
        RETURN NULL;
    END IF;

    SELECT array_agg(g.user_id ORDER BY g.user_id),
           array_agg(g.lbs ORDER BY g.user_id),
           array_agg(g.n ORDER BY g.user_id),
           array_agg(g.latest ORDER BY g.user_id),
           array_agg(g.action_id ORDER BY g.user_id)
      INTO v_user_ids, v_lbs, v_counts, v_latest, v_action_ids
      FROM (SELECT n.user_id,
                   sum(n.emissions_saved_lbs) AS lbs,
                   count(*)::integer AS n,
                   max(n.logged_at) AS latest,
                   CASE WHEN count(*) = 1 THEN (array_agg(n.action_id))[1] END AS action_id
              FROM new_actions AS n
             WHERE n.verified AND NOT n.revoked
             GROUP BY n.user_id) AS g;

    IF v_user_ids IS NOT NULL THEN
        PERFORM bulk_sync._apply_deltas(
            v_user_ids, v_lbs, v_counts, v_latest,
            array_fill(false, ARRAY[cardinality(v_user_ids)]),
            v_action_ids,
            array_fill('logged'::text, ARRAY[cardinality(v_user_ids)]));
    END IF;
    RETURN NULL;
END
$$;

CREATE OR REPLACE TRIGGER _100_count_inserted
    AFTER INSERT ON bulk_sync.user_actions
    REFERENCING NEW TABLE AS new_actions
    FOR EACH STATEMENT
    EXECUTE FUNCTION bulk_sync._count_inserted_actions();
