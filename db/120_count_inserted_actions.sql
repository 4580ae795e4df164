-- _count_inserted_actions: statement-level AFTER INSERT trigger on user_actions.
-- Adds the statement's counted actions to the totals, one aggregated change per user.
CREATE OR REPLACE FUNCTION bulk_sync._count_inserted_actions()
RETURNS trigger
LANGUAGE plpgsql
SET search_path = bulk_sync, pg_catalog, pg_temp
AS $$
DECLARE
    v_first   record;
    v_deltas  bulk_sync._user_delta[];
    v_claim   text;
    v_found   text;
BEGIN
    -- A bulk load applies its gains itself before its INSERT and claims them in _precount_claims: how
    -- many counted actions it inserts and their sum (see _insert_new_actions). The setting
    -- bulk_sync.precounted only says that there is a claim to look for, so the statements of log_action
    -- never read the table; any session may set it, and alone it claims nothing. The claim is used up here, and must match
    -- what was inserted, so it never covers any other statement.
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

    -- The first counted action and how many there are: a single one (every log_action that counts)
    -- is its user's whole change, with nothing to group (grouping costs it ~8% of its time).
    SELECT n.user_id, n.emissions_saved_lbs, n.logged_at, n.action_id, count(*) OVER () AS counted
      INTO v_first
      FROM new_actions AS n
     WHERE n.verified AND NOT n.revoked
     LIMIT 1;
    IF NOT FOUND THEN
        RETURN NULL;
    ELSIF v_first.counted = 1 THEN
        v_deltas := ARRAY[(v_first.user_id, v_first.emissions_saved_lbs, 1, v_first.logged_at, false,
                           v_first.action_id, 'logged')::bulk_sync._user_delta];
    ELSE
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
    END IF;

    PERFORM bulk_sync._apply_deltas(v_deltas);
    RETURN NULL;
END
$$;

CREATE OR REPLACE TRIGGER _100_count_inserted
    AFTER INSERT ON bulk_sync.user_actions
    REFERENCING NEW TABLE AS new_actions
    FOR EACH STATEMENT
    EXECUTE FUNCTION bulk_sync._count_inserted_actions();
