-- bulk_backfill: counts, in-batch duplicates, all-or-nothing on conflicts, idempotency keys,
-- the per-call limit, an empty batch, and backfilling logs older than the ones already stored.
BEGIN;
SELECT plan(75);

\ir fixtures/common.sql

-- global = SUM(user_stats) = SUM(counted actions), as three strings.
CREATE FUNCTION tests.user_total(p_user text) RETURNS text
LANGUAGE sql STABLE AS $$
    SELECT coalesce((SELECT total_emissions_lbs::text FROM bulk_sync.user_stats WHERE user_id = p_user::uuid), 'none')
$$;
CREATE FUNCTION tests.stored(p_action text) RETURNS bigint
LANGUAGE sql STABLE AS $$
    SELECT count(*) FROM bulk_sync.user_actions WHERE action_id = p_action::uuid
$$;

-- Already stored: a0 (u1, 1, verified) and p1 (u2, 2, pending).
INSERT INTO tests.responses VALUES ('a0', bulk_sync.log_action(
    '{"action_id": "00000000-0000-4000-8000-0000000000a0", "user_id": "00000000-0000-4000-8000-000000000001",
      "lbs": "1", "logged_at": "2025-11-05T12:00:00Z", "verified": true}'));
INSERT INTO tests.responses VALUES ('p1', bulk_sync.log_action(
    '{"action_id": "00000000-0000-4000-8000-0000000000c1", "user_id": "00000000-0000-4000-8000-000000000002",
      "lbs": "2", "logged_at": "2025-11-05T12:00:00Z"}'));

------------------------------------------------------------------------------------------------------
-- counts: new, in-batch duplicate, new unverified, known duplicate, verification of a pending action
CREATE TABLE tests.batch1 (actions jsonb);
INSERT INTO tests.batch1 VALUES ('[
  {"action_id": "00000000-0000-4000-8000-0000000000b1", "user_id": "00000000-0000-4000-8000-000000000001",
   "lbs": "3", "logged_at": "2025-11-05T11:00:00Z", "verified": true},
  {"action_id": "00000000-0000-4000-8000-0000000000b2", "user_id": "00000000-0000-4000-8000-000000000003",
   "lbs": "4.25", "logged_at": "2025-11-05T11:00:00Z", "verified": true},
  {"action_id": "00000000-0000-4000-8000-0000000000b2", "user_id": "00000000-0000-4000-8000-000000000003",
   "lbs": 4.250, "logged_at": "2025-11-05T12:00:00+01:00", "verified": true},
  {"action_id": "00000000-0000-4000-8000-0000000000b3", "user_id": "00000000-0000-4000-8000-000000000003",
   "lbs": "5", "logged_at": "2025-11-05T11:30:00Z"},
  {"action_id": "00000000-0000-4000-8000-0000000000a0", "user_id": "00000000-0000-4000-8000-000000000001",
   "lbs": "1.000000", "logged_at": "2025-11-05T12:00:00Z", "verified": true},
  {"action_id": "00000000-0000-4000-8000-0000000000c1", "user_id": "00000000-0000-4000-8000-000000000002",
   "lbs": "2", "logged_at": "2025-11-05T12:00:00Z", "verified": true}
]');
INSERT INTO tests.responses
SELECT 'batch1', bulk_sync.bulk_backfill(jsonb_build_object('actions', actions, 'idempotency_key', 'k1')) FROM tests.batch1;

SELECT is(tests.r('batch1') -> 'success', 'true'::jsonb, 'batch: success');
SELECT is(tests.r('batch1') -> 'inserted_count', '3'::jsonb, 'batch: b1, b2 and b3 inserted (b2 once)');
SELECT is(tests.r('batch1') -> 'verified_count', '1'::jsonb, 'batch: the pending c1 verified');
SELECT is(tests.r('batch1') -> 'skipped_count', '2'::jsonb, 'batch: the in-batch duplicate of b2 and the known a0 skipped');
SELECT is(tests.r('batch1') -> 'affected_users', '3'::jsonb, 'batch: three users'' totals changed');
SELECT is(tests.r('batch1') ->> 'global_total_lbs', '10.250000', 'batch: global = 1 + 3 + 4.25 + 2 (b3 unverified)');
SELECT is(tests.r('batch1') ->> 'idempotency_key', 'k1', 'batch: the idempotency key is echoed');
SELECT is(tests.r('batch1') -> 'replayed', 'false'::jsonb, 'batch: replayed false on the first call');
SELECT is(tests.stored('00000000-0000-4000-8000-0000000000b2'), 1::bigint, 'the in-batch duplicate is stored once');
SELECT is(tests.user_total('00000000-0000-4000-8000-000000000001'), '4.000000', 'u1 = 1 + 3');
SELECT is(tests.user_total('00000000-0000-4000-8000-000000000002'), '2.000000', 'u2 = the verified c1');
SELECT is(tests.user_total('00000000-0000-4000-8000-000000000003'), '4.250000', 'u3 = b2 counted once, b3 pending');
SELECT is((SELECT action_count FROM bulk_sync.user_stats WHERE user_id = '00000000-0000-4000-8000-000000000003'), 1,
    'u3 has one counted action');
SELECT is((SELECT verified FROM bulk_sync.user_actions WHERE action_id = '00000000-0000-4000-8000-0000000000b3'), false,
    'b3 is stored unverified');
SELECT is(tests.totals(), ARRAY['10.250000', '10.250000', '10.250000'], 'invariant after the batch');

------------------------------------------------------------------------------------------------------
-- idempotency key: replay, and reuse with other actions
SELECT tests.mark('after batch1');
INSERT INTO tests.responses
SELECT 'replay', bulk_sync.bulk_backfill(jsonb_build_object('actions', actions, 'idempotency_key', 'k1')) FROM tests.batch1;
SELECT is(tests.r('replay') -> 'replayed', 'true'::jsonb, 'replay: replayed true');
SELECT is(tests.r('replay') - 'replayed', tests.r('batch1') - 'replayed', 'replay: otherwise the first call''s response');
SELECT is(tests.fingerprint(), tests.fp('after batch1'), 'replay: nothing changed');

SELECT throws_ok(
    $$SELECT bulk_sync.bulk_backfill('{"idempotency_key": "k1", "actions": [
        {"action_id": "00000000-0000-4000-8000-0000000000b9", "user_id": "00000000-0000-4000-8000-000000000001",
         "lbs": "3", "logged_at": "2025-11-05T11:00:00Z", "verified": true}]}')$$,
    'BS003', NULL, 'the same key with other actions is BS003');
SELECT throws_ok(
    $$SELECT bulk_sync.bulk_backfill(jsonb_build_object('idempotency_key', 'k1', 'actions', actions - 0)) FROM tests.batch1$$,
    'BS003', NULL, 'the same key with a subset of the actions is BS003');
SELECT is(tests.fingerprint(), tests.fp('after batch1'), 'BS003: nothing changed');
SELECT is(tests.stored('00000000-0000-4000-8000-0000000000b9'), 0::bigint, 'BS003: the other batch''s action is not stored');

-- Without a key, the same batch is simply all duplicates. Its actions are found stored before anything
-- is written: no attempt at inserting them (which would write users' rows, then undo them).
CREATE TEMP TABLE users_written AS
SELECT n_tup_ins + n_tup_upd AS n FROM pg_stat_xact_user_tables WHERE relid = 'bulk_sync.user_stats'::regclass;
INSERT INTO tests.responses
SELECT 'no key', bulk_sync.bulk_backfill(jsonb_build_object('actions', actions)) FROM tests.batch1;
SELECT is((SELECT n_tup_ins + n_tup_upd FROM pg_stat_xact_user_tables WHERE relid = 'bulk_sync.user_stats'::regclass),
    (SELECT n FROM users_written), 'same batch without a key: no user''s row written, even to be undone');
SELECT is(tests.r('no key') -> 'inserted_count', '0'::jsonb, 'same batch without a key: nothing inserted');
SELECT is(tests.r('no key') -> 'verified_count', '0'::jsonb, 'same batch without a key: nothing verified');
SELECT is(tests.r('no key') -> 'skipped_count', '6'::jsonb, 'same batch without a key: all six skipped');
SELECT is(tests.r('no key') -> 'replayed', 'false'::jsonb, 'same batch without a key: not a replay');
SELECT is(tests.r('no key') -> 'idempotency_key', 'null'::jsonb, 'same batch without a key: idempotency_key null');
SELECT is(tests.r('no key') ->> 'global_total_lbs', '10.250000', 'same batch without a key: global unchanged');
SELECT is(tests.fingerprint(), tests.fp('after batch1'), 'same batch without a key: nothing changed');

------------------------------------------------------------------------------------------------------
-- BS002: conflicting duplicates in the batch, or a conflict with a stored action; all or nothing
SELECT throws_ok(
    $$SELECT bulk_sync.bulk_backfill('{"actions": [
        {"action_id": "00000000-0000-4000-8000-0000000000d1", "user_id": "00000000-0000-4000-8000-000000000005",
         "lbs": "1", "logged_at": "2025-11-05T11:00:00Z", "verified": true},
        {"action_id": "00000000-0000-4000-8000-0000000000d2", "user_id": "00000000-0000-4000-8000-000000000005",
         "lbs": "1", "logged_at": "2025-11-05T11:00:00Z", "verified": true},
        {"action_id": "00000000-0000-4000-8000-0000000000d1", "user_id": "00000000-0000-4000-8000-000000000005",
         "lbs": "1.5", "logged_at": "2025-11-05T11:00:00Z", "verified": true}]}')$$,
    'BS002', NULL, 'the same action_id twice in a batch with different lbs is BS002');
SELECT is(tests.fingerprint(), tests.fp('after batch1'), 'in-batch conflict: nothing changed');
SELECT is(tests.stored('00000000-0000-4000-8000-0000000000d2'), 0::bigint, 'in-batch conflict: the valid d2 is not stored');

SELECT throws_ok(
    $$SELECT bulk_sync.bulk_backfill('{"actions": [
        {"action_id": "00000000-0000-4000-8000-0000000000e1", "user_id": "00000000-0000-4000-8000-000000000006",
         "lbs": "1", "logged_at": "2025-11-05T11:00:00Z", "verified": true},
        {"action_id": "00000000-0000-4000-8000-0000000000e2", "user_id": "00000000-0000-4000-8000-000000000006",
         "lbs": "1", "logged_at": "2025-11-05T11:00:00Z", "verified": true},
        {"action_id": "00000000-0000-4000-8000-0000000000b1", "user_id": "00000000-0000-4000-8000-000000000001",
         "lbs": "3.5", "logged_at": "2025-11-05T11:00:00Z", "verified": true}]}')$$,
    'BS002', NULL, 'a conflict with a stored action is BS002');
SELECT throws_matching(
    $$SELECT bulk_sync.bulk_backfill('{"actions": [
        {"action_id": "00000000-0000-4000-8000-0000000000e1", "user_id": "00000000-0000-4000-8000-000000000006",
         "lbs": "1", "logged_at": "2025-11-05T11:00:00Z", "verified": true},
        {"action_id": "00000000-0000-4000-8000-0000000000e2", "user_id": "00000000-0000-4000-8000-000000000006",
         "lbs": "1", "logged_at": "2025-11-05T11:00:00Z", "verified": true},
        {"action_id": "00000000-0000-4000-8000-0000000000b1", "user_id": "00000000-0000-4000-8000-000000000001",
         "lbs": "3.5", "logged_at": "2025-11-05T11:00:00Z", "verified": true}]}')$$,
    '00000000-0000-4000-8000-0000000000b1', 'the BS002 message names the conflicting action_id');
SELECT throws_matching(
    $$SELECT bulk_sync.bulk_backfill('{"actions": [
        {"action_id": "00000000-0000-4000-8000-0000000000e1", "user_id": "00000000-0000-4000-8000-000000000006",
         "lbs": "1", "logged_at": "2025-11-05T11:00:00Z", "verified": true},
        {"action_id": "00000000-0000-4000-8000-0000000000e2", "user_id": "00000000-0000-4000-8000-000000000006",
         "lbs": "1", "logged_at": "2025-11-05T11:00:00Z", "verified": true},
        {"action_id": "00000000-0000-4000-8000-0000000000b1", "user_id": "00000000-0000-4000-8000-000000000001",
         "lbs": "3.5", "logged_at": "2025-11-05T11:00:00Z", "verified": true}]}')$$,
    '\m(2|3)\M', 'the BS002 message names the index (2 from 0, or 3 from 1)');
SELECT is(tests.fingerprint(), tests.fp('after batch1'), 'conflict with a stored action: nothing changed');
SELECT is(tests.stored('00000000-0000-4000-8000-0000000000e1') + tests.stored('00000000-0000-4000-8000-0000000000e2'),
    0::bigint, 'conflict with a stored action: the valid e1 and e2 of the batch are not stored');
SELECT is(tests.user_total('00000000-0000-4000-8000-000000000006'), 'none', 'conflict: the batch''s user got no stats');

-- An invalid action anywhere fails the whole batch too, naming its action_id.
SELECT throws_ok(
    $$SELECT bulk_sync.bulk_backfill('{"actions": [
        {"action_id": "00000000-0000-4000-8000-0000000000f1", "user_id": "00000000-0000-4000-8000-000000000007",
         "lbs": "1", "logged_at": "2025-11-05T11:00:00Z", "verified": true},
        {"action_id": "00000000-0000-4000-8000-0000000000f2", "user_id": "00000000-0000-4000-8000-000000000007",
         "lbs": "-1", "logged_at": "2025-11-05T11:00:00Z", "verified": true}]}')$$,
    'BS001', NULL, 'an invalid action fails the batch with BS001');
SELECT throws_matching(
    $$SELECT bulk_sync.bulk_backfill('{"actions": [
        {"action_id": "00000000-0000-4000-8000-0000000000f1", "user_id": "00000000-0000-4000-8000-000000000007",
         "lbs": "1", "logged_at": "2025-11-05T11:00:00Z", "verified": true},
        {"action_id": "00000000-0000-4000-8000-0000000000f2", "user_id": "00000000-0000-4000-8000-000000000007",
         "lbs": "-1", "logged_at": "2025-11-05T11:00:00Z", "verified": true}]}')$$,
    '00000000-0000-4000-8000-0000000000f2', 'the BS001 message names the invalid action''s action_id');
SELECT is(tests.fingerprint(), tests.fp('after batch1'), 'invalid action: nothing changed');

------------------------------------------------------------------------------------------------------
-- identical facts, one copy verified and one not: counted once
INSERT INTO tests.responses VALUES ('mixed', bulk_sync.bulk_backfill('{"actions": [
    {"action_id": "00000000-0000-4000-8000-000000000ab1", "user_id": "00000000-0000-4000-8000-000000000008",
     "lbs": "0.5", "logged_at": "2025-11-05T11:00:00Z"},
    {"action_id": "00000000-0000-4000-8000-000000000ab1", "user_id": "00000000-0000-4000-8000-000000000008",
     "lbs": "0.5", "logged_at": "2025-11-05T11:00:00Z", "verified": true}]}'));
SELECT is(tests.user_total('00000000-0000-4000-8000-000000000008'), '0.500000',
    'an action sent unverified then verified in one batch counts once');
SELECT is(tests.r('mixed') ->> 'global_total_lbs', '10.750000', 'and the global total grows by it once');

------------------------------------------------------------------------------------------------------
-- a revoked action stays revoked when a batch resubmits it verified
SELECT lives_ok($$SELECT bulk_sync.revoke_action('00000000-0000-4000-8000-0000000000b1', 'entered twice')$$, 'revoke b1');
SELECT tests.mark('after revoking b1');
INSERT INTO tests.responses VALUES ('revoked again', bulk_sync.bulk_backfill('{"actions": [
    {"action_id": "00000000-0000-4000-8000-0000000000b1", "user_id": "00000000-0000-4000-8000-000000000001",
     "lbs": "3", "logged_at": "2025-11-05T11:00:00Z", "verified": true}]}'));
SELECT is(tests.r('revoked again') -> 'verified_count', '0'::jsonb, 'a revoked action in a batch is not verified again');
SELECT is(tests.r('revoked again') -> 'skipped_count', '1'::jsonb, 'a revoked action in a batch is skipped');
SELECT is(tests.fingerprint(), tests.fp('after revoking b1'), 'a revoked action in a batch changes nothing');

------------------------------------------------------------------------------------------------------
-- the per-call limit
SELECT tests.mark('before limit');
SELECT throws_ok(
    $$SELECT bulk_sync.bulk_backfill(jsonb_build_object('actions', (
        SELECT jsonb_agg(jsonb_build_object(
                   'action_id', format('00000000-0000-4000-9000-%s', lpad(i::text, 12, '0')),
                   'user_id',   format('00000000-0000-4000-8000-%s', lpad((1000 + i % 500)::text, 12, '0')),
                   'lbs', '1.000001', 'logged_at', '2025-11-05T10:00:00Z', 'verified', true))
          FROM generate_series(1, 50001) AS i)))$$,
    'BS005', NULL, '50,001 actions are BS005');
SELECT is(tests.fingerprint(), tests.fp('before limit'), 'BS005: nothing changed');

INSERT INTO tests.responses
SELECT 'limit', bulk_sync.bulk_backfill(jsonb_build_object('actions', (
    SELECT jsonb_agg(jsonb_build_object(
               'action_id', format('00000000-0000-4000-9000-%s', lpad(i::text, 12, '0')),
               'user_id',   format('00000000-0000-4000-8000-%s', lpad((1000 + i % 500)::text, 12, '0')),
               'lbs', '1.000001', 'logged_at', '2025-11-05T10:00:00Z', 'verified', true))
      FROM generate_series(1, 50000) AS i)));
SELECT is(tests.r('limit') -> 'inserted_count', '50000'::jsonb, '50,000 actions are accepted');
SELECT is(tests.r('limit') -> 'affected_users', '500'::jsonb, '50,000 actions of 500 users: affected_users 500');
SELECT is(tests.r('limit') ->> 'global_total_lbs', '50007.800000', '50,000 x 1.000001 added exactly');
SELECT is(tests.user_total('00000000-0000-4000-8000-000000001000'), '100.000100', 'each of the 500 users got 100 actions exactly');
SELECT is(tests.totals(), ARRAY['50007.800000', '50007.800000', '50007.800000'], 'invariant after 50,000 actions');

------------------------------------------------------------------------------------------------------
-- an empty batch
SELECT tests.mark('before empty');
INSERT INTO tests.responses VALUES ('empty', bulk_sync.bulk_backfill('{"actions": []}'));
SELECT is(tests.r('empty') -> 'success', 'true'::jsonb, 'empty batch: success');
SELECT is(tests.r('empty') -> 'inserted_count', '0'::jsonb, 'empty batch: nothing inserted');
SELECT is(tests.r('empty') -> 'skipped_count', '0'::jsonb, 'empty batch: nothing skipped');
SELECT is(tests.r('empty') -> 'affected_users', '0'::jsonb, 'empty batch: no user affected');
SELECT is(tests.r('empty') ->> 'global_total_lbs', '50007.800000', 'empty batch: reports the global total');
SELECT is(tests.fingerprint(), tests.fp('before empty'), 'empty batch: nothing changed');

------------------------------------------------------------------------------------------------------
-- backfill of older logs (seed integration test 1)
SELECT is(bulk_sync.global_total('2025-10-31T23:59:59Z')::text, '0.000000', 'nothing was logged before November');
INSERT INTO tests.responses VALUES ('older', bulk_sync.bulk_backfill('{"actions": [
    {"action_id": "00000000-0000-4000-8000-000000000cd1", "user_id": "00000000-0000-4000-8000-000000000001",
     "lbs": "0.111111", "logged_at": "2025-10-01T08:00:00Z", "verified": true},
    {"action_id": "00000000-0000-4000-8000-000000000cd2", "user_id": "00000000-0000-4000-8000-000000000002",
     "lbs": "0.222222", "logged_at": "2025-10-15T08:00:00-04:00", "verified": true},
    {"action_id": "00000000-0000-4000-8000-000000000cd3", "user_id": "00000000-0000-4000-8000-000000000002",
     "lbs": "9", "logged_at": "2025-10-20T08:00:00Z"}]}'));
SELECT is(tests.r('older') -> 'inserted_count', '3'::jsonb, 'older logs: three inserted');
SELECT is(tests.r('older') ->> 'global_total_lbs', '50008.133333', 'older logs: the global total grows by the verified ones');
SELECT is(tests.totals(), ARRAY['50008.133333', '50008.133333', '50008.133333'],
    'older logs: global = SUM(user_stats) = SUM(counted actions)');
SELECT is(bulk_sync.global_total('2025-10-01T08:00:00Z')::text, '0.111111', 'global_total(as_of) includes logged_at = as_of');
SELECT is(bulk_sync.global_total('2025-10-01T07:59:59.999999Z')::text, '0.000000', 'global_total(as_of) excludes later logs');
SELECT is(bulk_sync.global_total('2025-10-31T00:00:00Z')::text, '0.333333',
    'global_total(as_of) counts the verified October logs, not the pending one');
SELECT is(bulk_sync.user_total('00000000-0000-4000-8000-000000000002', '2025-11-05T11:59:59Z')::text, '0.222222',
    'user_total(as_of) respects logged_at');
SELECT results_eq(
    $$SELECT action_id, logged_at FROM bulk_sync.user_actions
       WHERE action_id IN ('00000000-0000-4000-8000-000000000cd1', '00000000-0000-4000-8000-000000000cd2')
       ORDER BY logged_at$$,
    $$VALUES ('00000000-0000-4000-8000-000000000cd1'::uuid, '2025-10-01T08:00:00Z'::timestamptz),
             ('00000000-0000-4000-8000-000000000cd2'::uuid, '2025-10-15T12:00:00Z'::timestamptz)$$,
    'older logs keep their own logged_at');
SELECT is((SELECT last_action_at FROM bulk_sync.user_stats WHERE user_id = '00000000-0000-4000-8000-000000000001'),
    '2025-11-05T12:00:00Z'::timestamptz, 'an older log does not move the user''s last_action_at back');

------------------------------------------------------------------------------------------------------
-- A batch of valid actions of which none is stored is taken for new, each once, and inserted at once.
-- Counting a repeated action more than once can carry a user past 10^24 before the INSERT finds the
-- repeat: that attempt is undone and the batch is counted as it really is.
INSERT INTO tests.responses VALUES ('big', bulk_sync.bulk_backfill('{"actions": [
    {"action_id": "00000000-0000-4000-8000-000000000e01", "user_id": "00000000-0000-4000-8000-0000000000e0",
     "lbs": "400000000000000000000000", "logged_at": "2025-11-01T00:00:00Z", "verified": true}]}'));
INSERT INTO tests.responses VALUES ('big again', bulk_sync.bulk_backfill('{"actions": [
    {"action_id": "00000000-0000-4000-8000-000000000e02", "user_id": "00000000-0000-4000-8000-0000000000e0",
     "lbs": "200000000000000000000000", "logged_at": "2025-11-02T00:00:00Z", "verified": true},
    {"action_id": "00000000-0000-4000-8000-000000000e03", "user_id": "00000000-0000-4000-8000-0000000000e9",
     "lbs": "340000000000000000000000", "logged_at": "2025-11-02T00:00:00Z", "verified": true},
    {"action_id": "00000000-0000-4000-8000-000000000e03", "user_id": "00000000-0000-4000-8000-0000000000e9",
     "lbs": "340000000000000000000000", "logged_at": "2025-11-02T00:00:00Z", "verified": true},
    {"action_id": "00000000-0000-4000-8000-000000000e03", "user_id": "00000000-0000-4000-8000-0000000000e9",
     "lbs": "340000000000000000000000", "logged_at": "2025-11-02T00:00:00Z", "verified": true},
    {"action_id": "00000000-0000-4000-8000-000000000e03", "user_id": "00000000-0000-4000-8000-0000000000e9",
     "lbs": "340000000000000000000000", "logged_at": "2025-11-02T00:00:00Z", "verified": true}]}'));
SELECT is(tests.r('big again') - 'global_total_lbs' - 'message',
    '{"success": true, "inserted_count": 2, "skipped_count": 3, "verified_count": 0, "affected_users": 2,
      "idempotency_key": null, "replayed": false}'::jsonb,
    'a repeated action that would overflow if counted four times counts once');
SELECT is(tests.user_total('00000000-0000-4000-8000-0000000000e0'), '600000000000000000000000.000000',
    'the other user''s action counted');
SELECT is(tests.user_total('00000000-0000-4000-8000-0000000000e9'), '340000000000000000000000.000000',
    'the repeated action counted once');
SELECT is(tests.totals(), ARRAY['940000000000000000050008.133333', '940000000000000000050008.133333',
                                '940000000000000000050008.133333'],
    'after the undone attempt: global = SUM(user_stats) = SUM(counted actions)');

SELECT * FROM finish();
ROLLBACK;
