-- _stage_check: checks every action of this session's stage against every BS001 rule and adds the valid
-- ones, typed, to the rows of load p_load, numbered from p_first_line. Set-based: one pass for the rules,
-- one to type the rows. The sessions of a load check their parts of the input at the same time.
CREATE OR REPLACE FUNCTION bulk_sync._stage_check(
    p_load          uuid,
    p_first_line    bigint DEFAULT 1,
    p_max_problems  integer DEFAULT 100)
RETURNS jsonb
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = bulk_sync, pg_catalog, pg_temp
-- Compiling the rules' expressions costs more than it saves on a stage of any size measured.
SET jit = off
AS $$
DECLARE
    v_out_of_form  bigint[];
    v_invalid      jsonb;
    v_rows         bigint;
BEGIN
    PERFORM bulk_sync._stage_guard();
    PERFORM bulk_sync._load_held(p_load);
    IF p_first_line IS NULL OR p_first_line < 1 OR p_max_problems IS NULL OR p_max_problems < 1 THEN
        RAISE EXCEPTION '_stage_check: p_first_line and p_max_problems must be positive'
            USING ERRCODE = 'BS001', DETAIL = format('p_first_line: %s, p_max_problems: %s', p_first_line, p_max_problems);
    END IF;

    -- 0. The groups of 10,000 lines whose uuids and times are not all in their common form (_in_form,
    -- asked of each group at once): only their rows need the rules' costliest tests, one text at a time.
    SELECT coalesce(array_agg(g.part), '{}') INTO v_out_of_form
      FROM (SELECT s.line / 10000 AS part
              FROM pg_temp.bulk_sync_stage AS s
             GROUP BY s.line / 10000
            HAVING NOT bulk_sync._in_form(string_agg(coalesce(s.action_id, s.doc ->> 'action_id'), ','),
                                          string_agg(coalesce(s.user_id, s.doc ->> 'user_id'), ','),
                                          string_agg(coalesce(s.logged_at, s.doc ->> 'logged_at'), ','),
                                          count(*))) AS g;

    -- 1. Every rule of _action_problems on every row: each (line, field, reason) of the first
    -- p_max_problems bad rows.
    SELECT coalesce(jsonb_agg(p ORDER BY p.line, p.field), '[]') INTO v_invalid
      FROM (SELECT q.line, q.code, q.field, q.reason, q.value, q.action_id
              FROM (SELECT s.line + p_first_line - 1 AS line, 'BS001' AS code, r.field, r.reason, r.value,
                           coalesce(s.action_id, CASE WHEN jsonb_typeof(s.doc) = 'object' THEN s.doc ->> 'action_id' END) AS action_id,
                           dense_rank() OVER (ORDER BY s.line) AS nth
                      FROM pg_temp.bulk_sync_stage AS s
                     CROSS JOIN LATERAL bulk_sync._action_problems(s.doc, s.action_id, s.user_id, s.lbs, s.logged_at,
                                                                   s.verified, s.metadata,
                                                                   s.line / 10000 <> ALL (v_out_of_form)) AS r) AS q
             WHERE q.nth <= p_max_problems) AS p;

    -- 2. The valid rows, typed (a blank line, all NULL, is no row), each marked known when its action_id
    -- is stored, pending when it is stored unverified, and conflicting when the stored facts differ
    -- (_stored_facts: one primary-key probe per row). With invalid rows present the rules are
    -- asked again to leave them out, so that _stage_load can still report conflicts among the others.
    INSERT INTO bulk_sync._load_rows
           (load, line, action_id, user_id, lbs, logged_at, verified, metadata, known, pending, conflicts)
    SELECT p_load, v.line + p_first_line - 1, v.action_id, v.user_id, v.lbs, v.logged_at, v.verified, v.metadata,
           k.pending IS NOT NULL, coalesce(k.pending, false), coalesce(k.conflicts, false)
      FROM (SELECT s.line, t.*
              FROM pg_temp.bulk_sync_stage AS s
             CROSS JOIN LATERAL bulk_sync._action_values(s.doc, s.action_id, s.user_id, s.lbs, s.logged_at,
                                                         s.verified, s.metadata) AS t
             WHERE (s.doc, s.action_id, s.user_id, s.lbs, s.logged_at, s.verified, s.metadata) IS DISTINCT FROM
                   (NULL::jsonb, NULL::text, NULL::text, NULL::text, NULL::text, NULL::text, NULL::text)
               AND (v_invalid = '[]' OR NOT EXISTS (SELECT FROM bulk_sync._action_problems(s.doc, s.action_id,
                                                    s.user_id, s.lbs, s.logged_at, s.verified, s.metadata,
                                                    s.line / 10000 <> ALL (v_out_of_form))))) AS v
      LEFT JOIN LATERAL bulk_sync._stored_facts(v.action_id, v.user_id, v.lbs, v.logged_at) AS k ON true
     ORDER BY v.user_id;  -- so that a chunk's rows lie together: each chunk reads a few pages, not all
    GET DIAGNOSTICS v_rows = ROW_COUNT;

    RETURN jsonb_build_object('rows', v_rows, 'problems', v_invalid);
END
$$;
COMMENT ON FUNCTION bulk_sync._stage_check(uuid, bigint, integer) IS
    'Internal to bulk loads: checks every row of pg_temp.bulk_sync_stage against the BS001 rules and adds the valid ones to load p_load, their lines numbered from p_first_line. Returns {"rows": valid rows added, "problems": [{line, code, field, reason, value, action_id}] of the first p_max_problems bad rows}.';
