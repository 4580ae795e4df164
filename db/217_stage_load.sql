-- _stage_load: once every part of load p_load is checked (_stage_check), finds BS002 among its rows and
-- against stored actions and, when there is no problem, cuts the load into chunks for _stage_apply.
CREATE OR REPLACE FUNCTION bulk_sync._stage_load(
    p_load          uuid,
    p_chunk_rows    integer DEFAULT NULL,
    p_max_problems  integer DEFAULT 100,
    p_problems      jsonb DEFAULT '[]')
RETURNS jsonb
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = bulk_sync, pg_catalog, pg_temp
AS $$
DECLARE
    v_problems  jsonb;
    v_rows      bigint;
    v_repeated  uuid[];
    v_bounds    uuid[];
    v_gain      numeric;
BEGIN
    PERFORM bulk_sync._load_held(p_load);
    IF p_chunk_rows < 1 OR p_max_problems IS NULL OR p_max_problems < 1 OR jsonb_typeof(p_problems) IS DISTINCT FROM 'array' THEN
        RAISE EXCEPTION '_stage_load: p_chunk_rows and p_max_problems must be positive, p_problems an array'
            USING ERRCODE = 'BS001',
                  DETAIL = format('p_chunk_rows: %s, p_max_problems: %s, p_problems: %s', p_chunk_rows, p_max_problems,
                                  left(p_problems::text, 200));
    END IF;
    SELECT count(*) INTO v_rows FROM bulk_sync._load_rows AS l WHERE l.load = p_load;

    -- BS002: an action_id seen twice with other facts (against its first row), or other facts than stored.
    -- Then the problems the parts' checks found (p_problems, BS001) and these, in line order: every problem
    -- of the first p_max_problems bad rows.
    SELECT array_agg(r.action_id) INTO v_repeated
      FROM (SELECT l.action_id FROM bulk_sync._load_rows AS l WHERE l.load = p_load GROUP BY l.action_id HAVING count(*) > 1) AS r;
    WITH versions AS (
        SELECT l.*, first_value(l.line) OVER w AS first_line, first_value(l.user_id) OVER w AS first_user_id,
               first_value(l.lbs) OVER w AS first_lbs, first_value(l.logged_at) OVER w AS first_logged_at
          FROM bulk_sync._load_rows AS l
         WHERE l.load = p_load AND l.action_id = ANY (v_repeated)
        WINDOW w AS (PARTITION BY l.action_id ORDER BY l.line)
    ), conflicts AS (
        SELECT v.line, 'BS002' AS code,
               bulk_sync._differing_facts(v.first_user_id, v.first_lbs, v.first_logged_at, v.user_id, v.lbs, v.logged_at) AS field,
               'differs from an earlier row with the same action_id' AS reason,
               bulk_sync._facts_detail(v.first_user_id, v.first_lbs, v.first_logged_at, v.user_id, v.lbs, v.logged_at) AS value,
               v.action_id::text AS action_id, v.first_line
          FROM versions AS v
         WHERE bulk_sync._differing_facts(v.first_user_id, v.first_lbs, v.first_logged_at, v.user_id, v.lbs, v.logged_at) IS NOT NULL
        UNION ALL
        SELECT l.line, 'BS002',
               bulk_sync._differing_facts(a.user_id, a.emissions_saved_lbs, a.logged_at, l.user_id, l.lbs, l.logged_at),
               'differs from the stored action with this action_id',
               bulk_sync._facts_detail(a.user_id, a.emissions_saved_lbs, a.logged_at, l.user_id, l.lbs, l.logged_at),
               l.action_id::text, NULL::bigint
          FROM bulk_sync._load_rows AS l
         CROSS JOIN LATERAL (SELECT x.user_id, x.emissions_saved_lbs, x.logged_at
                               FROM bulk_sync.user_actions AS x
                              WHERE x.action_id = l.action_id
                              LIMIT 1) AS a
         WHERE l.load = p_load AND l.conflicts  -- found by _stage_check's probe; read again to show both versions
    )
    SELECT coalesce(jsonb_agg(p ORDER BY p.line, p.code, p.field), '[]') INTO v_problems
      FROM (SELECT x.line, x.code, x.field, x.reason, x.value, x.action_id, x.first_line
              FROM (SELECT y.*, dense_rank() OVER (ORDER BY y.line) AS nth
                      FROM (SELECT (e ->> 'line')::bigint AS line, e ->> 'code' AS code, e ->> 'field' AS field,
                                   e ->> 'reason' AS reason, e ->> 'value' AS value, e ->> 'action_id' AS action_id,
                                   NULL::bigint AS first_line
                              FROM jsonb_array_elements(p_problems) AS e
                            UNION ALL
                            SELECT * FROM conflicts) AS y) AS x
             WHERE x.nth <= p_max_problems) AS p;

    IF v_problems <> '[]' THEN
        RETURN jsonb_build_object('rows', v_rows, 'problems', v_problems, 'chunks', '[]'::jsonb,
                                  'global_total_lbs', bulk_sync._amount(bulk_sync._current_global_total()));
    END IF;

    -- An action_id repeated with the same facts is one action: keep its first row, verified if any of
    -- its rows is, standing for all of them.
    IF v_repeated IS NOT NULL THEN
        WITH repeated AS (
            SELECT l.action_id, min(l.line) AS keep, count(*) AS copies, bool_or(l.verified) AS verified
              FROM bulk_sync._load_rows AS l
             WHERE l.load = p_load AND l.action_id = ANY (v_repeated)
             GROUP BY l.action_id
        ), kept AS (
            UPDATE bulk_sync._load_rows AS l
               SET copies = r.copies, verified = r.verified
              FROM repeated AS r
             WHERE l.load = p_load AND l.action_id = r.action_id AND l.line = r.keep
        )
        DELETE FROM bulk_sync._load_rows AS l
         USING repeated AS r
         WHERE l.load = p_load AND l.action_id = r.action_id AND l.line <> r.keep;
    END IF;

    -- Chunks of whole users, in user_id order, of about p_chunk_rows rows each (NULL: one chunk).
    -- Chunk i covers chunks[i] <= user_id < chunks[i + 1]; the last one has no upper bound.
    IF p_chunk_rows IS NOT NULL THEN
        -- Chunks commit one by one, so a total the load would take past NUMERIC(30,6) must fail it
        -- here, before anything is applied. Totals are never negative, so the global total bounds
        -- every user's: checking it with the load's gain (the counted amounts it adds) is enough.
        WITH u AS MATERIALIZED (
            SELECT l.user_id, count(*) AS n,
                   coalesce(sum(l.lbs) FILTER (WHERE l.verified AND (NOT l.known OR l.pending)), 0) AS gain
              FROM bulk_sync._load_rows AS l
             WHERE l.load = p_load
             GROUP BY l.user_id
        ), c AS (
            SELECT g.user_id, g.chunk, lag(g.chunk) OVER (ORDER BY g.user_id) AS previous
              FROM (SELECT u.user_id, ((sum(u.n) OVER (ORDER BY u.user_id))::bigint - u.n) / p_chunk_rows AS chunk
                      FROM u) AS g
        )
        SELECT (SELECT array_agg(c.user_id ORDER BY c.user_id) FROM c WHERE c.previous IS DISTINCT FROM c.chunk),
               (SELECT sum(u.gain) FROM u)
          INTO v_bounds, v_gain;

        IF bulk_sync._current_global_total() + v_gain >= 1e24 THEN
            RAISE EXCEPTION 'the load would take the global total past NUMERIC(30,6); nothing was applied'
                USING ERRCODE = '22003',
                      DETAIL = format('global total %s, the load adds %s', bulk_sync._current_global_total(), v_gain);
        END IF;
    END IF;
    RETURN jsonb_build_object('rows', v_rows, 'problems', v_problems, 'chunks', to_jsonb(coalesce(v_bounds, '{}')),
                              'global_total_lbs', bulk_sync._amount(bulk_sync._current_global_total()));
END
$$;
COMMENT ON FUNCTION bulk_sync._stage_load(uuid, integer, integer, jsonb) IS
    'Internal to bulk loads: finds BS002 among the checked rows of load p_load (within the load and against stored actions) and, with no problem there or in p_problems (its parts'' BS001), cuts it into chunks for _stage_apply. Returns {"rows", "problems": [{line, code, field, reason, value, action_id, first_line}], "chunks": [user_id bounds], "global_total_lbs"}; first_line is the earlier row a BS002 within the stage differs from.';
