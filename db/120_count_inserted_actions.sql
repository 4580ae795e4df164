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
BEGIN
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
