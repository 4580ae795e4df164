-- reconcile: in sync on a fresh ledger; finds and fixes global drift (seed integration test 2) and
-- per-user drift, audits each fix in emissions_corrections with its run, and changes nothing when
-- auto_correct is false.
BEGIN;
SELECT plan(87);

\ir fixtures/common.sql

CREATE FUNCTION tests.global() RETURNS text
LANGUAGE sql STABLE AS $$ SELECT total_lbs_saved::text FROM bulk_sync.global_emissions WHERE id = 1 $$;

-- The keys the contract lists for reconcile's response (3.3).
CREATE FUNCTION tests.missing_keys(p_doc jsonb) RETURNS text[]
LANGUAGE sql IMMUTABLE AS $$
    SELECT coalesce(array_agg(k ORDER BY k), '{}')
      FROM unnest(ARRAY['in_sync', 'user_stats_sum', 'global_total', 'discrepancy', 'fixed', 'correction_id',
                        'users_out_of_sync', 'run_id', 'timestamp']) AS k
     WHERE NOT p_doc ? k
$$;

------------------------------------------------------------------------------------------------------
-- a fresh ledger is in sync
INSERT INTO tests.responses VALUES ('fresh', bulk_sync.reconcile());
SELECT is(tests.r('fresh') -> 'in_sync', 'true'::jsonb, 'fresh ledger: in_sync');
SELECT is(tests.r('fresh') ->> 'user_stats_sum', '0.000000', 'fresh ledger: user_stats_sum 0.000000');
SELECT is(tests.r('fresh') ->> 'discrepancy', '0.000000', 'fresh ledger: discrepancy 0.000000');
SELECT is(tests.r('fresh') -> 'fixed', 'false'::jsonb, 'fresh ledger: fixed false');
SELECT is(tests.r('fresh') -> 'correction_id', 'null'::jsonb, 'fresh ledger: correction_id null');
SELECT is(tests.missing_keys(tests.r('fresh')), '{}'::text[], 'the response has every key of the contract');
SELECT matches(tests.r('fresh') ->> 'timestamp', 'Z$', 'the response timestamp ends with Z');

-- The seed's three actions, plus a pending and a revoked action that must not count.
SELECT lives_ok($$SELECT bulk_sync.bulk_backfill('{"actions": [
    {"action_id": "00000000-0000-4000-8000-0000000000a1", "user_id": "00000000-0000-4000-8000-000000000001",
     "lbs": "10.2", "logged_at": "2025-11-05T10:00:00Z", "verified": true},
    {"action_id": "00000000-0000-4000-8000-0000000000a2", "user_id": "00000000-0000-4000-8000-000000000002",
     "lbs": "10.3", "logged_at": "2025-11-05T10:05:00Z", "verified": true},
    {"action_id": "00000000-0000-4000-8000-0000000000a3", "user_id": "00000000-0000-4000-8000-000000000003",
     "lbs": "10.4", "logged_at": "2025-11-05T10:10:00Z", "verified": true},
    {"action_id": "00000000-0000-4000-8000-0000000000a4", "user_id": "00000000-0000-4000-8000-000000000003",
     "lbs": "100", "logged_at": "2025-11-05T10:15:00Z"},
    {"action_id": "00000000-0000-4000-8000-0000000000a5", "user_id": "00000000-0000-4000-8000-000000000001",
     "lbs": "200", "logged_at": "2025-11-05T10:20:00Z", "verified": true}]}')$$,
    'load the seed actions');
SELECT lives_ok($$SELECT bulk_sync.revoke_action('00000000-0000-4000-8000-0000000000a5', 'entered twice')$$,
    'revoke one of them');

INSERT INTO tests.responses VALUES ('loaded', bulk_sync.reconcile());
SELECT is(tests.r('loaded') -> 'in_sync', 'true'::jsonb, 'after normal writes: in_sync');
SELECT is(tests.r('loaded') ->> 'user_stats_sum', '30.900000', 'after normal writes: user_stats_sum counts only counted actions');
SELECT is(tests.r('loaded') ->> 'global_total', '30.900000', 'after normal writes: global_total');
SELECT is(tests.r('loaded') -> 'users_out_of_sync', '0'::jsonb, 'after normal writes: no user out of sync');
SELECT is((SELECT count(*) FROM bulk_sync.emissions_corrections), 0::bigint, 'in sync: no correction written');

------------------------------------------------------------------------------------------------------
-- global drift (seed integration test 2)
UPDATE bulk_sync.global_emissions SET total_lbs_saved = '30.500000' WHERE id = 1;
SELECT is(tests.global(), '30.500000', 'the simulated drift is visible in global_emissions');

INSERT INTO tests.responses VALUES ('drift', bulk_sync.reconcile());
SELECT is(tests.r('drift') -> 'in_sync', 'false'::jsonb, 'drift: in_sync false');
SELECT is(tests.r('drift') ->> 'user_stats_sum', '30.900000', 'drift: user_stats_sum is the sum of counted actions');
SELECT is(tests.r('drift') ->> 'global_total', '30.500000', 'drift: global_total is the value before the fix');
SELECT is(tests.r('drift') ->> 'discrepancy', '0.400000', 'drift: discrepancy 0.400000');
SELECT is(tests.r('drift') -> 'fixed', 'true'::jsonb, 'drift: fixed true');
SELECT is(tests.r('drift') -> 'users_out_of_sync', '0'::jsonb, 'drift: no user out of sync');
SELECT isnt(tests.r('drift') -> 'correction_id', 'null'::jsonb, 'drift: correction_id set');
SELECT is(tests.global(), '30.900000', 'drift: global_emissions corrected to SUM(counted actions)');
SELECT is(bulk_sync.global_total()::text, '30.900000', 'drift: global_total() corrected');

SELECT is((SELECT count(*) FROM bulk_sync.emissions_corrections), 1::bigint, 'drift: one correction recorded');
SELECT results_eq(
    $$SELECT correction_id, previous_total::text, corrected_total::text, discrepancy::text, performed_by,
             reconciliation_run_id
        FROM bulk_sync.emissions_corrections$$,
    $$SELECT (r.response ->> 'correction_id')::uuid, '30.500000', '30.900000', '0.400000', 'system',
             (r.response ->> 'run_id')::uuid
        FROM tests.responses AS r WHERE r.name = 'drift'$$,
    'drift: the correction row matches the response (previous, corrected, discrepancy, performed_by system, run)');
SELECT isnt((SELECT nullif(btrim(reason), '') FROM bulk_sync.emissions_corrections), NULL, 'drift: the correction has a reason');
SELECT is((SELECT count(*) FROM bulk_sync.reconciliation_runs WHERE run_id = (tests.r('drift') ->> 'run_id')::uuid),
    1::bigint, 'drift: the run is recorded in reconciliation_runs');
SELECT is((SELECT in_sync FROM bulk_sync.reconciliation_runs WHERE run_id = (tests.r('drift') ->> 'run_id')::uuid),
    false, 'drift: the recorded run says out of sync');

-- the mismatch report: the counted actions most recently stored (one transaction here, so one
-- created_at: newest first falls back to action_id descending)
CREATE FUNCTION tests.recent(p_name text) RETURNS jsonb
LANGUAGE sql STABLE AS $$
    SELECT c.metadata -> 'recent_actions' FROM bulk_sync.emissions_corrections AS c
     WHERE c.correction_id = (tests.r(p_name) ->> 'correction_id')::uuid
$$;
SELECT is(jsonb_path_query_array(tests.recent('drift'), '$[*].action_id'),
    '["00000000-0000-4000-8000-0000000000a3", "00000000-0000-4000-8000-0000000000a2",
      "00000000-0000-4000-8000-0000000000a1"]'::jsonb,
    'drift: recent_actions lists the counted actions, newest first, without the pending and the revoked one');
SELECT is(tests.recent('drift') -> 0,
    jsonb_build_object('action_id', '00000000-0000-4000-8000-0000000000a3',
                       'user_id', '00000000-0000-4000-8000-000000000003', 'lbs', '10.400000',
                       'logged_at', '2025-11-05T10:10:00Z', 'created_at', bulk_sync._iso(now())),
    'drift: a recent action has its ids, lbs with six decimals and timestamps with Z');

INSERT INTO tests.responses VALUES ('after fix', bulk_sync.reconcile());
SELECT is(tests.r('after fix') -> 'in_sync', 'true'::jsonb, 'second run: in sync');
SELECT is(tests.r('after fix') -> 'fixed', 'false'::jsonb, 'second run: fixed false');
SELECT is(tests.r('after fix') -> 'correction_id', 'null'::jsonb, 'second run: correction_id null');
SELECT is(tests.r('after fix') ->> 'discrepancy', '0.000000', 'second run: discrepancy 0.000000');
SELECT isnt(tests.r('after fix') ->> 'run_id', tests.r('drift') ->> 'run_id', 'second run: a new run_id');
SELECT is((SELECT count(*) FROM bulk_sync.emissions_corrections), 1::bigint, 'second run: no new correction');

-- Drift upwards: discrepancy is absolute.
UPDATE bulk_sync.global_emissions SET total_lbs_saved = '31.000001' WHERE id = 1;
INSERT INTO tests.responses VALUES ('drift up', bulk_sync.reconcile('{"performed_by": "alice"}'));
SELECT is(tests.r('drift up') ->> 'discrepancy', '0.100001', 'global above the truth: discrepancy is absolute');
SELECT is(tests.r('drift up') ->> 'global_total', '31.000001', 'global above the truth: global_total before the fix');
SELECT is(tests.global(), '30.900000', 'global above the truth: corrected');
SELECT results_eq(
    $$SELECT previous_total::text, corrected_total::text, discrepancy::text, performed_by
        FROM bulk_sync.emissions_corrections WHERE correction_id = (tests.r('drift up') ->> 'correction_id')::uuid$$,
    $$VALUES ('31.000001', '30.900000', '0.100001', 'alice')$$,
    'performed_by is recorded on the correction');
SELECT is((SELECT performed_by FROM bulk_sync.reconciliation_runs WHERE run_id = (tests.r('drift up') ->> 'run_id')::uuid),
    'alice', 'performed_by is recorded on the run');

------------------------------------------------------------------------------------------------------
-- auto_correct false: report only
UPDATE bulk_sync.global_emissions SET total_lbs_saved = '30.000000' WHERE id = 1;
SELECT tests.mark('before dry run');
CREATE TABLE tests.corrections_before AS SELECT count(*) AS n FROM bulk_sync.emissions_corrections;
INSERT INTO tests.responses VALUES ('dry', bulk_sync.reconcile('{"auto_correct": false}'));
SELECT is(tests.r('dry') -> 'in_sync', 'false'::jsonb, 'auto_correct false: in_sync false');
SELECT is(tests.r('dry') ->> 'discrepancy', '0.900000', 'auto_correct false: the discrepancy is reported');
SELECT is(tests.r('dry') -> 'fixed', 'false'::jsonb, 'auto_correct false: fixed false');
SELECT is(tests.r('dry') -> 'correction_id', 'null'::jsonb, 'auto_correct false: correction_id null');
SELECT is(tests.global(), '30.000000', 'auto_correct false: the global total is left as it was');
SELECT is((SELECT count(*) FROM bulk_sync.emissions_corrections), (SELECT n FROM tests.corrections_before),
    'auto_correct false: no correction written');
SELECT is((SELECT count(*) FROM bulk_sync.reconciliation_runs WHERE run_id = (tests.r('dry') ->> 'run_id')::uuid),
    1::bigint, 'auto_correct false: the run is still recorded');

INSERT INTO tests.responses VALUES ('after dry', bulk_sync.reconcile('{"auto_correct": true, "performed_by": "bob"}'));
SELECT is(tests.r('after dry') -> 'fixed', 'true'::jsonb, 'a later run with auto_correct fixes it');
SELECT is(tests.global(), '30.900000', 'and the global total is exact again');

------------------------------------------------------------------------------------------------------
-- per-user drift
UPDATE bulk_sync.user_stats SET total_emissions_lbs = '99.000000' WHERE user_id = '00000000-0000-4000-8000-000000000001';
INSERT INTO tests.responses VALUES ('user drift', bulk_sync.reconcile('{"performed_by": "carol"}'));
SELECT is(tests.r('user drift') -> 'in_sync', 'false'::jsonb, 'user drift: in_sync false though the global total matches');
SELECT is(tests.r('user drift') -> 'users_out_of_sync', '1'::jsonb, 'user drift: one user out of sync');
SELECT is(tests.r('user drift') ->> 'discrepancy', '0.000000', 'user drift: no global discrepancy');
SELECT is(tests.r('user drift') -> 'fixed', 'true'::jsonb, 'user drift: fixed true');
SELECT is((SELECT total_emissions_lbs::text FROM bulk_sync.user_stats WHERE user_id = '00000000-0000-4000-8000-000000000001'),
    '10.200000', 'user drift: the user''s total is restored');
SELECT results_eq(
    $$SELECT metadata ->> 'user_id', previous_total::text, corrected_total::text, discrepancy::text, performed_by
        FROM bulk_sync.emissions_corrections
       WHERE reconciliation_run_id = (tests.r('user drift') ->> 'run_id')::uuid$$,
    $$VALUES ('00000000-0000-4000-8000-000000000001', '99.000000', '10.200000', '88.800000', 'carol')$$,
    'user drift: one correction naming the user in metadata, with the run id');

-- a drifted action_count alone is drift too
UPDATE bulk_sync.user_stats SET action_count = 7 WHERE user_id = '00000000-0000-4000-8000-000000000002';
INSERT INTO tests.responses VALUES ('count drift', bulk_sync.reconcile());
SELECT is(tests.r('count drift') -> 'users_out_of_sync', '1'::jsonb, 'a wrong action_count is found');
SELECT is((SELECT action_count FROM bulk_sync.user_stats WHERE user_id = '00000000-0000-4000-8000-000000000002'), 1,
    'and fixed');
SELECT is((SELECT metadata ->> 'user_id' FROM bulk_sync.emissions_corrections
            WHERE reconciliation_run_id = (tests.r('count drift') ->> 'run_id')::uuid),
    '00000000-0000-4000-8000-000000000002', 'and audited with the user in metadata');

-- a missing user_stats row is drift too
DELETE FROM bulk_sync.user_stats WHERE user_id = '00000000-0000-4000-8000-000000000003';
INSERT INTO tests.responses VALUES ('missing user', bulk_sync.reconcile());
SELECT is(tests.r('missing user') -> 'users_out_of_sync', '1'::jsonb, 'a missing user_stats row is found');
SELECT results_eq(
    $$SELECT total_emissions_lbs::text, action_count FROM bulk_sync.user_stats
       WHERE user_id = '00000000-0000-4000-8000-000000000003'$$,
    $$VALUES ('10.400000', 1)$$,
    'and recreated from the counted actions (the pending one excluded)');

-- global and user drift together: every correction carries the run id
UPDATE bulk_sync.global_emissions SET total_lbs_saved = '1.000000' WHERE id = 1;
UPDATE bulk_sync.user_stats SET total_emissions_lbs = '0.000001' WHERE user_id = '00000000-0000-4000-8000-000000000002';
INSERT INTO tests.responses VALUES ('both', bulk_sync.reconcile());
SELECT is((SELECT count(*) FROM bulk_sync.emissions_corrections
            WHERE reconciliation_run_id = (tests.r('both') ->> 'run_id')::uuid), 2::bigint,
    'global and user drift: two corrections with the run id');
SELECT is((SELECT count(*) FROM bulk_sync.emissions_corrections WHERE reconciliation_run_id IS NULL), 0::bigint,
    'no correction without a run id');
SELECT is(tests.r('both') ->> 'user_stats_sum', '30.900000', 'global and user drift: user_stats_sum is still the truth');

INSERT INTO tests.responses VALUES ('final', bulk_sync.reconcile());
SELECT is(tests.r('final') -> 'in_sync', 'true'::jsonb, 'everything is in sync at the end');

------------------------------------------------------------------------------------------------------
-- reconcile compares users range by range: users at and around every range bound are all checked,
-- with the ranges cut evenly (no statistics) and with them taken from user_stats' histogram
CREATE TABLE tests.edge_users AS
SELECT u.user_id::uuid
  FROM unnest(ARRAY['00000000-0000-0000-0000-000000000000', '1fffffff-ffff-ffff-ffff-ffffffffffff',
                    '20000000-0000-0000-0000-000000000000', '40000000-0000-0000-0000-000000000000',
                    '7fffffff-ffff-ffff-ffff-ffffffffffff', '80000000-0000-0000-0000-000000000000',
                    'a0000000-0000-0000-0000-000000000000', 'c0000000-0000-0000-0000-000000000001',
                    'e0000000-0000-0000-0000-000000000000', 'ffffffff-ffff-ffff-ffff-ffffffffffff']) AS u(user_id);
INSERT INTO bulk_sync.user_actions (action_id, user_id, emissions_saved_lbs, verified, verified_at, logged_at)
SELECT gen_random_uuid(), e.user_id, '1.000001', true, now(), now() - interval '1 hour' FROM tests.edge_users AS e;
DELETE FROM pg_catalog.pg_statistic WHERE starelid = 'bulk_sync.user_stats'::regclass;

UPDATE bulk_sync.user_stats SET total_emissions_lbs = total_emissions_lbs + 1
 WHERE user_id IN (SELECT user_id FROM tests.edge_users);
INSERT INTO tests.responses VALUES ('edges, even ranges', bulk_sync.reconcile());
SELECT is(tests.r('edges, even ranges') -> 'users_out_of_sync', '10'::jsonb,
    'ranges cut evenly: every drifted user at a range bound is found');
SELECT is((SELECT count(*) FROM bulk_sync.user_stats
            WHERE user_id IN (SELECT user_id FROM tests.edge_users) AND total_emissions_lbs = '1.000001'),
    10::bigint, 'and fixed');

ANALYZE bulk_sync.user_stats;
SELECT isnt((SELECT histogram_bounds::text FROM pg_catalog.pg_stats
              WHERE schemaname = 'bulk_sync' AND tablename = 'user_stats' AND attname = 'user_id'), NULL,
    'user_stats now has a histogram of user_id');
UPDATE bulk_sync.user_stats SET action_count = action_count + 1
 WHERE user_id IN (SELECT user_id FROM tests.edge_users);
INSERT INTO tests.responses VALUES ('edges, histogram ranges', bulk_sync.reconcile());
SELECT is(tests.r('edges, histogram ranges') -> 'users_out_of_sync', '10'::jsonb,
    'ranges from the histogram: every drifted user at a range bound is found');
SELECT is(tests.r('edges, histogram ranges') ->> 'user_stats_sum', '40.900010',
    'and the sum of counted actions covers every range once');
INSERT INTO tests.responses VALUES ('edges, after', bulk_sync.reconcile());
SELECT is(tests.r('edges, after') -> 'in_sync', 'true'::jsonb, 'and a second run finds everything in sync');

------------------------------------------------------------------------------------------------------
-- recent_actions: at most 100, by created_at, counted only; the notification's copy fits NOTIFY
SELECT is((SELECT count(*) FROM bulk_sync.emissions_corrections
            WHERE metadata ->> 'scope' = 'user' AND metadata ? 'recent_actions'), 0::bigint,
    'user corrections carry no recent_actions');
INSERT INTO bulk_sync.user_actions (action_id, user_id, emissions_saved_lbs, verified, verified_at, logged_at, created_at)
SELECT ('00000000-0000-4000-9000-' || lpad(g::text, 12, '0'))::uuid, '00000000-0000-4000-8000-000000000009',
       '0.000001', true, now(), '2025-01-01T00:00:00Z', now() + make_interval(secs => g)
  FROM generate_series(1, 150) AS g;
INSERT INTO bulk_sync.user_actions (action_id, user_id, emissions_saved_lbs, verified, verified_at, revoked, revoked_at, logged_at, created_at)
VALUES ('00000000-0000-4000-9000-100000000001', '00000000-0000-4000-8000-000000000009', '5', true, now(), true, now(),
        '2025-01-01T00:00:00Z', now() + interval '1 hour'),
       ('00000000-0000-4000-9000-100000000002', '00000000-0000-4000-8000-000000000009', '5', false, NULL, false, NULL,
        '2025-01-01T00:00:00Z', now() + interval '2 hours');
UPDATE bulk_sync.global_emissions SET total_lbs_saved = '0.000000' WHERE id = 1;
INSERT INTO tests.responses VALUES ('many', bulk_sync.reconcile());
SELECT is(jsonb_array_length(tests.recent('many')), 100, 'many actions: recent_actions holds 100');
SELECT is(tests.recent('many') -> 0 ->> 'action_id', '00000000-0000-4000-9000-000000000150',
    'many actions: the newest counted one first (a newer revoked and a newer pending one left out)');
SELECT is(tests.recent('many') -> 99 ->> 'created_at', bulk_sync._iso(now() + interval '51 seconds'),
    'many actions: the 100th newest last');

CREATE TABLE tests.payload AS
SELECT bulk_sync._ops_payload(tests.r('many'), 'recent_actions', tests.recent('many')) AS text;
SELECT cmp_ok((SELECT octet_length(text) FROM tests.payload), '<', 8000,
    'the notification of a 100-action report stays under NOTIFY''s 8000 bytes');
SELECT is((SELECT text::jsonb -> 'recent_actions' FROM tests.payload),
    (SELECT jsonb_agg(e.item ORDER BY e.n) FROM jsonb_array_elements(tests.recent('many')) WITH ORDINALITY AS e(item, n)
      WHERE e.n <= (SELECT jsonb_array_length(text::jsonb -> 'recent_actions') FROM tests.payload)),
    'it carries the newest recent actions, in order');
SELECT results_eq($$SELECT text::jsonb -> 'recent_actions_truncated', text::jsonb -> 'recent_actions_count',
                           text::jsonb -> 'correction_id', jsonb_array_length(text::jsonb -> 'recent_actions') >= 30
                      FROM tests.payload$$,
    $$VALUES ('true'::jsonb, '100'::jsonb, tests.r('many') -> 'correction_id', true)$$,
    'cut to fit: it says so, with the full count and the correction_id that has the whole list');
SELECT is(bulk_sync._ops_payload(tests.r('drift'), 'recent_actions', tests.recent('drift'))::jsonb,
    tests.r('drift') || jsonb_build_object('recent_actions', tests.recent('drift'), 'recent_actions_count', 3,
                                           'recent_actions_truncated', false),
    'a short list travels whole');
SELECT is(bulk_sync._ops_payload(tests.r('fresh'), 'recent_actions', NULL), tests.r('fresh')::text,
    'no list: the payload unchanged');

------------------------------------------------------------------------------------------------------
-- bad requests
SELECT lives_ok($$SELECT bulk_sync.reconcile(jsonb_build_object('performed_by', repeat('x', 200)))$$,
    'a performed_by of 200 characters is taken');
SELECT is((SELECT r.performed_by FROM bulk_sync.reconciliation_runs AS r ORDER BY r.started_at DESC LIMIT 1),
          repeat('x', 200), 'and recorded whole');
SELECT tests.mark('before bad requests');
SELECT throws_ok($$SELECT bulk_sync.reconcile('{"auto_corect": false}')$$, 'BS001', NULL, 'an unknown key is BS001');
SELECT throws_ok($$SELECT bulk_sync.reconcile('{"auto_correct": "no"}')$$, 'BS001', NULL, 'auto_correct not a boolean is BS001');
SELECT throws_ok($$SELECT bulk_sync.reconcile(jsonb_build_object('performed_by', repeat('x', 7700)))$$, 'BS001',
    'reconcile: performed_by must be a non-empty string of at most 200 characters',
    'a performed_by too long for the notification is BS001, named');
SELECT is(tests.fingerprint(), tests.fp('before bad requests'), 'bad requests change nothing');

SELECT * FROM finish();
ROLLBACK;
