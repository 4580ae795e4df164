-- Security: the three NOLOGIN roles and what each may do, nothing for PUBLIC, no direct writes to the
-- tables, every SECURITY DEFINER function pinned to a search_path ending in pg_temp, and a caller's
-- objects in another schema (public.now(), public.jsonb_typeof()) unable to hijack the API.
BEGIN;
SELECT plan(58);

CREATE SCHEMA tests;

-- Every relation and function of bulk_sync.
CREATE VIEW tests.relations AS
SELECT c.oid::regclass AS rel
  FROM pg_catalog.pg_class AS c JOIN pg_catalog.pg_namespace AS n ON n.oid = c.relnamespace
 WHERE n.nspname = 'bulk_sync' AND c.relkind IN ('r', 'p', 'v', 'm', 'f');
CREATE VIEW tests.functions AS
SELECT p.oid::regprocedure AS fn, p.prosecdef, p.proconfig
  FROM pg_catalog.pg_proc AS p JOIN pg_catalog.pg_namespace AS n ON n.oid = p.pronamespace
 WHERE n.nspname = 'bulk_sync';

-- The functions of the contract, by role (API.md section 5).
CREATE TABLE tests.role_functions (role name, fn regprocedure);
INSERT INTO tests.role_functions VALUES
    ('bulk_sync_writer', 'bulk_sync.log_action(jsonb)'),
    ('bulk_sync_writer', 'bulk_sync.log_action(uuid, uuid, numeric, timestamptz, boolean, jsonb)'),
    ('bulk_sync_writer', 'bulk_sync.bulk_backfill(jsonb)'),
    ('bulk_sync_writer', 'bulk_sync.verify_action(uuid, text)'),
    ('bulk_sync_writer', 'bulk_sync.revoke_action(uuid, text, text)'),
    ('bulk_sync_reader', 'bulk_sync.leaderboard(integer, integer)'),
    ('bulk_sync_reader', 'bulk_sync.user_rank(uuid)'),
    ('bulk_sync_reader', 'bulk_sync.leaderboard_around(uuid, integer)'),
    ('bulk_sync_reader', 'bulk_sync.leaderboard_json(integer, integer)'),
    ('bulk_sync_reader', 'bulk_sync.global_total(timestamptz)'),
    ('bulk_sync_reader', 'bulk_sync.user_total(uuid, timestamptz)'),
    ('bulk_sync_reader', 'bulk_sync.events_since(bigint, integer)'),
    ('bulk_sync_admin',  'bulk_sync.reconcile(jsonb)');

------------------------------------------------------------------------------------------------------
-- roles
SELECT has_role('bulk_sync_reader', 'role bulk_sync_reader exists');
SELECT has_role('bulk_sync_writer', 'role bulk_sync_writer exists');
SELECT has_role('bulk_sync_admin', 'role bulk_sync_admin exists');
SELECT is((SELECT array_agg(rolname::text ORDER BY rolname) FROM pg_catalog.pg_roles
            WHERE rolname IN ('bulk_sync_reader', 'bulk_sync_writer', 'bulk_sync_admin') AND rolcanlogin),
    NULL, 'none of the three roles can log in');
SELECT is((SELECT array_agg(rolname::text ORDER BY rolname) FROM pg_catalog.pg_roles
            WHERE rolname IN ('bulk_sync_reader', 'bulk_sync_writer', 'bulk_sync_admin')
              AND (rolsuper OR rolcreaterole OR rolcreatedb OR rolbypassrls)),
    NULL, 'none of the three roles has superuser, createrole, createdb or bypassrls');

------------------------------------------------------------------------------------------------------
-- SECURITY DEFINER functions pin search_path (meta-test, as pg_partman does)
SELECT cmp_ok((SELECT count(*) FROM tests.functions WHERE prosecdef), '>', 0::bigint,
    'bulk_sync has SECURITY DEFINER functions to check');
SELECT is(
    (SELECT coalesce(array_agg(fn::text ORDER BY fn::text), '{}') FROM tests.functions AS f
      WHERE f.prosecdef
        AND NOT EXISTS (SELECT FROM unnest(f.proconfig) AS c WHERE c ~ '^search_path=.*\mpg_temp"?$')),
    '{}'::text[], 'every SECURITY DEFINER function pins a search_path that ends with pg_temp');
SELECT is(
    (SELECT coalesce(array_agg(fn::text ORDER BY fn::text), '{}') FROM tests.functions AS f
      WHERE f.prosecdef
        AND EXISTS (SELECT FROM unnest(f.proconfig) AS c WHERE c ~ '^search_path=' AND c ~ '(\mpublic\M|\$user)')),
    '{}'::text[], 'no SECURITY DEFINER function has public or $user in its search_path');
SELECT is(
    (SELECT coalesce(array_agg(fn::text ORDER BY fn::text), '{}') FROM tests.functions AS f
      WHERE f.prosecdef
        AND NOT EXISTS (SELECT FROM unnest(f.proconfig) AS c WHERE c ~ '^search_path=.*\mpg_catalog\M.*pg_temp')),
    '{}'::text[], 'every SECURITY DEFINER function names pg_catalog before pg_temp');

------------------------------------------------------------------------------------------------------
-- nothing for PUBLIC
SELECT is(
    (SELECT coalesce(array_agg(fn::text ORDER BY fn::text), '{}') FROM tests.functions
      WHERE has_function_privilege('public', fn, 'EXECUTE')),
    '{}'::text[], 'PUBLIC can execute no bulk_sync function');
SELECT is(
    (SELECT coalesce(array_agg(rel::text ORDER BY rel::text), '{}') FROM tests.relations
      WHERE has_table_privilege('public', rel, 'SELECT, INSERT, UPDATE, DELETE, TRUNCATE, REFERENCES, TRIGGER')),
    '{}'::text[], 'PUBLIC has no privilege on any bulk_sync table or view');

CREATE ROLE tests_nobody NOLOGIN;
SELECT is(
    (SELECT coalesce(array_agg(fn::text ORDER BY fn::text), '{}') FROM tests.functions
      WHERE has_function_privilege('tests_nobody', fn, 'EXECUTE')),
    '{}'::text[], 'a role with no grants can execute no bulk_sync function');
SELECT is(
    (SELECT coalesce(array_agg(rel::text ORDER BY rel::text), '{}') FROM tests.relations
      WHERE has_table_privilege('tests_nobody', rel, 'SELECT, INSERT, UPDATE, DELETE, TRUNCATE')),
    '{}'::text[], 'a role with no grants can read or write no bulk_sync table');
SELECT is(has_schema_privilege('tests_nobody', 'bulk_sync', 'USAGE, CREATE'), false,
    'a role with no grants has no privilege on the schema');

------------------------------------------------------------------------------------------------------
-- what each role may execute
SELECT is(
    (SELECT coalesce(array_agg(fn::text ORDER BY fn::text), '{}') FROM tests.role_functions
      WHERE role = 'bulk_sync_writer' AND NOT has_function_privilege('bulk_sync_writer', fn, 'EXECUTE')),
    '{}'::text[], 'the writer can execute log_action (both), bulk_backfill, verify_action, revoke_action');
SELECT is(has_function_privilege('bulk_sync_writer', 'bulk_sync.reconcile(jsonb)', 'EXECUTE'), false,
    'the writer cannot execute reconcile');
SELECT is(
    (SELECT coalesce(array_agg(fn::text ORDER BY fn::text), '{}') FROM tests.role_functions
      WHERE role = 'bulk_sync_reader' AND NOT has_function_privilege('bulk_sync_reader', fn, 'EXECUTE')),
    '{}'::text[], 'the reader can execute the leaderboard, total and event functions');
SELECT is(
    (SELECT coalesce(array_agg(fn::text ORDER BY fn::text), '{}') FROM tests.role_functions
      WHERE role IN ('bulk_sync_writer', 'bulk_sync_admin') AND has_function_privilege('bulk_sync_reader', fn, 'EXECUTE')),
    '{}'::text[], 'the reader cannot execute log_action, bulk_backfill, verify_action, revoke_action or reconcile');
SELECT is(
    (SELECT coalesce(array_agg(fn::text ORDER BY fn::text), '{}') FROM tests.role_functions
      WHERE NOT has_function_privilege('bulk_sync_admin', fn, 'EXECUTE')),
    '{}'::text[], 'the admin can execute every contract function, reconcile included');
SELECT is(
    (SELECT coalesce(array_agg(rel::text ORDER BY rel::text), '{}') FROM tests.relations
      WHERE NOT has_table_privilege('bulk_sync_reader', rel, 'SELECT')
        AND rel NOT IN ('bulk_sync._loads'::regclass, 'bulk_sync._load_rows'::regclass)),
    '{}'::text[], 'the reader can SELECT every bulk_sync table and view but _loads and _load_rows');
SELECT ok(NOT has_table_privilege('bulk_sync_reader', 'bulk_sync._loads', 'SELECT'),
          'the reader cannot read the tokens of the loads in progress (bulk_sync._loads)');
SELECT ok(NOT has_table_privilege('bulk_sync_reader', 'bulk_sync._load_rows', 'SELECT'),
          'nor find them in the loads'' checked rows (bulk_sync._load_rows)');
SELECT is(has_schema_privilege('bulk_sync_reader', 'bulk_sync', 'USAGE'), true, 'the reader can use the schema');
SELECT is(has_schema_privilege('bulk_sync_writer', 'bulk_sync', 'USAGE'), true, 'the writer can use the schema');

-- no role but the owner writes the tables
SELECT is(
    (SELECT coalesce(array_agg(r.role || ' ' || p.priv || ' ' || t.rel::text ORDER BY 1), '{}')
       FROM tests.relations AS t
      CROSS JOIN unnest(ARRAY['bulk_sync_reader', 'bulk_sync_writer', 'bulk_sync_admin']) AS r(role)
      CROSS JOIN unnest(ARRAY['INSERT', 'UPDATE', 'DELETE', 'TRUNCATE']) AS p(priv)
      WHERE has_table_privilege(r.role, t.rel, p.priv)),
    '{}'::text[], 'no role can INSERT, UPDATE, DELETE or TRUNCATE any bulk_sync table or view');
SELECT is(
    (SELECT coalesce(array_agg(r.role ORDER BY 1), '{}')
       FROM unnest(ARRAY['bulk_sync_reader', 'bulk_sync_writer', 'bulk_sync_admin']) AS r(role)
      WHERE has_schema_privilege(r.role, 'bulk_sync', 'CREATE')),
    '{}'::text[], 'no role can create objects in schema bulk_sync');

------------------------------------------------------------------------------------------------------
-- the same, by acting as login-less test roles
CREATE ROLE tests_writer NOLOGIN;
CREATE ROLE tests_reader NOLOGIN;
CREATE ROLE tests_admin NOLOGIN;
GRANT bulk_sync_writer TO tests_writer;
GRANT bulk_sync_reader TO tests_reader;
GRANT bulk_sync_admin TO tests_admin;

SET ROLE tests_writer;
SELECT lives_ok($$SELECT bulk_sync.log_action('{"action_id": "00000000-0000-4000-8000-0000000000a1",
    "user_id": "00000000-0000-4000-8000-000000000001", "lbs": "10.2", "logged_at": "2025-11-05T10:00:00Z", "verified": true}')$$,
    'as writer: log_action works');
SELECT lives_ok($$SELECT bulk_sync.revoke_action('00000000-0000-4000-8000-0000000000a1', 'test', 'writer')$$,
    'as writer: revoke_action works');
SELECT throws_ok($$SELECT bulk_sync.reconcile()$$, '42501', NULL, 'as writer: reconcile is denied');
SELECT throws_ok($$INSERT INTO bulk_sync.user_actions (action_id, user_id, emissions_saved_lbs, logged_at)
    VALUES ('00000000-0000-4000-8000-0000000000a9', '00000000-0000-4000-8000-000000000001', 1, now())$$,
    '42501', NULL, 'as writer: a direct INSERT into user_actions is denied');
SELECT throws_ok($$UPDATE bulk_sync.user_stats SET total_emissions_lbs = 1$$, '42501', NULL,
    'as writer: a direct UPDATE of user_stats is denied');
RESET ROLE;

SET ROLE tests_reader;
SELECT lives_ok($$SELECT * FROM bulk_sync.leaderboard()$$, 'as reader: leaderboard works');
SELECT lives_ok($$SELECT * FROM bulk_sync.events_since(0)$$, 'as reader: events_since works');
SELECT lives_ok($$SELECT count(*) FROM bulk_sync.user_actions$$, 'as reader: SELECT from user_actions works');
SELECT throws_ok($$SELECT bulk_sync.log_action('{"action_id": "00000000-0000-4000-8000-0000000000a2",
    "user_id": "00000000-0000-4000-8000-000000000001", "lbs": "1", "logged_at": "2025-11-05T10:00:00Z"}')$$,
    '42501', NULL, 'as reader: log_action is denied');
SELECT throws_ok($$UPDATE bulk_sync.global_emissions SET total_lbs_saved = 0 WHERE id = 1$$, '42501', NULL,
    'as reader: UPDATE of global_emissions is denied');
SELECT throws_ok($$DELETE FROM bulk_sync.user_actions$$, '42501', NULL, 'as reader: DELETE from user_actions is denied');
SELECT throws_ok($$INSERT INTO bulk_sync.emissions_corrections (previous_total, corrected_total, discrepancy, reason)
    VALUES (0, 0, 0, 'forged')$$, '42501', NULL, 'as reader: INSERT into emissions_corrections is denied');
RESET ROLE;

SET ROLE tests_admin;
SELECT lives_ok($$SELECT bulk_sync.reconcile('{"performed_by": "admin"}')$$, 'as admin: reconcile works');
SELECT throws_ok($$UPDATE bulk_sync.user_stats SET total_emissions_lbs = 1$$, '42501', NULL,
    'as admin: a direct UPDATE of user_stats is denied');
RESET ROLE;

SET ROLE tests_nobody;
SELECT throws_ok($$SELECT * FROM bulk_sync.leaderboard()$$, '42501', NULL, 'as a role without grants: leaderboard is denied');
RESET ROLE;

------------------------------------------------------------------------------------------------------
-- hijack: a caller's search_path puts public (with traps) before pg_catalog. Two phases, so that
-- each trap shows on its own: time and uuid traps first, then a jsonb_typeof() trap.

-- Runs a statement returning jsonb and records its result, or its SQLSTATE, for later assertions.
-- Everything in its own body is schema-qualified, since it runs under the trapped search_path.
CREATE TABLE tests.hijack (name text PRIMARY KEY, result jsonb);
CREATE FUNCTION tests.try(p_name text, p_sql text) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    v_result  jsonb;
    v_state   text;
    v_msg     text;
BEGIN
    BEGIN
        EXECUTE p_sql INTO v_result;
    EXCEPTION WHEN OTHERS THEN
        GET STACKED DIAGNOSTICS v_state = RETURNED_SQLSTATE, v_msg = MESSAGE_TEXT;
        v_result := pg_catalog.jsonb_build_object('error', v_state, 'message', v_msg);
    END;
    INSERT INTO tests.hijack VALUES (p_name, v_result);
END
$$;
GRANT USAGE ON SCHEMA tests TO tests_writer, tests_admin;
GRANT INSERT ON tests.hijack TO tests_writer, tests_admin;
CREATE FUNCTION tests.h(p_name text) RETURNS jsonb
LANGUAGE sql STABLE AS $$ SELECT result FROM tests.hijack WHERE name = p_name $$;

-- phase 1: now() in the far future, a constant gen_random_uuid()
CREATE FUNCTION public.now() RETURNS timestamptz
LANGUAGE sql AS $$ SELECT '2999-01-01T00:00:00Z'::timestamptz $$;
CREATE FUNCTION public.gen_random_uuid() RETURNS uuid
LANGUAGE sql AS $$ SELECT '00000000-0000-4000-8000-00000000dead'::uuid $$;

-- Cached plans were made before the traps existed; a real attacker's objects would exist first.
DISCARD PLANS;
SET ROLE tests_writer;
SET search_path = public, pg_catalog;
SELECT tests.try('caller now', $$SELECT pg_catalog.to_jsonb(now())$$);
SELECT tests.try('log', $$SELECT bulk_sync.log_action('{"action_id": "00000000-0000-4000-8000-0000000000b1",
    "user_id": "00000000-0000-4000-8000-000000000002", "lbs": "2.5", "logged_at": "2025-11-05T10:00:00Z",
    "verified": true, "metadata": {"k": 1}}')$$);
SELECT tests.try('log positional', $$SELECT bulk_sync.log_action('00000000-0000-4000-8000-0000000000b2'::uuid,
    '00000000-0000-4000-8000-000000000002'::uuid, 1.5, '2025-11-05T11:00:00Z'::timestamptz, true, '{"k": 2}'::jsonb)$$);
SELECT tests.try('future', $$SELECT bulk_sync.log_action('{"action_id": "00000000-0000-4000-8000-0000000000b3",
    "user_id": "00000000-0000-4000-8000-000000000002", "lbs": "1", "logged_at": "2500-01-01T00:00:00Z"}')$$);
SELECT tests.try('future positional', $$SELECT bulk_sync.log_action('00000000-0000-4000-8000-0000000000b5'::uuid,
    '00000000-0000-4000-8000-000000000002'::uuid, 1, '2500-01-01T00:00:00Z'::timestamptz, true)$$);
SELECT tests.try('future bulk', $$SELECT bulk_sync.bulk_backfill('{"actions": [{"action_id": "00000000-0000-4000-8000-0000000000b6",
    "user_id": "00000000-0000-4000-8000-000000000003", "lbs": "4", "logged_at": "2500-01-01T00:00:00Z", "verified": true}]}')$$);
SELECT tests.try('bulk', $$SELECT bulk_sync.bulk_backfill('{"actions": [{"action_id": "00000000-0000-4000-8000-0000000000b4",
    "user_id": "00000000-0000-4000-8000-000000000003", "lbs": "4", "logged_at": "2025-11-05T10:00:00Z", "verified": true}]}')$$);
RESET ROLE;
SET ROLE tests_admin;
SET search_path = public, pg_catalog;
SELECT tests.try('reconcile', $$SELECT bulk_sync.reconcile()$$);
RESET ROLE;
RESET search_path;
DROP FUNCTION public.now();
DROP FUNCTION public.gen_random_uuid();

-- phase 2: jsonb_typeof() that recognises nothing
CREATE FUNCTION public.jsonb_typeof(jsonb) RETURNS text
LANGUAGE sql AS $$ SELECT 'trap'::text $$;

DISCARD PLANS;
SET ROLE tests_writer;
SET search_path = public, pg_catalog;
SELECT tests.try('caller typeof', $$SELECT pg_catalog.to_jsonb(jsonb_typeof('{}'::jsonb))$$);
SELECT tests.try('typeof log', $$SELECT bulk_sync.log_action('{"action_id": "00000000-0000-4000-8000-0000000000c1",
    "user_id": "00000000-0000-4000-8000-000000000004", "lbs": "1", "logged_at": "2025-11-05T10:00:00Z",
    "verified": true, "metadata": {"k": 3}}')$$);
SELECT tests.try('typeof positional', $$SELECT bulk_sync.log_action('00000000-0000-4000-8000-0000000000c2'::uuid,
    '00000000-0000-4000-8000-000000000004'::uuid, 1, '2025-11-05T11:00:00Z'::timestamptz, true, '{"k": 4}'::jsonb)$$);
SELECT tests.try('typeof bulk', $$SELECT bulk_sync.bulk_backfill('{"actions": [{"action_id": "00000000-0000-4000-8000-0000000000c3",
    "user_id": "00000000-0000-4000-8000-000000000004", "lbs": "1", "logged_at": "2025-11-05T12:00:00Z", "verified": true,
    "metadata": {"k": 5}}]}')$$);
RESET ROLE;
RESET search_path;
DROP FUNCTION public.jsonb_typeof(jsonb);

SELECT is(tests.h('caller now'), to_jsonb('2999-01-01T00:00:00Z'::timestamptz), 'the trap now() was live for the caller');
SELECT is(tests.h('log') ->> 'status', 'inserted', 'trapped now(): log_action(jsonb) inserts');
SELECT is((tests.h('log') ->> 'timestamp')::timestamptz, now(), 'trapped now(): log_action''s timestamp is the real now()');
SELECT is(tests.h('log positional') ->> 'status', 'inserted', 'trapped now(): positional log_action inserts');
SELECT results_eq(
    $$SELECT action_id, created_at, verified_at FROM bulk_sync.user_actions
       WHERE action_id IN ('00000000-0000-4000-8000-0000000000b1', '00000000-0000-4000-8000-0000000000b2',
                           '00000000-0000-4000-8000-0000000000b4') ORDER BY action_id$$,
    $$VALUES ('00000000-0000-4000-8000-0000000000b1'::uuid, now(), now()),
             ('00000000-0000-4000-8000-0000000000b2'::uuid, now(), now()),
             ('00000000-0000-4000-8000-0000000000b4'::uuid, now(), now())$$,
    'trapped now(): the stored created_at and verified_at are the real now()');
SELECT is(tests.h('future') ->> 'error', 'BS001', 'trapped now(): log_action(jsonb) still rejects logged_at in 2500');
SELECT is(tests.h('future positional') ->> 'error', 'BS001', 'trapped now(): positional log_action still rejects logged_at in 2500');
SELECT is(tests.h('future bulk') ->> 'error', 'BS001', 'trapped now(): bulk_backfill still rejects logged_at in 2500');
SELECT is(tests.h('bulk') ->> 'inserted_count', '1', 'trapped now(): bulk_backfill inserts');
SELECT isnt(tests.h('reconcile') ->> 'run_id', '00000000-0000-4000-8000-00000000dead',
    'trapped gen_random_uuid(): reconcile''s run_id is a real uuid');
SELECT is(tests.h('reconcile') -> 'in_sync', 'true'::jsonb, 'trapped now(): reconcile ran and finds the ledger in sync');

SELECT is(tests.h('caller typeof'), '"trap"'::jsonb, 'the trap jsonb_typeof() was live for the caller');
SELECT is(tests.h('typeof log') ->> 'status', 'inserted', 'trapped jsonb_typeof(): log_action(jsonb) inserts');
SELECT is(tests.h('typeof positional') ->> 'status', 'inserted', 'trapped jsonb_typeof(): positional log_action inserts');
SELECT is(tests.h('typeof bulk') ->> 'inserted_count', '1', 'trapped jsonb_typeof(): bulk_backfill inserts');
SELECT is((SELECT array_agg(metadata ORDER BY action_id) FROM bulk_sync.user_actions
            WHERE action_id IN ('00000000-0000-4000-8000-0000000000c1', '00000000-0000-4000-8000-0000000000c2',
                                '00000000-0000-4000-8000-0000000000c3')),
    ARRAY['{"k": 3}', '{"k": 4}', '{"k": 5}']::jsonb[], 'trapped jsonb_typeof(): the metadata is stored');

SELECT is((SELECT total_lbs_saved::text FROM bulk_sync.global_emissions WHERE id = 1), '11.000000',
    'the totals are exact (2.5 + 1.5 + 4 + 3 x 1; the revoked 10.2 excluded)');

SELECT * FROM finish();
ROLLBACK;
