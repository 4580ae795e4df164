-- log_action, both forms: statuses inserted / duplicate / verified, numerically equal resubmissions,
-- BS002 for changed facts (nothing changes), revocation is final, timestamps in UTC with Z.
BEGIN;
SELECT plan(88);

\ir fixtures/common.sql

-- Users and actions.
-- u1 00000000-0000-4000-8000-000000000001, u2 ...0002, u9 ...0009 (never used by a stored action)
-- a1 verified 10.2 by u1; a2 unverified 5.5 by u2; a3 verified 2 by u1, revoked; a4 pending, revoked.

------------------------------------------------------------------------------------------------------
-- inserted
INSERT INTO tests.responses VALUES ('a1', bulk_sync.log_action(
    '{"action_id": "00000000-0000-4000-8000-0000000000a1", "user_id": "00000000-0000-4000-8000-000000000001",
      "lbs": "10.2", "logged_at": "2025-11-05T10:00:00Z", "verified": true, "metadata": {"source": "app"}}'));

SELECT is(tests.r('a1') ->> 'status', 'inserted', 'new verified action: status inserted');
SELECT is(tests.r('a1') -> 'is_duplicate', 'false'::jsonb, 'new verified action: is_duplicate false');
SELECT is(tests.r('a1') ->> 'action_id', '00000000-0000-4000-8000-0000000000a1', 'response names the action_id');
SELECT is(tests.r('a1') ->> 'user_id', '00000000-0000-4000-8000-000000000001', 'response names the user_id');
SELECT is(tests.r('a1') ->> 'emissions_lbs', '10.200000', 'emissions_lbs has six decimals');
SELECT is(tests.r('a1') ->> 'user_total_lbs', '10.200000', 'user_total_lbs after the first action');
SELECT is(tests.r('a1') ->> 'global_total_lbs', '10.200000', 'global_total_lbs after the first action');
SELECT matches(tests.r('a1') ->> 'timestamp', 'Z$', 'timestamp ends with Z');
SELECT results_eq(
    $$SELECT user_id, emissions_saved_lbs::text, verified, logged_at, metadata
        FROM bulk_sync.user_actions WHERE action_id = '00000000-0000-4000-8000-0000000000a1'$$,
    $$VALUES ('00000000-0000-4000-8000-000000000001'::uuid, '10.200000', true,
              '2025-11-05T10:00:00Z'::timestamptz, '{"source": "app"}'::jsonb)$$,
    'the stored action carries the submitted facts');
SELECT is(tests.totals(), ARRAY['10.200000', '10.200000', '10.200000'], 'global = SUM(user_stats) = SUM(counted actions)');

------------------------------------------------------------------------------------------------------
-- duplicate: identical facts, in other spellings
SELECT tests.mark('after a1');

INSERT INTO tests.responses VALUES ('a1 number', bulk_sync.log_action(
    '{"action_id": "00000000-0000-4000-8000-0000000000a1", "user_id": "00000000-0000-4000-8000-000000000001",
      "lbs": 10.20, "logged_at": "2025-11-05T10:00:00Z", "verified": true, "metadata": {"source": "app"}}'));
SELECT is(tests.r('a1 number') ->> 'status', 'duplicate', 'lbs 10.20 (JSON number) equals "10.2": status duplicate');
SELECT is(tests.r('a1 number') -> 'is_duplicate', 'true'::jsonb, 'duplicate: is_duplicate true');
SELECT is(tests.r('a1 number') ->> 'user_total_lbs', '10.200000', 'duplicate: user total unchanged');
SELECT is(tests.r('a1 number') ->> 'global_total_lbs', '10.200000', 'duplicate: global total unchanged');
SELECT matches(tests.r('a1 number') ->> 'timestamp', 'Z$', 'duplicate: timestamp ends with Z');

INSERT INTO tests.responses VALUES ('a1 offset', bulk_sync.log_action(
    '{"action_id": "00000000-0000-4000-8000-0000000000a1", "user_id": "00000000-0000-4000-8000-000000000001",
      "lbs": "10.200000", "logged_at": "2025-11-05T11:00:00+01:00", "verified": true}'));
SELECT is(tests.r('a1 offset') ->> 'status', 'duplicate',
    'the same instant with another zone offset and lbs "10.200000" is a duplicate');

INSERT INTO tests.responses VALUES ('a1 unverified', bulk_sync.log_action(
    '{"action_id": "00000000-0000-4000-8000-0000000000a1", "user_id": "00000000-0000-4000-8000-000000000001",
      "lbs": "10.2", "logged_at": "2025-11-05T10:00:00Z", "verified": false}'));
SELECT is(tests.r('a1 unverified') ->> 'status', 'duplicate',
    'an unverified resubmission of a verified action is a duplicate');

INSERT INTO tests.responses VALUES ('a1 metadata', bulk_sync.log_action(
    '{"action_id": "00000000-0000-4000-8000-0000000000a1", "user_id": "00000000-0000-4000-8000-000000000001",
      "lbs": "10.2", "logged_at": "2025-11-05T10:00:00Z", "verified": true, "metadata": {"source": "replay"}}'));
SELECT is(tests.r('a1 metadata') ->> 'status', 'duplicate', 'a resubmission with other metadata is a duplicate');

SELECT is(tests.fingerprint(), tests.fp('after a1'), 'the four duplicate submissions changed nothing');

------------------------------------------------------------------------------------------------------
-- an unverified insert does not count; a verified resubmission counts it once
INSERT INTO tests.responses VALUES ('a2', bulk_sync.log_action(
    '{"action_id": "00000000-0000-4000-8000-0000000000a2", "user_id": "00000000-0000-4000-8000-000000000002",
      "lbs": "5.5", "logged_at": "2025-11-05T09:00:00Z"}'));
SELECT is(tests.r('a2') ->> 'status', 'inserted', 'new unverified action (verified defaults to false): status inserted');
SELECT is(tests.r('a2') -> 'is_duplicate', 'false'::jsonb, 'new unverified action: is_duplicate false');
SELECT is(tests.r('a2') ->> 'user_total_lbs', '0.000000', 'an unverified action does not count for its user');
SELECT is(tests.r('a2') ->> 'global_total_lbs', '10.200000', 'an unverified action does not count globally');
SELECT is((SELECT verified FROM bulk_sync.user_actions WHERE action_id = '00000000-0000-4000-8000-0000000000a2'), false,
    'the action is stored unverified');
SELECT is(tests.totals(), ARRAY['10.200000', '10.200000', '10.200000'], 'invariant holds after an unverified insert');

SELECT tests.mark('after a2');
INSERT INTO tests.responses VALUES ('a2 again', bulk_sync.log_action(
    '{"action_id": "00000000-0000-4000-8000-0000000000a2", "user_id": "00000000-0000-4000-8000-000000000002",
      "lbs": "5.5", "logged_at": "2025-11-05T09:00:00Z", "verified": false}'));
SELECT is(tests.r('a2 again') ->> 'status', 'duplicate', 'unverified resubmission of an unverified action: duplicate');
SELECT is(tests.fingerprint(), tests.fp('after a2'), 'the unverified resubmission changed nothing');

INSERT INTO tests.responses VALUES ('a2 verified', bulk_sync.log_action(
    '{"action_id": "00000000-0000-4000-8000-0000000000a2", "user_id": "00000000-0000-4000-8000-000000000002",
      "lbs": "5.50", "logged_at": "2025-11-05T09:00:00Z", "verified": true}'));
SELECT is(tests.r('a2 verified') ->> 'status', 'verified', 'verified resubmission of an unverified action: status verified');
SELECT is(tests.r('a2 verified') -> 'is_duplicate', 'true'::jsonb, 'status verified: is_duplicate true');
SELECT is(tests.r('a2 verified') ->> 'user_total_lbs', '5.500000', 'the verified action now counts for its user');
SELECT is(tests.r('a2 verified') ->> 'global_total_lbs', '15.700000', 'the verified action now counts globally');
SELECT is((SELECT action_count FROM bulk_sync.user_stats WHERE user_id = '00000000-0000-4000-8000-000000000002'), 1,
    'the verified action is counted once');
SELECT is((SELECT count(*) FROM bulk_sync.user_actions WHERE action_id = '00000000-0000-4000-8000-0000000000a2'), 1::bigint,
    'still one row for the action_id');

SELECT tests.mark('after a2 verified');
INSERT INTO tests.responses VALUES ('a2 verified again', bulk_sync.log_action(
    '{"action_id": "00000000-0000-4000-8000-0000000000a2", "user_id": "00000000-0000-4000-8000-000000000002",
      "lbs": "5.5", "logged_at": "2025-11-05T09:00:00Z", "verified": true}'));
SELECT is(tests.r('a2 verified again') ->> 'status', 'duplicate', 'a second verified resubmission is a duplicate');
SELECT is(tests.r('a2 verified again') ->> 'global_total_lbs', '15.700000', 'and does not count the action twice');
SELECT is(tests.fingerprint(), tests.fp('after a2 verified'), 'the second verified resubmission changed nothing');
SELECT is(tests.totals(), ARRAY['15.700000', '15.700000', '15.700000'], 'invariant holds after verification by resubmission');

------------------------------------------------------------------------------------------------------
-- BS002: the same action_id with a different user_id, lbs or logged_at; nothing changes
SELECT tests.mark('before BS002');

SELECT throws_ok(
    $$SELECT bulk_sync.log_action('{"action_id": "00000000-0000-4000-8000-0000000000a1",
        "user_id": "00000000-0000-4000-8000-000000000002", "lbs": "10.2", "logged_at": "2025-11-05T10:00:00Z", "verified": true}')$$,
    'BS002', NULL, 'a different user_id is BS002');
SELECT throws_matching(
    $$SELECT bulk_sync.log_action('{"action_id": "00000000-0000-4000-8000-0000000000a1",
        "user_id": "00000000-0000-4000-8000-000000000002", "lbs": "10.2", "logged_at": "2025-11-05T10:00:00Z", "verified": true}')$$,
    '\muser_id\M', 'the BS002 message names user_id');
SELECT is(tests.fingerprint(), tests.fp('before BS002'), 'a different user_id changes nothing');

SELECT throws_ok(
    $$SELECT bulk_sync.log_action('{"action_id": "00000000-0000-4000-8000-0000000000a1",
        "user_id": "00000000-0000-4000-8000-000000000001", "lbs": "10.3", "logged_at": "2025-11-05T10:00:00Z", "verified": true}')$$,
    'BS002', NULL, 'a different lbs is BS002');
SELECT throws_matching(
    $$SELECT bulk_sync.log_action('{"action_id": "00000000-0000-4000-8000-0000000000a1",
        "user_id": "00000000-0000-4000-8000-000000000001", "lbs": "10.3", "logged_at": "2025-11-05T10:00:00Z", "verified": true}')$$,
    '\mlbs\M', 'the BS002 message names lbs');
SELECT is(tests.fingerprint(), tests.fp('before BS002'), 'a different lbs changes nothing');

SELECT throws_ok(
    $$SELECT bulk_sync.log_action('{"action_id": "00000000-0000-4000-8000-0000000000a1",
        "user_id": "00000000-0000-4000-8000-000000000001", "lbs": "10.200001", "logged_at": "2025-11-05T10:00:00Z", "verified": true}')$$,
    'BS002', NULL, 'an lbs differing in the sixth decimal is BS002');

SELECT throws_ok(
    $$SELECT bulk_sync.log_action('{"action_id": "00000000-0000-4000-8000-0000000000a1",
        "user_id": "00000000-0000-4000-8000-000000000001", "lbs": "10.2", "logged_at": "2025-11-05T10:00:01Z", "verified": true}')$$,
    'BS002', NULL, 'a different logged_at is BS002');
SELECT throws_matching(
    $$SELECT bulk_sync.log_action('{"action_id": "00000000-0000-4000-8000-0000000000a1",
        "user_id": "00000000-0000-4000-8000-000000000001", "lbs": "10.2", "logged_at": "2025-11-05T10:00:01Z", "verified": true}')$$,
    '\mlogged_at\M', 'the BS002 message names logged_at');
SELECT is(tests.fingerprint(), tests.fp('before BS002'), 'a different logged_at changes nothing');

-- A conflicting verified resubmission of a2 must not change anything either.
SELECT throws_ok(
    $$SELECT bulk_sync.log_action('{"action_id": "00000000-0000-4000-8000-0000000000a2",
        "user_id": "00000000-0000-4000-8000-000000000002", "lbs": "5.6", "logged_at": "2025-11-05T09:00:00Z", "verified": true}')$$,
    'BS002', NULL, 'BS002 also for a second action');

-- The positional form follows the same rule.
SELECT throws_ok(
    $$SELECT bulk_sync.log_action('00000000-0000-4000-8000-0000000000a1'::uuid, '00000000-0000-4000-8000-000000000001'::uuid,
        10.25, '2025-11-05T10:00:00Z'::timestamptz, true)$$,
    'BS002', NULL, 'positional form: a different lbs is BS002');
SELECT throws_ok(
    $$SELECT bulk_sync.log_action('00000000-0000-4000-8000-0000000000a1'::uuid, '00000000-0000-4000-8000-000000000009'::uuid,
        10.2, '2025-11-05T10:00:00Z'::timestamptz, true)$$,
    'BS002', NULL, 'positional form: a different user_id is BS002');
SELECT is(tests.fingerprint(), tests.fp('before BS002'), 'none of the BS002 calls changed anything');

------------------------------------------------------------------------------------------------------
-- a revoked action stays revoked whatever is resubmitted
INSERT INTO tests.responses VALUES ('a3', bulk_sync.log_action(
    '{"action_id": "00000000-0000-4000-8000-0000000000a3", "user_id": "00000000-0000-4000-8000-000000000001",
      "lbs": "2", "logged_at": "2025-11-05T10:30:00Z", "verified": true}'));
SELECT is(tests.r('a3') ->> 'user_total_lbs', '12.200000', 'a3 counts before it is revoked');
INSERT INTO tests.responses VALUES ('a3 revoke',
    bulk_sync.revoke_action('00000000-0000-4000-8000-0000000000a3', 'duplicate submission by the app'));
INSERT INTO tests.responses VALUES ('a4', bulk_sync.log_action(
    '{"action_id": "00000000-0000-4000-8000-0000000000a4", "user_id": "00000000-0000-4000-8000-000000000001",
      "lbs": "7", "logged_at": "2025-11-05T10:40:00Z"}'));
INSERT INTO tests.responses VALUES ('a4 revoke',
    bulk_sync.revoke_action('00000000-0000-4000-8000-0000000000a4', 'not a real action'));
SELECT tests.mark('after revocations');

INSERT INTO tests.responses VALUES ('a3 again', bulk_sync.log_action(
    '{"action_id": "00000000-0000-4000-8000-0000000000a3", "user_id": "00000000-0000-4000-8000-000000000001",
      "lbs": "2", "logged_at": "2025-11-05T10:30:00Z", "verified": true}'));
SELECT is(tests.r('a3 again') ->> 'status', 'duplicate', 'resubmitting a revoked verified action: status duplicate');
SELECT is(tests.r('a3 again') -> 'is_duplicate', 'true'::jsonb, 'resubmitting a revoked action: is_duplicate true');
SELECT is(tests.r('a3 again') ->> 'user_total_lbs', '10.200000', 'the revoked action does not count again');

INSERT INTO tests.responses VALUES ('a4 verified', bulk_sync.log_action(
    '{"action_id": "00000000-0000-4000-8000-0000000000a4", "user_id": "00000000-0000-4000-8000-000000000001",
      "lbs": "7", "logged_at": "2025-11-05T10:40:00Z", "verified": true}'));
SELECT is(tests.r('a4 verified') ->> 'status', 'duplicate',
    'a verified resubmission of a revoked pending action: status duplicate, not verified');
SELECT is(tests.r('a4 verified') ->> 'global_total_lbs', '15.700000', 'the revoked pending action does not start counting');
SELECT is((SELECT revoked FROM bulk_sync.user_actions WHERE action_id = '00000000-0000-4000-8000-0000000000a4'), true,
    'the action is still revoked');
SELECT is(tests.fingerprint(), tests.fp('after revocations'), 'resubmitting revoked actions changed nothing');

------------------------------------------------------------------------------------------------------
-- the positional form
INSERT INTO tests.responses VALUES ('a5', bulk_sync.log_action(
    '00000000-0000-4000-8000-0000000000a5'::uuid, '00000000-0000-4000-8000-000000000001'::uuid,
    1.25, '2025-11-05T12:00:00+02:00'::timestamptz, true, '{"via": "positional"}'::jsonb));
SELECT is(tests.r('a5') ->> 'status', 'inserted', 'positional form: status inserted');
SELECT is(tests.r('a5') ->> 'emissions_lbs', '1.250000', 'positional form: emissions_lbs with six decimals');
SELECT is(tests.r('a5') ->> 'user_total_lbs', '11.450000', 'positional form: user total');
SELECT is(tests.r('a5') ->> 'global_total_lbs', '16.950000', 'positional form: global total');
SELECT matches(tests.r('a5') ->> 'timestamp', 'Z$', 'positional form: timestamp ends with Z');
SELECT is((SELECT array_agg(k ORDER BY k) FROM jsonb_object_keys(tests.r('a5')) AS k),
    ARRAY['action_id', 'emissions_lbs', 'global_total_lbs', 'is_duplicate', 'message', 'status', 'success',
          'timestamp', 'user_id', 'user_total_lbs'],
    'positional form: the same response keys as the JSON form');

INSERT INTO tests.responses VALUES ('a6', bulk_sync.log_action(
    '00000000-0000-4000-8000-0000000000a6'::uuid, '00000000-0000-4000-8000-000000000002'::uuid,
    3, '2025-11-05T12:00:00Z'::timestamptz));
SELECT is(tests.r('a6') ->> 'user_total_lbs', '5.500000', 'positional form: p_verified defaults to false (not counted)');
INSERT INTO tests.responses VALUES ('a6 verified', bulk_sync.log_action(
    '00000000-0000-4000-8000-0000000000a6'::uuid, '00000000-0000-4000-8000-000000000002'::uuid,
    3.000, '2025-11-05T12:00:00Z'::timestamptz, true));
SELECT is(tests.r('a6 verified') ->> 'status', 'verified', 'positional form: verified resubmission: status verified');
SELECT is(tests.r('a6 verified') ->> 'user_total_lbs', '8.500000', 'positional form: the action now counts');

------------------------------------------------------------------------------------------------------
-- timestamps are UTC with Z whatever the session's time zone
SET LOCAL TimeZone = 'Asia/Kolkata';
INSERT INTO tests.responses VALUES ('a7 kolkata', bulk_sync.log_action(
    '{"action_id": "00000000-0000-4000-8000-0000000000a7", "user_id": "00000000-0000-4000-8000-000000000002",
      "lbs": "0.05", "logged_at": "2025-11-05T15:30:00+05:30", "verified": true}'));
SELECT matches(tests.r('a7 kolkata') ->> 'timestamp', '^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?Z$',
    'in a +05:30 session the timestamp is still ISO 8601 with Z');
SELECT is((tests.r('a7 kolkata') ->> 'timestamp')::timestamptz, now(), 'and it is the same instant as now() (UTC, not local time)');
SELECT is((SELECT logged_at FROM bulk_sync.user_actions WHERE action_id = '00000000-0000-4000-8000-0000000000a7'),
    '2025-11-05T10:00:00Z'::timestamptz, 'logged_at with an offset is stored as the same instant');
RESET TimeZone;

SELECT is(tests.totals(), ARRAY['20.000000', '20.000000', '20.000000'], 'invariant holds at the end');

------------------------------------------------------------------------------------------------------
-- One counted action (one user gaining: _apply_deltas' one-row statements) and several users'
-- actions in one statement (its set statement): the same totals and events either way, and neither loses an amount when the
-- writer's global slot is missing.
INSERT INTO bulk_sync.user_actions (action_id, user_id, emissions_saved_lbs, verified, verified_at, logged_at)
VALUES ('00000000-0000-4000-8000-0000000000f1', '00000000-0000-4000-8000-0000000000e1', '0.000001', true, now(), now() - interval '1 hour'),
       ('00000000-0000-4000-8000-0000000000f2', '00000000-0000-4000-8000-0000000000e1', '5.000000', false, NULL, now() - interval '1 hour');
SELECT is(tests.totals(), ARRAY['20.000001', '20.000001', '20.000001'], 'one counted action among pending ones: totals move once');
SELECT results_eq(
    $$SELECT payload ->> 'kind', payload ->> 'user_id', payload ->> 'action_id', payload ->> 'user_total_lbs',
             payload ->> 'action_count', payload ->> 'global_total_lbs'
        FROM bulk_sync.events_since(0, 10000) ORDER BY event_id DESC LIMIT 1$$,
    $$VALUES ('logged', '00000000-0000-4000-8000-0000000000e1', '00000000-0000-4000-8000-0000000000f1', '0.000001', '1', '20.000001')$$,
    'one user''s change writes the event a batch would');

INSERT INTO bulk_sync.user_actions (action_id, user_id, emissions_saved_lbs, verified, verified_at, logged_at)
VALUES ('00000000-0000-4000-8000-0000000000f3', '00000000-0000-4000-8000-0000000000e1', '1.000000', true, now(), now() - interval '1 hour'),
       ('00000000-0000-4000-8000-0000000000f4', '00000000-0000-4000-8000-0000000000e2', '2.000000', true, now(), now() - interval '1 hour');
SELECT is(tests.totals(), ARRAY['23.000001', '23.000001', '23.000001'], 'two counted actions in one statement: totals move by both');
SELECT is((SELECT array[cardinality(events)::text, global_total::text] FROM bulk_sync._event_outbox ORDER BY outbox_id DESC LIMIT 1),
          ARRAY['2', '23.000001'], 'the statement stores its two events in one outbox row, with the global total after it');
SELECT results_eq(
    $$SELECT payload ->> 'kind', payload ->> 'user_id', payload ->> 'action_id', payload ->> 'user_total_lbs',
             payload ->> 'action_count', payload ->> 'global_total_lbs'
        FROM bulk_sync.events_since(0, 10000) ORDER BY event_id DESC LIMIT 2$$,
    $$VALUES ('logged', '00000000-0000-4000-8000-0000000000e2', '00000000-0000-4000-8000-0000000000f4', '2.000000', '1', '23.000001'),
             ('logged', '00000000-0000-4000-8000-0000000000e1', '00000000-0000-4000-8000-0000000000f3', '1.000001', '2', '23.000001')$$,
    'the batch path writes one event per user, in the same shape');

CREATE TABLE tests.lost_slot AS SELECT * FROM bulk_sync._global_slots WHERE slot = pg_backend_pid() % 64;
DELETE FROM bulk_sync._global_slots WHERE slot = pg_backend_pid() % 64;
SELECT tests.mark('before the slot was lost');
SELECT throws_ok(
    $$SELECT bulk_sync.log_action(gen_random_uuid(), '00000000-0000-4000-8000-0000000000e1', 1.5, now() - interval '1 minute', true)$$,
    'P0002', NULL, 'one counted action with the writer''s slot missing is P0002');
SELECT throws_ok(
    $$SELECT bulk_sync.bulk_backfill(jsonb_build_object('actions', jsonb_build_array(
          jsonb_build_object('action_id', gen_random_uuid(), 'user_id', '00000000-0000-4000-8000-0000000000e1',
                             'lbs', '1.5', 'logged_at', '2024-01-01T00:00:00Z', 'verified', true),
          jsonb_build_object('action_id', gen_random_uuid(), 'user_id', '00000000-0000-4000-8000-0000000000e2',
                             'lbs', '2.5', 'logged_at', '2024-01-01T00:00:00Z', 'verified', true))))$$,
    'P0002', NULL, 'a batch with the writer''s slot missing is P0002');
SELECT is(tests.fingerprint(), tests.fp('before the slot was lost'), 'and neither changed anything');
INSERT INTO bulk_sync._global_slots SELECT * FROM tests.lost_slot;
SELECT is(tests.totals(), ARRAY['23.000001', '23.000001', '23.000001'], 'with the slot back, the totals are whole');

-- _lock_users, every writer's first step: for one user or several, it locks their rows (their xmax
-- becomes this transaction's) and returns only the users whose rows it created.
INSERT INTO bulk_sync.user_stats (user_id)
VALUES ('70000000-0000-4000-8000-0000000000c1'), ('70000000-0000-4000-8000-0000000000c2'),
       ('70000000-0000-4000-8000-0000000000c3');
CREATE FUNCTION pg_temp.locked(p_user_id uuid) RETURNS boolean
LANGUAGE sql AS $$
    SELECT s.xmax = pg_current_xact_id()::xid FROM bulk_sync.user_stats AS s WHERE s.user_id = p_user_id
$$;
SELECT is(pg_temp.locked('70000000-0000-4000-8000-0000000000c1'), false, '_lock_users: a row inserted plainly is not locked');
SELECT is(bulk_sync._lock_users('{70000000-0000-4000-8000-0000000000c1}'), '{}'::uuid[],
    '_lock_users: one existing user, nothing created');
SELECT is(pg_temp.locked('70000000-0000-4000-8000-0000000000c1'), true, 'and its row is locked');
SELECT is(bulk_sync._lock_users('{70000000-0000-4000-8000-0000000000d1}'), '{70000000-0000-4000-8000-0000000000d1}'::uuid[],
    '_lock_users: one new user is created and returned');
SELECT is((SELECT (total_emissions_lbs::text, action_count)::text FROM bulk_sync.user_stats
            WHERE user_id = '70000000-0000-4000-8000-0000000000d1'), '(0.000000,0)', 'with an empty row');
SELECT is(bulk_sync._lock_users('{70000000-0000-4000-8000-0000000000c3, 70000000-0000-4000-8000-0000000000d2,
                                  70000000-0000-4000-8000-0000000000c2, 70000000-0000-4000-8000-0000000000c3}'),
    '{70000000-0000-4000-8000-0000000000d2}'::uuid[], '_lock_users: several users, only the new one returned');
SELECT ok(pg_temp.locked('70000000-0000-4000-8000-0000000000c2') AND pg_temp.locked('70000000-0000-4000-8000-0000000000c3'),
    'and the existing rows are locked');

SELECT * FROM finish();
ROLLBACK;
