-- _count_deleted_actions: statement-level AFTER DELETE trigger on user_actions.
-- The API never deletes actions; this keeps the totals exact when a DBA does.
CREATE OR REPLACE FUNCTION bulk_sync._count_deleted_actions()
RETURNS trigger
LANGUAGE plpgsql
SET search_path = bulk_sync, pg_catalog, pg_temp
AS $$
DECLARE
    v_deltas  bulk_sync._user_delta[];
BEGIN
    SELECT array_agg((g.user_id, g.lbs, g.n, NULL, true, g.action_id, 'deleted')::bulk_sync._user_delta
                     ORDER BY g.user_id)
      INTO v_deltas
      FROM (SELECT o.user_id,
                   -sum(o.emissions_saved_lbs) AS lbs,
                   -count(*)::integer AS n,
                   CASE WHEN count(*) = 1 THEN (array_agg(o.action_id))[1] END AS action_id
              FROM old_actions AS o
             WHERE o.verified AND NOT o.revoked
             GROUP BY o.user_id) AS g;

    IF v_deltas IS NOT NULL THEN
        PERFORM bulk_sync._apply_deltas(v_deltas);
    END IF;
    RETURN NULL;
END
$$;

CREATE OR REPLACE TRIGGER _100_count_deleted
    AFTER DELETE ON bulk_sync.user_actions
    REFERENCING OLD TABLE AS old_actions
    FOR EACH STATEMENT
    EXECUTE FUNCTION bulk_sync._count_deleted_actions();
