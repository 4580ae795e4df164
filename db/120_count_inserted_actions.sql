-- _count_inserted_actions: statement-level AFTER INSERT trigger on user_actions.
-- Adds the statement's counted actions to the totals, one aggregated change per user.
--
-- Not fired for log_action's INSERT of its one action: log_action applies that gain itself, right after
-- (with _apply_deltas, which hands it the totals for its response), and marks the statement with the
-- setting bulk_sync.counted_by_caller, set just before it and cleared just after. Set by hand, it does
-- what ALTER TABLE ... DISABLE TRIGGER does, which anyone allowed to INSERT into user_actions (only its
-- owner is) can do anyway; reconcile() finds and fixes what such a statement leaves uncounted.
CREATE OR REPLACE FUNCTION bulk_sync._count_inserted_actions()
RETURNS trigger
LANGUAGE plpgsql
SET search_path = bulk_sync, pg_catalog, pg_temp
AS $$
DECLARE
    v_deltas  bulk_sync._user_delta[];
    v_claim   text;
    v_found   text;
BEGIN
    -- A bulk load applies its gains itself before its INSERT and claims them in _precount_claims: how
    -- many counted actions it inserts and their sum (see _insert_new_actions). The setting
    -- bulk_sync.precounted only says that there is a claim to look for, so that other statements never
    -- read the table; any session may set it, and alone it claims nothing. The claim is used up here,
    -- and must match what was inserted, so it never covers any other statement.
    IF current_setting('bulk_sync.precounted', true) <> '' THEN
        PERFORM set_config('bulk_sync.precounted', '', true);
        DELETE FROM bulk_sync._precount_claims AS c WHERE c.xid = pg_current_xact_id() RETURNING c.claim INTO v_claim;
        IF FOUND THEN
            SELECT format('%s %s', count(*), coalesce(sum(n.emissions_saved_lbs), 0)) INTO v_found
              FROM new_actions AS n
             WHERE n.verified AND NOT n.revoked;
            IF v_found <> v_claim THEN
                RAISE EXCEPTION 'counted actions (%) differ from those already applied (%)', v_found, v_claim
                    USING ERRCODE = 'XX000';
            END IF;
            RETURN NULL;
        END IF;
    END IF;

    SELECT array_agg((g.user_id, g.lbs, g.n, g.latest, false, g.action_id, 'logged')::bulk_sync._user_delta
                     ORDER BY g.user_id)
      INTO v_deltas
      FROM (SELECT n.user_id,
                   sum(n.emissions_saved_lbs) AS lbs,
                   count(*)::integer AS n,
                   max(n.logged_at) AS latest,
                   CASE WHEN count(*) = 1 THEN (array_agg(n.action_id))[1] END AS action_id
              FROM new_actions AS n
             WHERE n.verified AND NOT n.revoked
             GROUP BY n.user_id) AS g;
    IF v_deltas IS NULL THEN
        RETURN NULL;
    END IF;

    PERFORM bulk_sync._apply_deltas(v_deltas);
    RETURN NULL;
END
$$;

CREATE OR REPLACE TRIGGER _100_count_inserted
    AFTER INSERT ON bulk_sync.user_actions
    REFERENCING NEW TABLE AS new_actions
    FOR EACH STATEMENT
    WHEN (current_setting('bulk_sync.counted_by_caller', true) IS DISTINCT FROM 'on')
    EXECUTE FUNCTION bulk_sync._count_inserted_actions();
