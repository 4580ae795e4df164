-- verify_action / revoke_action: statuses, totals / action_count / last_action_at moving atomically,
-- and an audit row in action_transitions (who, why, from, to, via) for every transition.
BEGIN;
SELECT plan(63);

\ir fixtures/common.sql

-- global = SUM(user_stats) = SUM(counted actions), as three strings.
-- u1's stats as (total, action_count, last_action_at).
CREATE FUNCTION tests.u1() RETURNS TABLE (total text, n integer, last_at timestamptz)
LANGUAGE sql STABLE AS $$
    SELECT total_emissions_lbs::text, action_count, last_action_at
      FROM bulk_sync.user_stats WHERE user_id = '00000000-0000-4000-8000-000000000001'
$$;

CREATE FUNCTION tests.transitions(p_action text) RETURNS bigint
LANGUAGE sql STABLE AS $$ SELECT count(*) FROM bulk_sync.action_transitions WHERE action_id = p_action::uuid $$;

CREATE FUNCTION tests.keys(p_name text) RETURNS text[]
LANGUAGE sql STABLE AS $$ SELECT array_agg(k ORDER BY k) FROM jsonb_object_keys(tests.r(p_name)) AS k $$;

-- Actions of u1: a1 pending 5 at 10:00, a2 verified 3 at 11:00, a3 pending 7 at 12:00.
-- u2: b1 verified 1 at 09:00 (unaffected bystander).
SELECT lives_ok($$SELECT bulk_sync.bulk_backfill('{"actions": [
    {"action_id": "00000000-0000-4000-8000-0000000000a1", "user_id": "00000000-0000-4000-8000-000000000001",
     "lbs": "5", "logged_at": "2025-11-05T10:00:00Z"},
    {"action_id": "00000000-0000-4000-8000-0000000000a2", "user_id": "00000000-0000-4000-8000-000000000001",
     "lbs": "3", "logged_at": "2025-11-05T11:00:00Z", "verified": true},
    {"action_id": "00000000-0000-4000-8000-0000000000a3", "user_id": "00000000-0000-4000-8000-000000000001",
     "lbs": "7", "logged_at": "2025-11-05T12:00:00Z"},
    {"action_id": "00000000-0000-4000-8000-0000000000b1", "user_id": "00000000-0000-4000-8000-000000000002",
     "lbs": "1", "logged_at": "2025-11-05T09:00:00Z", "verified": true}]}')$$, 'fixture loaded');
SELECT results_eq($$SELECT * FROM tests.u1()$$, $$VALUES ('3.000000', 1, '2025-11-05T11:00:00Z'::timestamptz)$$,
    'before: u1 counts only a2');

------------------------------------------------------------------------------------------------------
-- verify
INSERT INTO tests.responses VALUES ('verify a1', bulk_sync.verify_action('00000000-0000-4000-8000-0000000000a1'));
SELECT is(tests.keys('verify a1'), ARRAY['action_id', 'global_total_lbs', 'status', 'success', 'user_id', 'user_total_lbs'],
    'verify_action: response keys exactly success, action_id, user_id, status, user_total_lbs, global_total_lbs');
SELECT is(tests.r('verify a1') ->> 'status', 'verified', 'verify a pending action: status verified');
SELECT is(tests.r('verify a1') -> 'success', 'true'::jsonb, 'verify: success');
SELECT is(tests.r('verify a1') ->> 'action_id', '00000000-0000-4000-8000-0000000000a1', 'verify: action_id');
SELECT is(tests.r('verify a1') ->> 'user_id', '00000000-0000-4000-8000-000000000001', 'verify: the action''s user_id');
SELECT is(tests.r('verify a1') ->> 'user_total_lbs', '8.000000', 'verify: user total includes the action');
SELECT is(tests.r('verify a1') ->> 'global_total_lbs', '9.000000', 'verify: global total includes the action');
SELECT results_eq($$SELECT * FROM tests.u1()$$, $$VALUES ('8.000000', 2, '2025-11-05T11:00:00Z'::timestamptz)$$,
    'verify an older action: total and count move, last_action_at stays the latest (11:00)');
SELECT is(tests.totals(), ARRAY['9.000000', '9.000000', '9.000000'], 'verify: global = SUM(user_stats) = SUM(counted)');
SELECT results_eq(
    $$SELECT user_id, from_status, to_status, reason, performed_by, via FROM bulk_sync.action_transitions
       WHERE action_id = '00000000-0000-4000-8000-0000000000a1'$$,
    $$VALUES ('00000000-0000-4000-8000-000000000001'::uuid, 'pending', 'verified', NULL::text, (session_user::text COLLATE "default"), 'verify_action')$$,
    'verify: one transition pending -> verified, performed_by defaults to session_user, via verify_action');
SELECT is((SELECT performed_at FROM bulk_sync.action_transitions WHERE action_id = '00000000-0000-4000-8000-0000000000a1'),
    now(), 'verify: the transition is timestamped in this transaction');

INSERT INTO tests.responses VALUES ('verify a1 again',
    bulk_sync.verify_action('00000000-0000-4000-8000-0000000000a1', 'moderator-2'));
SELECT is(tests.r('verify a1 again') ->> 'status', 'already_verified', 'verify again: status already_verified');
SELECT is(tests.r('verify a1 again') ->> 'user_total_lbs', '8.000000', 'verify again: user total unchanged');
SELECT is(tests.r('verify a1 again') ->> 'global_total_lbs', '9.000000', 'verify again: global total unchanged');
SELECT is(tests.transitions('00000000-0000-4000-8000-0000000000a1'), 1::bigint, 'verify again: no new transition');
SELECT is(tests.keys('verify a1 again'), tests.keys('verify a1'), 'already_verified: same response keys');

------------------------------------------------------------------------------------------------------
-- verify a3 (the latest) with an explicit performer
INSERT INTO tests.responses VALUES ('verify a3', bulk_sync.verify_action('00000000-0000-4000-8000-0000000000a3', 'moderator-7'));
SELECT is(tests.r('verify a3') ->> 'user_total_lbs', '15.000000', 'verify the latest action: user total');
SELECT results_eq($$SELECT * FROM tests.u1()$$, $$VALUES ('15.000000', 3, '2025-11-05T12:00:00Z'::timestamptz)$$,
    'verify the latest action: last_action_at moves forward to 12:00');
SELECT is((SELECT performed_by FROM bulk_sync.action_transitions WHERE action_id = '00000000-0000-4000-8000-0000000000a3'),
    'moderator-7', 'verify: p_performed_by is recorded');

------------------------------------------------------------------------------------------------------
-- revoke
INSERT INTO tests.responses VALUES ('revoke a3',
    bulk_sync.revoke_action('00000000-0000-4000-8000-0000000000a3', 'photo reused from another action', 'auditor-1'));
SELECT is(tests.keys('revoke a3'), ARRAY['action_id', 'global_total_lbs', 'status', 'success', 'user_id', 'user_total_lbs'],
    'revoke_action: response keys exactly success, action_id, user_id, status, user_total_lbs, global_total_lbs');
SELECT is(tests.r('revoke a3') ->> 'status', 'revoked', 'revoke a verified action: status revoked');
SELECT is(tests.r('revoke a3') ->> 'user_id', '00000000-0000-4000-8000-000000000001', 'revoke: the action''s user_id');
SELECT is(tests.r('revoke a3') ->> 'user_total_lbs', '8.000000', 'revoke: user total drops by the action');
SELECT is(tests.r('revoke a3') ->> 'global_total_lbs', '9.000000', 'revoke: global total drops by the action');
SELECT results_eq($$SELECT * FROM tests.u1()$$, $$VALUES ('8.000000', 2, '2025-11-05T11:00:00Z'::timestamptz)$$,
    'revoke the latest action: count drops and last_action_at moves back to the previous counted action (11:00)');
SELECT is(tests.totals(), ARRAY['9.000000', '9.000000', '9.000000'], 'revoke: global = SUM(user_stats) = SUM(counted)');
SELECT results_eq(
    $$SELECT user_id, from_status, to_status, reason, performed_by, via FROM bulk_sync.action_transitions
       WHERE action_id = '00000000-0000-4000-8000-0000000000a3' ORDER BY transition_id$$,
    $$VALUES ('00000000-0000-4000-8000-000000000001'::uuid, 'pending', 'verified', NULL::text, 'moderator-7', 'verify_action'),
             ('00000000-0000-4000-8000-000000000001'::uuid, 'verified', 'revoked', 'photo reused from another action',
              'auditor-1', 'revoke_action')$$,
    'revoke: transition verified -> revoked with its reason, performer and function');
SELECT is((SELECT revoked FROM bulk_sync.user_actions WHERE action_id = '00000000-0000-4000-8000-0000000000a3'), true,
    'revoke: the action is marked revoked');

INSERT INTO tests.responses VALUES ('revoke a3 again',
    bulk_sync.revoke_action('00000000-0000-4000-8000-0000000000a3', 'second report'));
SELECT is(tests.r('revoke a3 again') ->> 'status', 'already_revoked', 'revoke again: status already_revoked');
SELECT is(tests.r('revoke a3 again') ->> 'user_total_lbs', '8.000000', 'revoke again: user total unchanged');
SELECT is(tests.r('revoke a3 again') ->> 'global_total_lbs', '9.000000', 'revoke again: global total unchanged');
SELECT is(tests.transitions('00000000-0000-4000-8000-0000000000a3'), 2::bigint, 'revoke again: no new transition');

SELECT throws_ok($$SELECT bulk_sync.verify_action('00000000-0000-4000-8000-0000000000a3')$$, 'BS006', NULL,
    'verifying a revoked action is BS006');
SELECT results_eq($$SELECT * FROM tests.u1()$$, $$VALUES ('8.000000', 2, '2025-11-05T11:00:00Z'::timestamptz)$$,
    'BS006: u1 unchanged');
SELECT is(tests.transitions('00000000-0000-4000-8000-0000000000a3'), 2::bigint, 'BS006: no transition recorded');

------------------------------------------------------------------------------------------------------
-- revoke a pending action: no total moves, but the transition is recorded
SELECT lives_ok($$SELECT bulk_sync.log_action('{"action_id": "00000000-0000-4000-8000-0000000000a4",
    "user_id": "00000000-0000-4000-8000-000000000001", "lbs": "100", "logged_at": "2025-11-05T13:00:00Z"}')$$,
    'log a pending a4');
INSERT INTO tests.responses VALUES ('revoke a4', bulk_sync.revoke_action('00000000-0000-4000-8000-0000000000a4', 'spam'));
SELECT is(tests.r('revoke a4') ->> 'status', 'revoked', 'revoke a pending action: status revoked');
SELECT is(tests.r('revoke a4') ->> 'user_total_lbs', '8.000000', 'revoke a pending action: user total unchanged');
SELECT results_eq($$SELECT * FROM tests.u1()$$, $$VALUES ('8.000000', 2, '2025-11-05T11:00:00Z'::timestamptz)$$,
    'revoke a pending action: count and last_action_at unchanged');
SELECT results_eq(
    $$SELECT from_status, to_status, reason, performed_by, via FROM bulk_sync.action_transitions
       WHERE action_id = '00000000-0000-4000-8000-0000000000a4'$$,
    $$VALUES ('pending', 'revoked', 'spam', (session_user::text COLLATE "default"), 'revoke_action')$$,
    'revoke a pending action: transition pending -> revoked, performed_by defaults to session_user');
SELECT throws_ok($$SELECT bulk_sync.verify_action('00000000-0000-4000-8000-0000000000a4')$$, 'BS006', NULL,
    'verifying a revoked pending action is BS006');

------------------------------------------------------------------------------------------------------
-- revoke everything a user has: the user leaves the leaderboard
INSERT INTO tests.responses VALUES ('revoke a2', bulk_sync.revoke_action('00000000-0000-4000-8000-0000000000a2', 'duplicate'));
SELECT results_eq($$SELECT * FROM tests.u1()$$, $$VALUES ('5.000000', 1, '2025-11-05T10:00:00Z'::timestamptz)$$,
    'revoke a2: last_action_at moves back to a1 at 10:00');
INSERT INTO tests.responses VALUES ('revoke a1', bulk_sync.revoke_action('00000000-0000-4000-8000-0000000000a1', 'duplicate'));
SELECT is(tests.r('revoke a1') ->> 'user_total_lbs', '0.000000', 'revoking the last counted action: user total 0.000000');
SELECT is(tests.r('revoke a1') ->> 'global_total_lbs', '1.000000', 'revoking the last counted action: only u2 remains');
SELECT results_eq($$SELECT total, n FROM tests.u1()$$, $$VALUES ('0.000000', 0)$$,
    'revoking the last counted action: total 0 and action_count 0');
SELECT is((SELECT last_action_at FROM bulk_sync.user_stats WHERE user_id = '00000000-0000-4000-8000-000000000001'), NULL,
    'revoking the last counted action: no last_action_at');
SELECT is_empty($$SELECT * FROM bulk_sync.user_rank('00000000-0000-4000-8000-000000000001')$$,
    'a user with no counted action is off the leaderboard');
SELECT is(tests.totals(), ARRAY['1.000000', '1.000000', '1.000000'], 'after all revocations: invariant holds');
SELECT results_eq(
    $$SELECT total_emissions_lbs::text, action_count FROM bulk_sync.user_stats WHERE user_id = '00000000-0000-4000-8000-000000000002'$$,
    $$VALUES ('1.000000', 1)$$, 'the other user was never touched');

------------------------------------------------------------------------------------------------------
-- transitions made by log_action and bulk_backfill resubmissions are recorded too
SELECT lives_ok($$SELECT bulk_sync.log_action('{"action_id": "00000000-0000-4000-8000-0000000000c1",
    "user_id": "00000000-0000-4000-8000-000000000003", "lbs": "2", "logged_at": "2025-11-05T10:00:00Z"}')$$, 'log pending c1');
SELECT lives_ok($$SELECT bulk_sync.log_action('{"action_id": "00000000-0000-4000-8000-0000000000c1",
    "user_id": "00000000-0000-4000-8000-000000000003", "lbs": "2", "logged_at": "2025-11-05T10:00:00Z", "verified": true}')$$,
    'verify c1 by a verified resubmission');
SELECT results_eq(
    $$SELECT from_status, to_status, via FROM bulk_sync.action_transitions WHERE action_id = '00000000-0000-4000-8000-0000000000c1'$$,
    $$VALUES ('pending', 'verified', 'log_action')$$, 'a verification by log_action is recorded');
SELECT lives_ok($$SELECT bulk_sync.log_action('{"action_id": "00000000-0000-4000-8000-0000000000c2",
    "user_id": "00000000-0000-4000-8000-000000000003", "lbs": "2", "logged_at": "2025-11-05T10:00:00Z"}')$$, 'log pending c2');
SELECT lives_ok($$SELECT bulk_sync.bulk_backfill('{"actions": [{"action_id": "00000000-0000-4000-8000-0000000000c2",
    "user_id": "00000000-0000-4000-8000-000000000003", "lbs": "2", "logged_at": "2025-11-05T10:00:00Z", "verified": true}]}')$$,
    'verify c2 by a verified bulk resubmission');
SELECT results_eq(
    $$SELECT from_status, to_status, via FROM bulk_sync.action_transitions WHERE action_id = '00000000-0000-4000-8000-0000000000c2'$$,
    $$VALUES ('pending', 'verified', 'bulk_backfill')$$, 'a verification by bulk_backfill is recorded');
SELECT is(tests.totals(), ARRAY['5.000000', '5.000000', '5.000000'], 'invariant holds at the end');

------------------------------------------------------------------------------------------------------
-- errors
SELECT throws_ok($$SELECT bulk_sync.verify_action('00000000-0000-4000-8000-0000000000ff')$$, 'BS004', NULL,
    'verify an unknown action: BS004');
SELECT throws_ok($$SELECT bulk_sync.revoke_action('00000000-0000-4000-8000-0000000000ff', 'why not')$$, 'BS004', NULL,
    'revoke an unknown action: BS004');
SELECT throws_ok($$SELECT bulk_sync.revoke_action('00000000-0000-4000-8000-0000000000b1', '')$$, 'BS001', NULL,
    'revoke with an empty reason: BS001');
SELECT is(tests.transitions('00000000-0000-4000-8000-0000000000b1'), 0::bigint, 'the rejected revocation recorded nothing');
SELECT is((SELECT revoked FROM bulk_sync.user_actions WHERE action_id = '00000000-0000-4000-8000-0000000000b1'), false,
    'the rejected revocation left the action counted');

SELECT * FROM finish();
ROLLBACK;
