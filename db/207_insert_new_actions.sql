-- _insert_new_actions: stores checked actions that are not stored yet (no action_id twice; their line
-- is not read) in one INSERT, in action_id order so that concurrent loads lock index entries in one
-- order. Returns how many it inserted and the users of the verified ones. Its callers: _stage_apply
-- (a chunk of a load's rows) and bulk_backfill (a batch of valid actions, never staged).
--
-- With p_precount the gains are known before the INSERT, so they are applied first: one _user_delta
-- per user, in user_id order, which locks (or creates) the users in the order every writer takes
-- them. The INSERT then tells the count trigger that they are counted (a row of _precount_claims,
-- which only bulk_sync writes, flagged by bulk_sync.precounted; see _count_inserted_actions), and a
-- new user's row is written once, with its totals, instead of created empty and then updated.
-- Without it the caller holds the users (_lock_users) and the trigger counts the actions.
--
-- An action already stored (or repeated) is a unique_violation for the caller to handle, unless
-- p_skip_stored: then it is skipped (ON CONFLICT DO NOTHING), for a caller that checks it after.
-- Two statements, because ON CONFLICT probes each key before inserting it, which the plain INSERT
-- does not pay.
CREATE OR REPLACE FUNCTION bulk_sync._insert_new_actions(
    p_actions      bulk_sync._checked_action[],
    p_precount     boolean,
    p_skip_stored  boolean DEFAULT false,
    OUT inserted   bigint,
    OUT users      uuid[])
LANGUAGE plpgsql
AS $$
DECLARE
    v_deltas  bulk_sync._user_delta[];
    v_claim   text;
BEGIN
    IF p_precount THEN
        SELECT array_agg((g.user_id, g.lbs, g.n, g.latest, false, g.action_id, 'logged')::bulk_sync._user_delta
                         ORDER BY g.user_id),
               format('%s %s', coalesce(sum(g.n), 0), coalesce(sum(g.lbs), 0))
          INTO v_deltas, v_claim
          FROM (SELECT a.user_id,
                       sum(a.lbs) AS lbs,
                       count(*)::integer AS n,
                       max(a.logged_at) AS latest,
                       CASE WHEN count(*) = 1 THEN (array_agg(a.action_id))[1] END AS action_id
                  FROM unnest(p_actions) AS a
                 WHERE a.verified
                 GROUP BY a.user_id) AS g;
        IF v_deltas IS NOT NULL THEN
            PERFORM bulk_sync._apply_deltas(v_deltas);
            INSERT INTO bulk_sync._precount_claims (xid, claim) VALUES (pg_current_xact_id(), v_claim);
            PERFORM set_config('bulk_sync.precounted', 'on', true);
        END IF;
    END IF;

    IF p_skip_stored THEN
        WITH stored AS (
            INSERT INTO bulk_sync.user_actions AS s
                   (action_id, user_id, emissions_saved_lbs, verified, logged_at, metadata, verified_at)
            SELECT a.action_id, a.user_id, a.lbs, a.verified, a.logged_at, a.metadata, CASE WHEN a.verified THEN now() END
              FROM unnest(p_actions) AS a
             ORDER BY a.action_id
                ON CONFLICT (action_id) DO NOTHING
            RETURNING s.user_id, s.verified
        )
        SELECT count(*), coalesce(array_agg(s.user_id) FILTER (WHERE s.verified), '{}') INTO inserted, users
          FROM stored AS s;
    ELSE
        WITH stored AS (
            INSERT INTO bulk_sync.user_actions AS s
                   (action_id, user_id, emissions_saved_lbs, verified, logged_at, metadata, verified_at)
            SELECT a.action_id, a.user_id, a.lbs, a.verified, a.logged_at, a.metadata, CASE WHEN a.verified THEN now() END
              FROM unnest(p_actions) AS a
             ORDER BY a.action_id
            RETURNING s.user_id, s.verified
        )
        SELECT count(*), coalesce(array_agg(s.user_id) FILTER (WHERE s.verified), '{}') INTO inserted, users
          FROM stored AS s;
    END IF;
END
$$;
COMMENT ON FUNCTION bulk_sync._insert_new_actions(bulk_sync._checked_action[], boolean, boolean) IS
    'Internal to bulk loads: stores checked new actions in one INSERT, their gains applied first with p_precount (claimed for the count trigger), a concurrently stored one skipped with p_skip_stored, else a unique_violation. Returns (inserted, users of the verified ones).';
