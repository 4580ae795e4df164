-- Leaderboard: order and tie-breaks, paging, user_rank, leaderboard_around, who appears, ranks that
-- follow verify / revoke / reconcile; totals as of a time; BS001 for bad paging arguments.
BEGIN;
SELECT plan(48);

CREATE SCHEMA tests;

-- Users (u1..u7 = 00000000-0000-4000-8000-00000000000N):
--   u5 30 (last 11:00)                          rank 1
--   u2 20 (one action at 09:30)                 rank 2: same total as u1, reached it first
--   u1 20 (10 at 09:00, 10 at 10:00)            rank 3
--   u3 15 (08:00), u4 15 (08:00)                ranks 4, 5: same total and time, user_id decides
--   u7 5                                        rank 6
--   u6 only an unverified action of 50          absent
-- u4 is logged before u3 so that insertion order cannot explain the tie-break.
SELECT lives_ok($$SELECT bulk_sync.bulk_backfill('{"actions": [
    {"action_id": "00000000-0000-4000-8000-0000000004a1", "user_id": "00000000-0000-4000-8000-000000000004",
     "lbs": "15", "logged_at": "2025-11-05T08:00:00Z", "verified": true},
    {"action_id": "00000000-0000-4000-8000-0000000005a1", "user_id": "00000000-0000-4000-8000-000000000005",
     "lbs": "12.5", "logged_at": "2025-11-05T07:00:00Z", "verified": true},
    {"action_id": "00000000-0000-4000-8000-0000000005a2", "user_id": "00000000-0000-4000-8000-000000000005",
     "lbs": "17.5", "logged_at": "2025-11-05T11:00:00Z", "verified": true},
    {"action_id": "00000000-0000-4000-8000-0000000007a1", "user_id": "00000000-0000-4000-8000-000000000007",
     "lbs": "5", "logged_at": "2025-11-05T06:00:00Z", "verified": true},
    {"action_id": "00000000-0000-4000-8000-0000000006a1", "user_id": "00000000-0000-4000-8000-000000000006",
     "lbs": "50", "logged_at": "2025-11-05T12:00:00Z", "verified": false}]}')$$, 'load u4, u5, u6, u7');
SELECT lives_ok($$SELECT bulk_sync.log_action('{"action_id": "00000000-0000-4000-8000-0000000003a1",
    "user_id": "00000000-0000-4000-8000-000000000003", "lbs": "15.000000", "logged_at": "2025-11-05T09:00:00+01:00",
    "verified": true}')$$, 'log u3');
SELECT lives_ok($$SELECT bulk_sync.log_action('{"action_id": "00000000-0000-4000-8000-0000000001a1",
    "user_id": "00000000-0000-4000-8000-000000000001", "lbs": "10", "logged_at": "2025-11-05T09:00:00Z", "verified": true}')$$,
    'log u1''s first action');
SELECT lives_ok($$SELECT bulk_sync.log_action('{"action_id": "00000000-0000-4000-8000-0000000001a2",
    "user_id": "00000000-0000-4000-8000-000000000001", "lbs": "10", "logged_at": "2025-11-05T10:00:00Z", "verified": true}')$$,
    'log u1''s second action');
SELECT lives_ok($$SELECT bulk_sync.log_action('{"action_id": "00000000-0000-4000-8000-0000000002a1",
    "user_id": "00000000-0000-4000-8000-000000000002", "lbs": "20", "logged_at": "2025-11-05T09:30:00Z", "verified": true}')$$,
    'log u2');

------------------------------------------------------------------------------------------------------
-- order
SELECT results_eq(
    $$SELECT rank, user_id, total_lbs::text, action_count, last_action_at FROM bulk_sync.leaderboard()$$,
    $$VALUES (1::bigint, '00000000-0000-4000-8000-000000000005'::uuid, '30.000000', 2, '2025-11-05T11:00:00Z'::timestamptz),
             (2, '00000000-0000-4000-8000-000000000002', '20.000000', 1, '2025-11-05T09:30:00Z'),
             (3, '00000000-0000-4000-8000-000000000001', '20.000000', 2, '2025-11-05T10:00:00Z'),
             (4, '00000000-0000-4000-8000-000000000003', '15.000000', 1, '2025-11-05T08:00:00Z'),
             (5, '00000000-0000-4000-8000-000000000004', '15.000000', 1, '2025-11-05T08:00:00Z'),
             (6, '00000000-0000-4000-8000-000000000007', '5.000000', 1, '2025-11-05T06:00:00Z')$$,
    'total DESC, then the latest counted logged_at ASC, then user_id; ranks without gaps; unverified-only user absent');
SELECT is((SELECT count(*) FROM bulk_sync.leaderboard(10000) WHERE user_id = '00000000-0000-4000-8000-000000000006'),
    0::bigint, 'a user with only unverified actions is not on the leaderboard');

------------------------------------------------------------------------------------------------------
-- paging
SELECT results_eq($$SELECT rank, user_id FROM bulk_sync.leaderboard(2, 2)$$,
    $$VALUES (3::bigint, '00000000-0000-4000-8000-000000000001'::uuid), (4, '00000000-0000-4000-8000-000000000003')$$,
    'leaderboard(2, 2): the third and fourth, ranks continue from the offset');
SELECT results_eq($$SELECT rank FROM bulk_sync.leaderboard(10, 4)$$, $$VALUES (5::bigint), (6)$$,
    'leaderboard(10, 4): the last two');
SELECT is_empty($$SELECT * FROM bulk_sync.leaderboard(10, 6)$$, 'an offset past the end gives no rows');
SELECT is((SELECT count(*) FROM bulk_sync.leaderboard()), 6::bigint, 'the default limit (10) covers all six');
SELECT is(bulk_sync.leaderboard_json(2, 1),
    '[{"rank": 2, "user_id": "00000000-0000-4000-8000-000000000002", "total_lbs": "20.000000"},
      {"rank": 3, "user_id": "00000000-0000-4000-8000-000000000001", "total_lbs": "20.000000"}]'::jsonb,
    'leaderboard_json(2, 1): the same page as JSON with six-decimal strings');
SELECT is(bulk_sync.leaderboard_json(5, 10), '[]'::jsonb, 'leaderboard_json past the end is an empty array');

------------------------------------------------------------------------------------------------------
-- user_rank
SELECT results_eq(
    $$SELECT rank, user_id, total_lbs::text, action_count, last_action_at
        FROM bulk_sync.user_rank('00000000-0000-4000-8000-000000000001')$$,
    $$VALUES (3::bigint, '00000000-0000-4000-8000-000000000001'::uuid, '20.000000', 2, '2025-11-05T10:00:00Z'::timestamptz)$$,
    'user_rank gives the user''s leaderboard row');
SELECT results_eq($$SELECT rank FROM bulk_sync.user_rank('00000000-0000-4000-8000-000000000004')$$, $$VALUES (5::bigint)$$,
    'user_rank agrees with the user_id tie-break');
SELECT is_empty($$SELECT * FROM bulk_sync.user_rank('00000000-0000-4000-8000-000000000006')$$,
    'user_rank: no row for a user with only unverified actions');
SELECT is_empty($$SELECT * FROM bulk_sync.user_rank('00000000-0000-4000-8000-0000000000ff')$$,
    'user_rank: no row for an unknown user');

------------------------------------------------------------------------------------------------------
-- leaderboard_around
SELECT results_eq($$SELECT rank, user_id FROM bulk_sync.leaderboard_around('00000000-0000-4000-8000-000000000003', 1)$$,
    $$VALUES (3::bigint, '00000000-0000-4000-8000-000000000001'::uuid), (4, '00000000-0000-4000-8000-000000000003'),
             (5, '00000000-0000-4000-8000-000000000004')$$,
    'leaderboard_around(u3, 1): one above, the user, one below');
SELECT results_eq($$SELECT rank FROM bulk_sync.leaderboard_around('00000000-0000-4000-8000-000000000002')$$,
    $$VALUES (1::bigint), (2), (3), (4)$$, 'leaderboard_around default radius 2, near the top: ranks 1 to 4');
SELECT results_eq($$SELECT rank, user_id FROM bulk_sync.leaderboard_around('00000000-0000-4000-8000-000000000005', 2)$$,
    $$VALUES (1::bigint, '00000000-0000-4000-8000-000000000005'::uuid), (2, '00000000-0000-4000-8000-000000000002'),
             (3, '00000000-0000-4000-8000-000000000001')$$,
    'leaderboard_around at the top: nothing above');
SELECT results_eq($$SELECT rank, user_id FROM bulk_sync.leaderboard_around('00000000-0000-4000-8000-000000000007', 2)$$,
    $$VALUES (4::bigint, '00000000-0000-4000-8000-000000000003'::uuid), (5, '00000000-0000-4000-8000-000000000004'),
             (6, '00000000-0000-4000-8000-000000000007')$$,
    'leaderboard_around at the bottom: nothing below');
SELECT results_eq($$SELECT rank, user_id, total_lbs::text FROM bulk_sync.leaderboard_around('00000000-0000-4000-8000-000000000001', 0)$$,
    $$VALUES (3::bigint, '00000000-0000-4000-8000-000000000001'::uuid, '20.000000')$$,
    'leaderboard_around with radius 0: the user alone');
SELECT is_empty($$SELECT * FROM bulk_sync.leaderboard_around('00000000-0000-4000-8000-000000000006', 2)$$,
    'leaderboard_around: no rows for a user not on the board');

------------------------------------------------------------------------------------------------------
-- totals now and as of a time
SELECT is(bulk_sync.global_total()::text, '105.000000', 'global_total() is the current total');
SELECT is(bulk_sync.global_total(NULL)::text, '105.000000', 'global_total(NULL) is the current total');
SELECT is(bulk_sync.global_total('2025-11-05T09:00:00Z')::text, '57.500000',
    'global_total(09:00) counts actions logged at or before 09:00');
SELECT is(bulk_sync.global_total('2025-11-05T05:59:59Z')::text, '0.000000', 'global_total before any action is 0');
SELECT is(bulk_sync.user_total('00000000-0000-4000-8000-000000000001')::text, '20.000000', 'user_total(u1) is current');
SELECT is(bulk_sync.user_total('00000000-0000-4000-8000-000000000001', NULL)::text, '20.000000', 'user_total(u1, NULL) is current');
SELECT is(bulk_sync.user_total('00000000-0000-4000-8000-000000000001', '2025-11-05T09:59:59Z')::text, '10.000000',
    'user_total(u1, 09:59:59) excludes the 10:00 action');
SELECT is(bulk_sync.user_total('00000000-0000-4000-8000-000000000006')::text, '0.000000',
    'user_total of a user with only unverified actions is 0');
SELECT is(bulk_sync.user_total('00000000-0000-4000-8000-0000000000ff')::text, '0.000000', 'user_total of an unknown user is 0');
SELECT is(bulk_sync.user_total('00000000-0000-4000-8000-0000000000ff', '2025-11-05T12:00:00Z')::text, '0.000000',
    'user_total of an unknown user as of a time is 0');

-- NULL means the maintained total: with simulated drift, NULL reports it while a time recomputes.
UPDATE bulk_sync.global_emissions SET total_lbs_saved = '104.000000' WHERE id = 1;
SELECT is(bulk_sync.global_total()::text, '104.000000', 'global_total(NULL) reports the maintained total');
SELECT is(bulk_sync.global_total('2100-01-01T00:00:00Z')::text, '105.000000',
    'global_total(as of a time) sums the counted actions');

------------------------------------------------------------------------------------------------------
-- ranks follow verify, revoke and reconcile
SELECT lives_ok($$SELECT bulk_sync.verify_action('00000000-0000-4000-8000-0000000006a1')$$, 'verify u6''s action');
SELECT results_eq($$SELECT rank, user_id FROM bulk_sync.leaderboard(2)$$,
    $$VALUES (1::bigint, '00000000-0000-4000-8000-000000000006'::uuid), (2, '00000000-0000-4000-8000-000000000005')$$,
    'after verification u6 leads and u5 is second');

SELECT lives_ok($$SELECT bulk_sync.revoke_action('00000000-0000-4000-8000-0000000001a2', 'photo reused')$$,
    'revoke u1''s 10:00 action');
SELECT results_eq(
    $$SELECT rank, total_lbs::text, action_count, last_action_at FROM bulk_sync.user_rank('00000000-0000-4000-8000-000000000001')$$,
    $$VALUES (6::bigint, '10.000000', 1, '2025-11-05T09:00:00Z'::timestamptz)$$,
    'after the revocation u1 has 10 at 09:00 and falls below u3 and u4');
SELECT lives_ok($$SELECT bulk_sync.revoke_action('00000000-0000-4000-8000-0000000006a1', 'not verified after all')$$,
    'revoke u6''s only action');
SELECT is_empty($$SELECT * FROM bulk_sync.user_rank('00000000-0000-4000-8000-000000000006')$$,
    'a user whose only action is revoked leaves the leaderboard');

-- drift in user_stats, fixed by reconcile, restores the right order
UPDATE bulk_sync.user_stats SET total_emissions_lbs = '1000.000000' WHERE user_id = '00000000-0000-4000-8000-000000000007';
SELECT lives_ok($$SELECT bulk_sync.reconcile()$$, 'reconcile');
SELECT results_eq($$SELECT user_id FROM bulk_sync.leaderboard()$$,
    $$VALUES ('00000000-0000-4000-8000-000000000005'::uuid), ('00000000-0000-4000-8000-000000000002'),
             ('00000000-0000-4000-8000-000000000003'), ('00000000-0000-4000-8000-000000000004'),
             ('00000000-0000-4000-8000-000000000001'), ('00000000-0000-4000-8000-000000000007')$$,
    'after reconcile the leaderboard is ordered by the counted actions again');
SELECT is(bulk_sync.global_total()::text, '95.000000', 'and the maintained global total is exact again');

------------------------------------------------------------------------------------------------------
-- bad arguments
SELECT throws_ok($$SELECT * FROM bulk_sync.leaderboard(-1)$$, 'BS001', NULL, 'leaderboard: a negative p_limit is BS001');
SELECT throws_ok($$SELECT * FROM bulk_sync.leaderboard(10, -1)$$, 'BS001', NULL, 'leaderboard: a negative p_offset is BS001');
SELECT throws_ok($$SELECT bulk_sync.leaderboard_json(-5)$$, 'BS001', NULL, 'leaderboard_json: a negative p_limit is BS001');
SELECT throws_ok($$SELECT * FROM bulk_sync.leaderboard_around('00000000-0000-4000-8000-000000000001', -1)$$,
    'BS001', NULL, 'leaderboard_around: a negative radius is BS001');

SELECT * FROM finish();
ROLLBACK;
