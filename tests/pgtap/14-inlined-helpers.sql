-- The SQL helpers that run once per action or per user (the rules, the facts comparison, the JSON of
-- responses and events) are inlined into the statements that call them: a SQL function that is not
-- inlined is planned and run as a query of its own on every call. The planner inlines one whose body
-- is a single expression unless it is declared less volatile than that body, which is easy to get
-- wrong (concat_ws and format are STABLE, not IMMUTABLE).
BEGIN;
SELECT plan(2);

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

SELECT * FROM finish();
ROLLBACK;
