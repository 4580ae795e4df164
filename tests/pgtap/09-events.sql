-- Events: every change to a user's counted total is one durable event per affected user (log, verify,
-- revoke, bulk, reconcile), read back with events_since in increasing id order, with paging.
-- NOTIFY is only delivered on commit, so it is tested by pytest, not here.
BEGIN;
SELECT plan(69);

CREATE SCHEMA tests;

-- The events read so far, with the step that produced them.
CREATE TABLE tests.seen (event_id bigint PRIMARY KEY, payload jsonb NOT NULL, step text NOT NULL);
CREATE FUNCTION tests.last_seen() RETURNS bigint
LANGUAGE sql STABLE AS $$ SELECT coalesce(max(event_id), 0) FROM tests.seen $$;
-- Reads the events after the last one seen and files them under p_step.
CREATE FUNCTION tests.fetch(p_step text) RETURNS void
LANGUAGE sql AS $$
    INSERT INTO tests.seen SELECT e.event_id, e.payload, p_step FROM bulk_sync.events_since(tests.last_seen(), 10000) AS e
$$;
CREATE FUNCTION tests.n(p_step text) RETURNS bigint
LANGUAGE sql STABLE AS $$ SELECT count(*) FROM tests.seen WHERE step = p_step $$;
-- The only event of a step (NULL unless there is exactly one).
CREATE FUNCTION tests.ev(p_step text) RETURNS jsonb
LANGUAGE sql STABLE AS $$ SELECT CASE WHEN count(*) = 1 THEN min(payload::text)::jsonb END FROM tests.seen WHERE step = p_step $$;
-- (user_id, user_total_lbs) of a step's events, sorted by user.
CREATE FUNCTION tests.users(p_step text) RETURNS text[]
LANGUAGE sql STABLE AS $$
    SELECT array_agg((payload ->> 'user_id') || ' ' || (payload ->> 'user_total_lbs') ORDER BY payload ->> 'user_id', event_id)
      FROM tests.seen WHERE step = p_step
$$;

SELECT is_empty($$SELECT * FROM bulk_sync.events_since(0)$$, 'a fresh ledger has no events');

------------------------------------------------------------------------------------------------------
-- log_action, verified
SELECT lives_ok($$SELECT bulk_sync.log_action('{"action_id": "00000000-0000-4000-8000-0000000000a1",
    "user_id": "00000000-0000-4000-8000-000000000001", "lbs": "10.2", "logged_at": "2025-11-05T10:00:00Z", "verified": true}')$$,
    'log a verified action');
SELECT tests.fetch('log');
SELECT is(tests.n('log'), 1::bigint, 'a verified log_action: one event');
SELECT is(tests.ev('log') ->> 'user_id', '00000000-0000-4000-8000-000000000001', 'log event: user_id');
SELECT is(tests.ev('log') ->> 'user_total_lbs', '10.200000', 'log event: user_total_lbs after the change, six decimals');
SELECT is(tests.ev('log') ->> 'global_total_lbs', '10.200000', 'log event: global_total_lbs after the change');
SELECT is(tests.ev('log') ->> 'action_id', '00000000-0000-4000-8000-0000000000a1', 'log event: action_id');
SELECT is(jsonb_typeof(tests.ev('log') -> 'kind'), 'string', 'log event: kind is a string');
SELECT is(jsonb_typeof(tests.ev('log') -> 'user_total_lbs'), 'string', 'log event: user_total_lbs is a JSON string');
SELECT is(tests.ev('log') ?& ARRAY['kind', 'user_id', 'user_total_lbs', 'global_total_lbs', 'action_id'], true,
    'log event: payload has kind, user_id, user_total_lbs, global_total_lbs, action_id');

------------------------------------------------------------------------------------------------------
-- changes that do not move a counted total: no event
SELECT lives_ok($$SELECT bulk_sync.log_action('{"action_id": "00000000-0000-4000-8000-0000000000a2",
    "user_id": "00000000-0000-4000-8000-000000000002", "lbs": "5", "logged_at": "2025-11-05T10:00:00Z"}')$$,
    'log an unverified action');
SELECT tests.fetch('unverified');
SELECT is(tests.n('unverified'), 0::bigint, 'an unverified log_action: no event');

SELECT lives_ok($$SELECT bulk_sync.log_action('{"action_id": "00000000-0000-4000-8000-0000000000a1",
    "user_id": "00000000-0000-4000-8000-000000000001", "lbs": "10.2", "logged_at": "2025-11-05T10:00:00Z", "verified": true}')$$,
    'resubmit the verified action');
SELECT tests.fetch('duplicate');
SELECT is(tests.n('duplicate'), 0::bigint, 'a duplicate: no event');

SELECT lives_ok($$SELECT bulk_sync.log_action('{"action_id": "00000000-0000-4000-8000-0000000000a3",
    "user_id": "00000000-0000-4000-8000-000000000003", "lbs": "7", "logged_at": "2025-11-05T10:00:00Z"}')$$,
    'log another unverified action');
SELECT lives_ok($$SELECT bulk_sync.revoke_action('00000000-0000-4000-8000-0000000000a3', 'spam')$$, 'revoke it while pending');
SELECT tests.fetch('revoke pending');
SELECT is(tests.n('revoke pending'), 0::bigint, 'revoking a pending action: no event');

------------------------------------------------------------------------------------------------------
-- verify and revoke
SELECT lives_ok($$SELECT bulk_sync.verify_action('00000000-0000-4000-8000-0000000000a2')$$, 'verify a2');
SELECT tests.fetch('verify');
SELECT is(tests.n('verify'), 1::bigint, 'verify_action: one event');
SELECT is(tests.users('verify'), ARRAY['00000000-0000-4000-8000-000000000002 5.000000'], 'verify event: the user and total');
SELECT is(tests.ev('verify') ->> 'global_total_lbs', '15.200000', 'verify event: global_total_lbs');
SELECT is(tests.ev('verify') ->> 'action_id', '00000000-0000-4000-8000-0000000000a2', 'verify event: action_id');

SELECT lives_ok($$SELECT bulk_sync.revoke_action('00000000-0000-4000-8000-0000000000a1', 'wrong user')$$, 'revoke a1');
SELECT tests.fetch('revoke');
SELECT is(tests.n('revoke'), 1::bigint, 'revoke_action: one event');
SELECT is(tests.users('revoke'), ARRAY['00000000-0000-4000-8000-000000000001 0.000000'], 'revoke event: the user and total');
SELECT is(tests.ev('revoke') ->> 'global_total_lbs', '5.000000', 'revoke event: global_total_lbs');
SELECT is(tests.ev('revoke') ->> 'action_id', '00000000-0000-4000-8000-0000000000a1', 'revoke event: action_id');

SELECT lives_ok($$SELECT bulk_sync.log_action('{"action_id": "00000000-0000-4000-8000-0000000000a2",
    "user_id": "00000000-0000-4000-8000-000000000002", "lbs": "5", "logged_at": "2025-11-05T10:00:00Z", "verified": true}')$$,
    'resubmit a2 verified (already verified)');
SELECT tests.fetch('verified duplicate');
SELECT is(tests.n('verified duplicate'), 0::bigint, 'a verified resubmission of a verified action: no event');

SELECT lives_ok($$SELECT bulk_sync.log_action('{"action_id": "00000000-0000-4000-8000-0000000000a9",
    "user_id": "00000000-0000-4000-8000-000000000009", "lbs": "0.5", "logged_at": "2025-11-05T10:00:00Z"}')$$,
    'log a pending a9');
SELECT lives_ok($$SELECT bulk_sync.log_action('{"action_id": "00000000-0000-4000-8000-0000000000a9",
    "user_id": "00000000-0000-4000-8000-000000000009", "lbs": "0.5", "logged_at": "2025-11-05T10:00:00Z", "verified": true}')$$,
    'verify a9 by a verified resubmission');
SELECT tests.fetch('verify by log');
SELECT is(tests.n('verify by log'), 1::bigint, 'verification by log_action: one event');
SELECT is(tests.users('verify by log'), ARRAY['00000000-0000-4000-8000-000000000009 0.500000'],
    'verification by log_action: the user and total');
SELECT lives_ok($$SELECT bulk_sync.revoke_action('00000000-0000-4000-8000-0000000000a9', 'test done')$$, 'revoke a9 again');
SELECT tests.fetch('revoke a9');

------------------------------------------------------------------------------------------------------
-- bulk: one event per affected user
SELECT lives_ok($$SELECT bulk_sync.bulk_backfill('{"actions": [
    {"action_id": "00000000-0000-4000-8000-0000000004a1", "user_id": "00000000-0000-4000-8000-000000000004",
     "lbs": "1", "logged_at": "2025-11-05T10:00:00Z", "verified": true},
    {"action_id": "00000000-0000-4000-8000-0000000004a2", "user_id": "00000000-0000-4000-8000-000000000004",
     "lbs": "2", "logged_at": "2025-11-05T11:00:00Z", "verified": true},
    {"action_id": "00000000-0000-4000-8000-0000000005a1", "user_id": "00000000-0000-4000-8000-000000000005",
     "lbs": "3", "logged_at": "2025-11-05T10:00:00Z", "verified": true},
    {"action_id": "00000000-0000-4000-8000-0000000006a1", "user_id": "00000000-0000-4000-8000-000000000006",
     "lbs": "4", "logged_at": "2025-11-05T10:00:00Z", "verified": true},
    {"action_id": "00000000-0000-4000-8000-0000000007a1", "user_id": "00000000-0000-4000-8000-000000000007",
     "lbs": "100", "logged_at": "2025-11-05T10:00:00Z"}]}')$$, 'bulk: five actions of four users, one unverified');
SELECT tests.fetch('bulk');
SELECT is(tests.n('bulk'), 3::bigint, 'bulk: three events, one per user whose counted total changed');
SELECT is(tests.users('bulk'),
    ARRAY['00000000-0000-4000-8000-000000000004 3.000000', '00000000-0000-4000-8000-000000000005 3.000000',
          '00000000-0000-4000-8000-000000000006 4.000000'],
    'bulk: each event carries its user''s new total');
SELECT is((SELECT payload ->> 'global_total_lbs' FROM tests.seen WHERE step = 'bulk' ORDER BY event_id DESC LIMIT 1),
    '15.000000', 'bulk: the last event carries the global total after the batch');
SELECT is((SELECT payload ->> 'action_id' FROM tests.seen
            WHERE step = 'bulk' AND payload ->> 'user_id' = '00000000-0000-4000-8000-000000000005'),
    '00000000-0000-4000-8000-0000000005a1', 'bulk: a user changed by one action gets its action_id');

-- A batch that inserts one action of a user and verifies another of the same user: one event for the
-- insert and one for the verification, the last carrying the user's final total.
SELECT lives_ok($$SELECT bulk_sync.log_action('{"action_id": "00000000-0000-4000-8000-0000000008a1",
    "user_id": "00000000-0000-4000-8000-000000000008", "lbs": "1", "logged_at": "2025-11-05T10:00:00Z"}')$$,
    'log a pending action of u8');
SELECT tests.fetch('pending u8');
SELECT lives_ok($$SELECT bulk_sync.bulk_backfill('{"actions": [
    {"action_id": "00000000-0000-4000-8000-0000000008a1", "user_id": "00000000-0000-4000-8000-000000000008",
     "lbs": "1", "logged_at": "2025-11-05T10:00:00Z", "verified": true},
    {"action_id": "00000000-0000-4000-8000-0000000008a2", "user_id": "00000000-0000-4000-8000-000000000008",
     "lbs": "2", "logged_at": "2025-11-05T11:00:00Z", "verified": true}]}')$$,
    'bulk: verify u8''s pending action and add a new one');
SELECT tests.fetch('bulk mixed');
SELECT is(tests.n('bulk mixed'), 2::bigint, 'bulk verifying and inserting for one user: an event for each change');
SELECT is((SELECT payload ->> 'user_total_lbs' FROM tests.seen WHERE step = 'bulk mixed' ORDER BY event_id DESC LIMIT 1),
    '3.000000', 'bulk verifying and inserting for one user: the last event has the user''s final total');

------------------------------------------------------------------------------------------------------
-- reconcile fixing a user
UPDATE bulk_sync.user_stats SET total_emissions_lbs = '42.000000' WHERE user_id = '00000000-0000-4000-8000-000000000005';
SELECT tests.fetch('drift');
SELECT is(tests.n('drift'), 0::bigint, 'the simulated drift itself is not an event');
SELECT lives_ok($$SELECT bulk_sync.reconcile()$$, 'reconcile');
SELECT tests.fetch('reconcile');
SELECT is(tests.n('reconcile'), 1::bigint, 'reconcile fixing one user: one event');
SELECT is(tests.ev('reconcile') ->> 'kind', 'reconciled', 'reconcile event: kind reconciled');
SELECT is(tests.users('reconcile'), ARRAY['00000000-0000-4000-8000-000000000005 3.000000'],
    'reconcile event: the user and the corrected total');
SELECT is(tests.ev('reconcile') ->> 'global_total_lbs', '18.000000', 'reconcile event: global_total_lbs');

SELECT lives_ok($$SELECT bulk_sync.reconcile()$$, 'reconcile again');
SELECT tests.fetch('reconcile in sync');
SELECT is(tests.n('reconcile in sync'), 0::bigint, 'reconcile with nothing to fix: no event');

------------------------------------------------------------------------------------------------------
-- reading
SELECT is((SELECT count(*) FROM bulk_sync.events_since(0)), (SELECT count(*) FROM tests.seen),
    'events_since(0) returns every event read step by step');
SELECT is((SELECT array_agg(event_id ORDER BY ord) FROM bulk_sync.events_since(0) WITH ORDINALITY AS e(event_id, payload, ord)),
    (SELECT array_agg(event_id ORDER BY event_id) FROM tests.seen),
    'events_since(0) returns them in increasing event_id order');
SELECT is((SELECT count(DISTINCT event_id) FROM bulk_sync.events_since(0)), (SELECT count(*) FROM bulk_sync.events_since(0)),
    'event ids are unique');
SELECT is_empty(format('SELECT * FROM bulk_sync.events_since(%s)', tests.last_seen()),
    'events_since(last id seen) returns nothing new');
SELECT is((SELECT array_agg(event_id ORDER BY event_id) FROM bulk_sync.events_since(0, 2)),
    (SELECT (array_agg(event_id ORDER BY event_id))[1:2] FROM tests.seen), 'p_limit 2: the first two events');
SELECT is((SELECT array_agg(event_id) FROM bulk_sync.events_since((SELECT min(event_id) FROM tests.seen), 1)),
    (SELECT (array_agg(event_id ORDER BY event_id))[2:2] FROM tests.seen), 'resuming from the first id with p_limit 1: the second');

SELECT is((SELECT coalesce(array_agg(DISTINCT k || ': ' || (e.payload ->> k)), '{}') FROM bulk_sync.events_since(0) AS e,
                   jsonb_object_keys(e.payload) AS k
             WHERE (k LIKE '%\_at' OR k = 'timestamp') AND jsonb_typeof(e.payload -> k) = 'string' AND e.payload ->> k !~ 'Z$'),
    '{}'::text[], 'every timestamp in an event payload ends with Z');
SELECT throws_ok($$SELECT * FROM bulk_sync.events_since(-1)$$, 'BS001', NULL, 'a negative p_after is BS001');

------------------------------------------------------------------------------------------------------
-- publishing: an outbox row holds one writing statement's events, typed (a row written before
-- 0009.event-batches holds one rendered payload). publish_events takes whole rows, oldest first,
-- until p_max events are taken, and renders each typed event with its row's global total and time.
SELECT is(bulk_sync.status() -> 'events_pending', '0'::jsonb, 'every event so far is published');
INSERT INTO bulk_sync._event_outbox (payload, created_at)
VALUES ('{"kind": "logged", "user_id": "00000000-0000-4000-8000-0000000000b1", "user_total_lbs": "1.000000"}',
        '2025-11-05T10:00:00Z');
INSERT INTO bulk_sync._event_outbox (events, event_count, global_total, created_at)
VALUES (ARRAY[('verified', '00000000-0000-4000-8000-0000000000b2', '00000000-0000-4000-8000-0000000000c2', 2.5, 3),
              ('revoked', '00000000-0000-4000-8000-0000000000b3', NULL, 0, 0)]::bulk_sync._user_event[],
        2, 7.25, '2025-11-05T10:00:01.5Z'),
       (ARRAY[('reconciled', '00000000-0000-4000-8000-0000000000b4', NULL, 1e23, 1),
              ('reconciled', '00000000-0000-4000-8000-0000000000b5', NULL, 0.000001, 2)]::bulk_sync._user_event[],
        2, 100000000000000000000008.250001, '2025-11-05T10:00:02Z');
SELECT is(bulk_sync.status() -> 'events_pending', '5'::jsonb, 'status counts the events, not the rows');
SELECT is(bulk_sync.publish_events(3), 3, 'p_max 3: the first two rows hold three events, and the third row waits');
SELECT is(bulk_sync.publish_events(1), 2, 'p_max 1: the next row whole, so two');
SELECT is(bulk_sync.publish_events(), 0, 'nothing left');
SELECT results_eq(
    format('SELECT payload FROM bulk_sync.events WHERE event_id > %s ORDER BY event_id', tests.last_seen()),
    $$VALUES ('{"kind": "logged", "user_id": "00000000-0000-4000-8000-0000000000b1", "user_total_lbs": "1.000000"}'::jsonb),
             ('{"kind": "verified", "user_id": "00000000-0000-4000-8000-0000000000b2",
                "action_id": "00000000-0000-4000-8000-0000000000c2", "user_total_lbs": "2.500000", "action_count": 3,
                "global_total_lbs": "7.250000", "occurred_at": "2025-11-05T10:00:01.500000Z"}'),
             ('{"kind": "revoked", "user_id": "00000000-0000-4000-8000-0000000000b3", "action_id": null,
                "user_total_lbs": "0.000000", "action_count": 0, "global_total_lbs": "7.250000",
                "occurred_at": "2025-11-05T10:00:01.500000Z"}'),
             ('{"kind": "reconciled", "user_id": "00000000-0000-4000-8000-0000000000b4", "action_id": null,
                "user_total_lbs": "100000000000000000000000.000000", "action_count": 1,
                "global_total_lbs": "100000000000000000000008.250001", "occurred_at": "2025-11-05T10:00:02Z"}'),
             ('{"kind": "reconciled", "user_id": "00000000-0000-4000-8000-0000000000b5", "action_id": null,
                "user_total_lbs": "0.000001", "action_count": 2,
                "global_total_lbs": "100000000000000000000008.250001", "occurred_at": "2025-11-05T10:00:02Z"}')$$,
    'a stored payload as it was; typed events in order, exact, with their row''s global total and time');
SELECT throws_ok($$INSERT INTO bulk_sync._event_outbox (payload, events, event_count, global_total)
                   VALUES ('{}', ARRAY[('logged', NULL, NULL, 1, 1)]::bulk_sync._user_event[], 1, 1)$$,
                 '23514', NULL, 'an outbox row holds a payload or typed events, not both');
SELECT throws_ok($$INSERT INTO bulk_sync._event_outbox (events, event_count, global_total) VALUES ('{}', 0, 1)$$,
                 '23514', NULL, 'nor an empty list of events');
SELECT throws_ok($$INSERT INTO bulk_sync._event_outbox (events, event_count)
                   VALUES (ARRAY[('logged', NULL, NULL, 1, 1)]::bulk_sync._user_event[], 1)$$,
                 '23514', NULL, 'nor typed events without their global total');
SELECT throws_ok($$INSERT INTO bulk_sync._event_outbox (events, event_count, global_total)
                   VALUES (ARRAY[('logged', NULL, NULL, 1, 1)]::bulk_sync._user_event[], 2, 1)$$,
                 '23514', NULL, 'nor a count that is not the number of events');

SELECT * FROM finish();
ROLLBACK;
