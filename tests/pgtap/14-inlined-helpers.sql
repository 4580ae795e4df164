-- The SQL helpers that run once per action or per user (the rules, the facts comparison, the JSON of
-- responses and events) are inlined into the statements that call them: a SQL function that is not
-- inlined is planned and run as a query of its own on every call. The planner inlines one whose body
-- is a single expression unless it is declared less volatile than that body, which is easy to get
-- wrong (concat_ws and format are STABLE, not IMMUTABLE).
BEGIN;
SELECT plan(3);

-- Whether a call of the function, with arguments that are columns (so nothing is folded into a
-- constant), still names the function in its plan.
CREATE FUNCTION pg_temp.inlined(p_function regprocedure) RETURNS boolean
LANGUAGE plpgsql AS $$
DECLARE
    v_args     text;
    v_columns  text;
    v_line     text;
    v_plan     text := '';
BEGIN
    SELECT string_agg(format('s.a%s', a.n), ', ' ORDER BY a.n),
           string_agg(format('NULL::%s AS a%s', format_type(a.t, NULL), a.n), ', ' ORDER BY a.n)
      INTO v_args, v_columns
      FROM pg_proc AS p, unnest(p.proargtypes) WITH ORDINALITY AS a(t, n)
     WHERE p.oid = p_function;
    FOR v_line IN EXECUTE format('EXPLAIN (VERBOSE, COSTS OFF) SELECT %s(%s) FROM (SELECT %s OFFSET 0) AS s',
                                 p_function::oid::regproc, coalesce(v_args, ''), coalesce(v_columns, '1')) LOOP
        v_plan := v_plan || v_line || E'\n';
    END LOOP;
    RETURN position(format('%s(', p_function::oid::regproc) IN v_plan) = 0;
END
$$;

SELECT cmp_ok((SELECT count(*) FROM pg_proc AS p JOIN pg_language AS l ON l.oid = p.prolang
                WHERE p.pronamespace = 'bulk_sync'::regnamespace AND l.lanname = 'sql'
                  AND p.proname LIKE '\_%' AND pg_temp.inlined(p.oid)),
              '>=', 12::bigint, 'the per-row helpers are found and inlined');

-- The scalar SQL functions that are not inlined: each reads tables, so its body is a query.
SELECT set_eq(
    $$SELECT p.proname::text
        FROM pg_proc AS p JOIN pg_language AS l ON l.oid = p.prolang
       WHERE p.pronamespace = 'bulk_sync'::regnamespace AND l.lanname = 'sql' AND NOT p.proretset
         AND NOT pg_temp.inlined(p.oid)$$,
    ARRAY['_emit_user_events', '_recent_actions', 'leaderboard_json', 'global_total', 'status'],
    'every scalar SQL function of bulk_sync that is a single expression is inlined');

-- Inlining can also stop one level down: a helper given an argument that is costly to compute (a
-- cast of another helper's result) and naming its parameter more than once is run as a function of its
-- own, once per row, even inside a helper that is itself inlined. So the rules, the typing and the
-- probe run over actions as a load sees them (columns of a table, so nothing is folded into a
-- constant), counting the functions of bulk_sync called once per row or more, the rules also as a
-- batch in its common forms asks them (p_in_form, here a column). (Defaults that are constants are folded
-- when planning, a call or two each.) _json_object (PL/pgSQL) is called only for a CSV row's metadata,
-- so these rows have none.
CREATE TEMP TABLE rows_seen AS
SELECT jsonb_build_object('action_id', gen_random_uuid(), 'user_id', gen_random_uuid(),
                          'lbs', CASE WHEN i % 2 = 0 THEN to_jsonb(i / 8.0) ELSE to_jsonb((i / 8.0)::text) END,
                          'logged_at', '2025-01-01T00:00:00Z', 'verified', i % 3 = 0) AS doc,
       gen_random_uuid()::text AS action_id, gen_random_uuid()::text AS user_id, (i / 4.0)::text AS lbs,
       '2025-01-01 00:00:00+00'::text AS logged_at, CASE WHEN i % 3 = 0 THEN 'yes' ELSE 'false' END AS verified,
       ''::text AS metadata, i % 2 = 0 AS in_form
  FROM generate_series(1, 40) AS i;
SET LOCAL track_functions = 'all';
SELECT is(
    (SELECT count(*) FROM rows_seen AS s
      CROSS JOIN LATERAL bulk_sync._action_problems(s.doc) AS p)
  + (SELECT count(*) FROM rows_seen AS s
      CROSS JOIN LATERAL bulk_sync._action_problems(s.doc, p_in_form => s.in_form) AS p)
  + (SELECT count(*) FROM rows_seen AS s
      CROSS JOIN LATERAL bulk_sync._action_problems(NULL, s.action_id, s.user_id, s.lbs, s.logged_at, s.verified,
                                                    s.metadata) AS p)
  + (SELECT count(*) FROM rows_seen AS s CROSS JOIN LATERAL bulk_sync._action_values(s.doc) AS v
      LEFT JOIN LATERAL bulk_sync._stored_facts(v.action_id, v.user_id, v.lbs, v.logged_at) AS k ON true
     WHERE v.lbs < 0 OR k.conflicts)
  + (SELECT count(*) FROM rows_seen AS s
      CROSS JOIN LATERAL bulk_sync._action_values(NULL, s.action_id, s.user_id, s.lbs, s.logged_at, s.verified,
                                                  s.metadata) AS v WHERE v.lbs < 0)
  + (SELECT count(*) FROM pg_stat_xact_user_functions AS f WHERE f.schemaname = 'bulk_sync' AND f.calls >= 40),
    0::bigint,
    'valid actions, JSON or CSV, are checked and typed without calling a single helper');

SELECT * FROM finish();
ROLLBACK;
