-- _stage_load: checks every staged action at once and, when all are valid, keeps them typed for
-- _stage_apply. Set-based: one pass for the BS001 rules, one to type the rows, BS002 in two joins.
CREATE OR REPLACE FUNCTION bulk_sync._stage_load(
    p_chunk_rows    integer DEFAULT NULL,
    p_max_problems  integer DEFAULT 100)
RETURNS jsonb
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = bulk_sync, pg_catalog, pg_temp
-- Compiling the rules' expressions costs more than it saves on a stage of any size measured.
SET jit = off
AS $$
DECLARE
    v_invalid   jsonb;
    v_problems  jsonb;
    v_rows      bigint;
    v_repeated  uuid[];
    v_bounds    uuid[];
BEGIN
    PERFORM bulk_sync._stage_guard();
    IF p_chunk_rows < 1 OR p_max_problems IS NULL OR p_max_problems < 1 THEN
        RAISE EXCEPTION '_stage_load: p_chunk_rows and p_max_problems must be positive'
            USING ERRCODE = 'BS001', DETAIL = format('p_chunk_rows: %s, p_max_problems: %s', p_chunk_rows, p_max_problems);
    END IF;

    -- 1. Every rule of _action_problems on every row: the first p_max_problems (line, field, reason).
    SELECT coalesce(jsonb_agg(p ORDER BY p.line, p.field), '[]') INTO v_invalid
      FROM (SELECT s.line, 'BS001' AS code, r.field, r.reason, r.value,
                   coalesce(s.action_id, CASE WHEN jsonb_typeof(s.doc) = 'object' THEN s.doc ->> 'action_id' END) AS action_id
              FROM pg_temp.bulk_sync_stage AS s
             CROSS JOIN LATERAL bulk_sync._action_problems(s.doc, s.action_id, s.user_id, s.lbs, s.logged_at,
                                                           s.verified, s.metadata) AS r
             ORDER BY s.line, r.field
             LIMIT p_max_problems) AS p;

    -- 2. The valid rows, typed (a blank line, all NULL, is no row), each marked known when its action_id
    -- is stored, pending when it is stored unverified, and conflicting when the stored facts differ: one
    -- primary-key probe per row (LATERAL ... LIMIT 1), so the cost follows the load and
    -- never the ledger (a join may be planned as a scan of all of user_actions). With invalid rows
    -- present the rules are asked again to leave them out, so that step 3 can still report conflicts
    -- among the others.
    TRUNCATE pg_temp.bulk_sync_load;
    IF to_regclass('pg_temp.bulk_sync_load_user') IS NOT NULL THEN
        DROP INDEX pg_temp.bulk_sync_load_user;  -- built again below when the load is chunked
    END IF;
    INSERT INTO pg_temp.bulk_sync_load
           (line, action_id, user_id, lbs, logged_at, verified, metadata, known, pending, conflicts)
    SELECT v.line, v.action_id, v.user_id, v.lbs, v.logged_at, v.verified, v.metadata, k.pending IS NOT NULL,
           coalesce(k.pending, false), coalesce(k.conflicts, false)
      FROM (SELECT s.line, t.*
              FROM pg_temp.bulk_sync_stage AS s
             CROSS JOIN LATERAL bulk_sync._action_values(s.doc, s.action_id, s.user_id, s.lbs, s.logged_at,
                                                         s.verified, s.metadata) AS t
             WHERE (s.doc, s.action_id, s.user_id, s.lbs, s.logged_at, s.verified, s.metadata) IS DISTINCT FROM
                   (NULL::jsonb, NULL::text, NULL::text, NULL::text, NULL::text, NULL::text, NULL::text)
               AND (v_invalid = '[]' OR NOT EXISTS (SELECT FROM bulk_sync._action_problems(s.doc, s.action_id,
                                                    s.user_id, s.lbs, s.logged_at, s.verified, s.metadata)))) AS v
      LEFT JOIN LATERAL (SELECT NOT a.verified AND NOT a.revoked AS pending,
                                (a.user_id, a.emissions_saved_lbs, a.logged_at)
                                IS DISTINCT FROM (v.user_id, v.lbs, v.logged_at) AS conflicts
                           FROM bulk_sync.user_actions AS a
                          WHERE a.action_id = v.action_id LIMIT 1) AS k ON true
     ORDER BY v.user_id;  -- so that a chunk's rows lie together: each chunk reads a few pages, not all
    GET DIAGNOSTICS v_rows = ROW_COUNT;

    -- 3. BS002: an action_id seen twice with other facts (against its first row), or other facts than stored.
    SELECT array_agg(r.action_id) INTO v_repeated
      FROM (SELECT l.action_id FROM pg_temp.bulk_sync_load AS l GROUP BY l.action_id HAVING count(*) > 1) AS r;
    WITH versions AS (
        SELECT l.*, first_value(l.line) OVER w AS first_line, first_value(l.user_id) OVER w AS first_user_id,
               first_value(l.lbs) OVER w AS first_lbs, first_value(l.logged_at) OVER w AS first_logged_at
          FROM pg_temp.bulk_sync_load AS l
         WHERE l.action_id = ANY (v_repeated)
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
          FROM pg_temp.bulk_sync_load AS l
         CROSS JOIN LATERAL (SELECT x.user_id, x.emissions_saved_lbs, x.logged_at
                               FROM bulk_sync.user_actions AS x
                              WHERE x.action_id = l.action_id
                              LIMIT 1) AS a
         WHERE l.conflicts  -- found by the probe in step 2; read again only to show both versions
    )
    SELECT coalesce(jsonb_agg(p ORDER BY p.line, p.code, p.field), '[]') INTO v_problems
      FROM (SELECT * FROM (SELECT (e ->> 'line')::bigint AS line, e ->> 'code' AS code, e ->> 'field' AS field,
                                  e ->> 'reason' AS reason, e ->> 'value' AS value, e ->> 'action_id' AS action_id,
                                  NULL::bigint AS first_line
                             FROM jsonb_array_elements(v_invalid) AS e
                           UNION ALL
                           SELECT * FROM conflicts) AS x
             ORDER BY x.line, x.code, x.field
             LIMIT p_max_problems) AS p;

    IF v_problems <> '[]' THEN
        TRUNCATE pg_temp.bulk_sync_load;
        RETURN jsonb_build_object('rows', v_rows, 'problems', v_problems, 'chunks', '[]'::jsonb,
                                  'global_total_lbs', bulk_sync._amount(bulk_sync._current_global_total()));
    END IF;

    -- An action_id repeated with the same facts is one action: keep its first row, verified if any of
    -- its rows is, standing for all of them.
    IF v_repeated IS NOT NULL THEN
        WITH repeated AS (
            SELECT l.action_id, min(l.line) AS keep, count(*)::integer AS copies, bool_or(l.verified) AS verified
              FROM pg_temp.bulk_sync_load AS l
             WHERE l.action_id = ANY (v_repeated)
             GROUP BY l.action_id
        ), kept AS (
            UPDATE pg_temp.bulk_sync_load AS l
               SET copies = r.copies, verified = r.verified
              FROM repeated AS r
             WHERE l.action_id = r.action_id AND l.line = r.keep
        )
        DELETE FROM pg_temp.bulk_sync_load AS l
         USING repeated AS r
         WHERE l.action_id = r.action_id AND l.line <> r.keep;
    END IF;

    -- 4. Chunks of whole users, in user_id order, of about p_chunk_rows rows each (NULL: one chunk).
    -- Chunk i covers chunks[i] <= user_id < chunks[i + 1]; the last one has no upper bound.
    IF p_chunk_rows IS NOT NULL THEN
        CREATE INDEX bulk_sync_load_user ON pg_temp.bulk_sync_load (user_id);
        ANALYZE pg_temp.bulk_sync_load;
        SELECT array_agg(c.user_id ORDER BY c.user_id) INTO v_bounds
          FROM (SELECT g.user_id, g.chunk, lag(g.chunk) OVER (ORDER BY g.user_id) AS previous
                  FROM (SELECT u.user_id, ((sum(u.n) OVER (ORDER BY u.user_id))::bigint - u.n) / p_chunk_rows AS chunk
                          FROM (SELECT l.user_id, count(*) AS n FROM pg_temp.bulk_sync_load AS l GROUP BY l.user_id) AS u) AS g) AS c
         WHERE c.previous IS DISTINCT FROM c.chunk;
    END IF;
    RETURN jsonb_build_object('rows', v_rows, 'problems', v_problems, 'chunks', to_jsonb(coalesce(v_bounds, '{}')),
                              'global_total_lbs', bulk_sync._amount(bulk_sync._current_global_total()));
END
$$;
COMMENT ON FUNCTION bulk_sync._stage_load(integer, integer) IS
    'Internal to bulk loads: checks every row of pg_temp.bulk_sync_stage (BS001 rules, BS002 within the stage and against stored actions) and keeps the valid ones for _stage_apply. Returns {"rows", "problems": [{line, code, field, reason, value, action_id, first_line}], "chunks": [user_id bounds], "global_total_lbs"}; first_line is the earlier row a BS002 within the stage differs from.';
