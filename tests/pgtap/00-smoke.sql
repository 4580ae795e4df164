-- Smoke test: the schema and every contract function exist, and the seed's
-- example scenario (three verified actions via bulk_backfill) gives 30.900000.
BEGIN;
SELECT plan(19);

SELECT has_schema('bulk_sync', 'schema bulk_sync exists');

-- Contract functions (API.md section 3), with their exact argument types.
SELECT has_function('bulk_sync', 'log_action', ARRAY['jsonb'], 'log_action(jsonb)');
SELECT has_function('bulk_sync', 'log_action',
    ARRAY['uuid', 'uuid', 'numeric', 'timestamp with time zone', 'boolean', 'jsonb'],
    'log_action(uuid, uuid, numeric, timestamptz, boolean, jsonb)');
SELECT has_function('bulk_sync', 'bulk_backfill', ARRAY['jsonb'], 'bulk_backfill(jsonb)');
SELECT has_function('bulk_sync', 'reconcile', ARRAY['jsonb'], 'reconcile(jsonb)');
SELECT has_function('bulk_sync', 'verify_action', ARRAY['uuid', 'text'], 'verify_action(uuid, text)');
SELECT has_function('bulk_sync', 'revoke_action', ARRAY['uuid', 'text', 'text'], 'revoke_action(uuid, text, text)');
SELECT has_function('bulk_sync', 'leaderboard', ARRAY['integer', 'integer'], 'leaderboard(int, int)');
SELECT has_function('bulk_sync', 'user_rank', ARRAY['uuid'], 'user_rank(uuid)');
SELECT has_function('bulk_sync', 'leaderboard_around', ARRAY['uuid', 'integer'], 'leaderboard_around(uuid, int)');
SELECT has_function('bulk_sync', 'leaderboard_json', ARRAY['integer', 'integer'], 'leaderboard_json(int, int)');
SELECT has_function('bulk_sync', 'global_total', ARRAY['timestamp with time zone'], 'global_total(timestamptz)');
SELECT has_function('bulk_sync', 'user_total', ARRAY['uuid', 'timestamp with time zone'], 'user_total(uuid, timestamptz)');
SELECT has_function('bulk_sync', 'events_since', ARRAY['bigint', 'integer'], 'events_since(bigint, int)');

-- The seed's bulk_backfill request, verbatim but for real UUIDs.
CREATE SCHEMA tests;
CREATE TABLE tests.smoke_backfill AS
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
  "idempotency_key": "smoke-seed"
}
$json$::jsonb) AS response;

SELECT is((SELECT response ->> 'inserted_count' FROM tests.smoke_backfill), '3',
    'bulk_backfill inserts the three seed actions');
SELECT is((SELECT response ->> 'global_total_lbs' FROM tests.smoke_backfill), '30.900000',
    'bulk_backfill reports the exact global total');
SELECT is((SELECT total_lbs_saved::text FROM bulk_sync.global_emissions WHERE id = 1), '30.900000',
    'global_emissions holds the exact total');
SELECT results_eq(
    $$SELECT user_id, total_emissions_lbs::text FROM bulk_sync.user_stats ORDER BY user_id$$,
    $$VALUES ('00000000-0000-4000-8000-000000000001'::uuid, '10.200000'),
             ('00000000-0000-4000-8000-000000000002'::uuid, '10.300000'),
             ('00000000-0000-4000-8000-000000000003'::uuid, '10.400000')$$,
    'user_stats holds each user''s exact total');
SELECT results_eq(
    $$SELECT rank, user_id, total_lbs::text FROM bulk_sync.leaderboard()$$,
    $$VALUES (1::bigint, '00000000-0000-4000-8000-000000000003'::uuid, '10.400000'),
             (2::bigint, '00000000-0000-4000-8000-000000000002'::uuid, '10.300000'),
             (3::bigint, '00000000-0000-4000-8000-000000000001'::uuid, '10.200000')$$,
    'leaderboard ranks the seed users by total');

SELECT * FROM finish();
ROLLBACK;
