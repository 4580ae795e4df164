-- Seed acceptance: the seed's three actions give 30.900000, the exact user totals and the seed's
-- leaderboard, whether loaded by bulk_backfill (the seed's request) or logged one by one (unit test 1).
BEGIN;
SELECT plan(42);

CREATE SCHEMA tests;

-- Response keys as listed by the contract (API.md 3.1 and 3.2).
CREATE TABLE tests.contract_keys (fn text, key text, PRIMARY KEY (fn, key));
INSERT INTO tests.contract_keys
SELECT 'log_action', unnest(ARRAY['success', 'action_id', 'user_id', 'emissions_lbs', 'user_total_lbs',
                                  'global_total_lbs', 'is_duplicate', 'message', 'timestamp', 'status'])
UNION ALL
SELECT 'bulk_backfill', unnest(ARRAY['success', 'inserted_count', 'skipped_count', 'verified_count',
                                     'global_total_lbs', 'affected_users', 'message', 'idempotency_key', 'replayed']);

-- The keys of a response, sorted, for comparison with the contract's list.
CREATE FUNCTION tests.keys_of(p_doc jsonb) RETURNS text[]
LANGUAGE sql IMMUTABLE AS $$
    SELECT array_agg(k ORDER BY k) FROM jsonb_object_keys(p_doc) AS k
$$;
CREATE FUNCTION tests.contract_keys_of(p_fn text) RETURNS text[]
LANGUAGE sql STABLE AS $$
    SELECT array_agg(c.key ORDER BY c.key) FROM tests.contract_keys AS c WHERE c.fn = p_fn
$$;

-- The seed's three actions, each as the JSON body of log_action.
CREATE TABLE tests.seed_actions (n int PRIMARY KEY, body jsonb NOT NULL);
INSERT INTO tests.seed_actions VALUES
 (1, '{"user_id": "00000000-0000-4000-8000-000000000001", "action_id": "00000000-0000-4000-8000-0000000000a1",
       "lbs": "10.2", "logged_at": "2025-11-05T10:00:00Z", "verified": true}'),
 (2, '{"user_id": "00000000-0000-4000-8000-000000000002", "action_id": "00000000-0000-4000-8000-0000000000a2",
       "lbs": "10.3", "logged_at": "2025-11-05T10:05:00Z", "verified": true}'),
 (3, '{"user_id": "00000000-0000-4000-8000-000000000003", "action_id": "00000000-0000-4000-8000-0000000000a3",
       "lbs": "10.4", "logged_at": "2025-11-05T10:10:00Z", "verified": true}');

-- What an observer sees of the ledger: global total, user totals, ranks, leaderboard JSON.
CREATE FUNCTION tests.observe() RETURNS jsonb
LANGUAGE sql STABLE AS $$
    SELECT jsonb_build_object(
        'global', (SELECT total_lbs_saved::text FROM bulk_sync.global_emissions WHERE id = 1),
        'users',  (SELECT jsonb_object_agg(s.user_id, s.total_emissions_lbs::text) FROM bulk_sync.user_stats AS s),
        'ranks',  (SELECT jsonb_object_agg(l.user_id, l.rank) FROM bulk_sync.leaderboard() AS l),
        'board',  bulk_sync.leaderboard_json())
$$;

-- Scenario B (seed unit test 1) runs first on the empty ledger, inside a subtransaction that is
-- rolled back: PL/pgSQL variables survive the rollback, so its observations are kept while the
-- ledger is left empty for scenario A.
CREATE FUNCTION tests.sequential_scenario() RETURNS jsonb
LANGUAGE plpgsql AS $$
DECLARE
    v_obs   jsonb := '{}';
    v_body  jsonb;
    v_n     int;
BEGIN
    BEGIN
        FOR v_n, v_body IN SELECT n, body FROM tests.seed_actions ORDER BY n LOOP
            v_obs := v_obs || jsonb_build_object('r' || v_n, bulk_sync.log_action(v_body));
        END LOOP;
        v_obs := v_obs || tests.observe();
        RAISE EXCEPTION 'scenario done' USING ERRCODE = 'ZT999';
    EXCEPTION WHEN SQLSTATE 'ZT999' THEN
        NULL;
    END;
    RETURN v_obs;
END
$$;

CREATE TABLE tests.seq AS SELECT tests.sequential_scenario() AS obs;

-- Scenario B: the three actions logged sequentially with log_action(jsonb).
SELECT is((SELECT obs -> 'r1' ->> 'status' FROM tests.seq), 'inserted', 'sequential: first action inserted');
SELECT is((SELECT obs -> 'r1' ->> 'global_total_lbs' FROM tests.seq), '10.200000', 'sequential: global after action 1');
SELECT is((SELECT obs -> 'r2' ->> 'global_total_lbs' FROM tests.seq), '20.500000', 'sequential: global after action 2');
SELECT is((SELECT obs -> 'r3' ->> 'global_total_lbs' FROM tests.seq), '30.900000', 'sequential: global after action 3');
SELECT is((SELECT obs -> 'r3' ->> 'user_total_lbs' FROM tests.seq), '10.400000', 'sequential: user3 total in the response');
SELECT is((SELECT obs ->> 'global' FROM tests.seq), '30.900000', 'sequential: global_emissions.total_lbs_saved = 30.900000');
SELECT is((SELECT obs -> 'users' FROM tests.seq),
    '{"00000000-0000-4000-8000-000000000001": "10.200000",
      "00000000-0000-4000-8000-000000000002": "10.300000",
      "00000000-0000-4000-8000-000000000003": "10.400000"}'::jsonb,
    'sequential: each user_stats total is exact');
SELECT is((SELECT obs -> 'board' FROM tests.seq),
    '[{"rank": 1, "user_id": "00000000-0000-4000-8000-000000000003", "total_lbs": "10.400000"},
      {"rank": 2, "user_id": "00000000-0000-4000-8000-000000000002", "total_lbs": "10.300000"},
      {"rank": 3, "user_id": "00000000-0000-4000-8000-000000000001", "total_lbs": "10.200000"}]'::jsonb,
    'sequential: leaderboard_json is the seed''s expected order');
SELECT is(tests.keys_of((SELECT obs -> 'r1' FROM tests.seq)), tests.contract_keys_of('log_action'),
    'log_action(jsonb) response keys are exactly the contract''s');
SELECT is((SELECT obs -> 'r1' ->> 'emissions_lbs' FROM tests.seq), '10.200000', 'sequential: emissions_lbs has six decimals');
SELECT is((SELECT jsonb_typeof(obs -> 'r1' -> 'user_total_lbs') FROM tests.seq), 'string',
    'log_action: user_total_lbs is a JSON string');
SELECT is((SELECT jsonb_typeof(obs -> 'r1' -> 'global_total_lbs') FROM tests.seq), 'string',
    'log_action: global_total_lbs is a JSON string');
SELECT is((SELECT obs -> 'r1' -> 'is_duplicate' FROM tests.seq), 'false'::jsonb, 'log_action: is_duplicate false for a new action');
SELECT is((SELECT obs -> 'r1' -> 'success' FROM tests.seq), 'true'::jsonb, 'log_action: success true');
SELECT matches((SELECT obs -> 'r1' ->> 'timestamp' FROM tests.seq),
    '^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?Z$', 'log_action: timestamp is ISO 8601 UTC with Z');

-- The rolled-back scenario left nothing behind.
SELECT is((SELECT total_lbs_saved::text FROM bulk_sync.global_emissions WHERE id = 1), '0.000000',
    'the ledger is empty before the bulk scenario');
SELECT is((SELECT count(*) FROM bulk_sync.user_actions), 0::bigint, 'no action stored before the bulk scenario');

-- Scenario A: the seed's bulk_backfill request, verbatim with real UUIDs.
CREATE TABLE tests.bulk AS
SELECT bulk_sync.bulk_backfill($json$
{
  "actions": [
    {
      "action_id": "00000000-0000-4000-8000-0000000000a1",
      "user_id": "00000000-0000-4000-8000-000000000001",
      "lbs": "10.2",
      "logged_at": "2025-11-05T10:00:00Z",
      "verified": true
    },
    {
      "action_id": "00000000-0000-4000-8000-0000000000a2",
      "user_id": "00000000-0000-4000-8000-000000000002",
      "lbs": "10.3",
      "logged_at": "2025-11-05T10:05:00Z",
      "verified": true
    },
    {
      "action_id": "00000000-0000-4000-8000-0000000000a3",
      "user_id": "00000000-0000-4000-8000-000000000003",
      "lbs": "10.4",
      "logged_at": "2025-11-05T10:10:00Z",
      "verified": true
    }
  ],
  "idempotency_key": "optional-key"
}
$json$::jsonb) AS response;

SELECT is((SELECT response -> 'success' FROM tests.bulk), 'true'::jsonb, 'bulk: success true');
SELECT is((SELECT response -> 'inserted_count' FROM tests.bulk), '3'::jsonb, 'bulk: inserted_count 3');
SELECT is((SELECT response -> 'skipped_count' FROM tests.bulk), '0'::jsonb, 'bulk: skipped_count 0');
SELECT is((SELECT response -> 'affected_users' FROM tests.bulk), '3'::jsonb, 'bulk: affected_users 3');
SELECT is((SELECT response ->> 'global_total_lbs' FROM tests.bulk), '30.900000', 'bulk: global_total_lbs "30.900000"');
SELECT is((SELECT jsonb_typeof(response -> 'global_total_lbs') FROM tests.bulk), 'string',
    'bulk: global_total_lbs is a JSON string');
SELECT is((SELECT response ->> 'message' FROM tests.bulk), 'Bulk backfill completed: 3 inserted, 0 skipped',
    'bulk: the seed''s message');
SELECT is(tests.keys_of((SELECT response FROM tests.bulk)), tests.contract_keys_of('bulk_backfill'),
    'bulk_backfill response keys are exactly the contract''s');

SELECT is((SELECT total_lbs_saved::text FROM bulk_sync.global_emissions WHERE id = 1), '30.900000',
    'bulk: global_emissions.total_lbs_saved = 30.900000');
SELECT is((SELECT total_emissions_lbs::text FROM bulk_sync.user_stats WHERE user_id = '00000000-0000-4000-8000-000000000001'),
    '10.200000', 'bulk: user1 = 10.200000');
SELECT is((SELECT total_emissions_lbs::text FROM bulk_sync.user_stats WHERE user_id = '00000000-0000-4000-8000-000000000002'),
    '10.300000', 'bulk: user2 = 10.300000');
SELECT is((SELECT total_emissions_lbs::text FROM bulk_sync.user_stats WHERE user_id = '00000000-0000-4000-8000-000000000003'),
    '10.400000', 'bulk: user3 = 10.400000');
SELECT is((SELECT sum(total_emissions_lbs)::text FROM bulk_sync.user_stats), '30.900000',
    'bulk: SUM(user_stats) equals the global total');
SELECT is((SELECT action_count FROM bulk_sync.user_stats WHERE user_id = '00000000-0000-4000-8000-000000000002'),
    1, 'bulk: user2 has one counted action');

SELECT results_eq(
    $$SELECT rank, user_id FROM bulk_sync.leaderboard() ORDER BY user_id$$,
    $$VALUES (3::bigint, '00000000-0000-4000-8000-000000000001'::uuid),
             (2::bigint, '00000000-0000-4000-8000-000000000002'::uuid),
             (1::bigint, '00000000-0000-4000-8000-000000000003'::uuid)$$,
    'bulk: leaderboard ranks user1, user2, user3 as 3, 2, 1');
SELECT is(bulk_sync.leaderboard_json(),
    '[{"rank": 1, "user_id": "00000000-0000-4000-8000-000000000003", "total_lbs": "10.400000"},
      {"rank": 2, "user_id": "00000000-0000-4000-8000-000000000002", "total_lbs": "10.300000"},
      {"rank": 3, "user_id": "00000000-0000-4000-8000-000000000001", "total_lbs": "10.200000"}]'::jsonb,
    'bulk: leaderboard_json equals the seed''s leaderboard_order');
SELECT is(bulk_sync.global_total()::text, '30.900000', 'bulk: global_total() = 30.900000');

-- Both scenarios observe the same ledger.
SELECT is(tests.observe(), (SELECT obs - ARRAY['r1', 'r2', 'r3'] FROM tests.seq),
    'bulk and sequential loading give identical totals and leaderboard');

-- Seed unit test 2 and 3: resubmitting the same actions changes nothing.
CREATE TABLE tests.before_resubmit AS SELECT tests.observe() AS obs;
CREATE TABLE tests.resubmit AS
SELECT n, bulk_sync.log_action(body) AS response FROM tests.seed_actions;
SELECT is((SELECT array_agg(DISTINCT response ->> 'status') FROM tests.resubmit), ARRAY['duplicate'],
    'resubmitting each seed action is a duplicate');
SELECT is((SELECT array_agg(DISTINCT response -> 'is_duplicate') FROM tests.resubmit), ARRAY['true'::jsonb],
    'resubmissions carry is_duplicate true');
SELECT is(tests.observe(), (SELECT obs FROM tests.before_resubmit), 'resubmitting the seed actions changes no total');

CREATE TABLE tests.bulk_again AS
SELECT bulk_sync.bulk_backfill(jsonb_build_object('actions', (SELECT jsonb_agg(body ORDER BY n) FROM tests.seed_actions)))
       AS response;
SELECT is((SELECT response -> 'inserted_count' FROM tests.bulk_again), '0'::jsonb, 'bulk again: nothing inserted');
SELECT is((SELECT response -> 'skipped_count' FROM tests.bulk_again), '3'::jsonb, 'bulk again: all three skipped');
SELECT is((SELECT response ->> 'global_total_lbs' FROM tests.bulk_again), '30.900000', 'bulk again: global total still exact');
SELECT is(tests.observe(), (SELECT obs FROM tests.before_resubmit), 'bulk backfill of the same actions changes no total');

SELECT * FROM finish();
ROLLBACK;
