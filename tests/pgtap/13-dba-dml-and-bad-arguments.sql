-- A DBA's direct INSERT and DELETE of actions are counted like any other change, also right after a
-- bulk load or a log_action that applied its own gains, and the operational functions reject bad
-- arguments with BS001, changing nothing: the paths no other file reaches.
BEGIN;
SELECT plan(42);

\ir fixtures/common.sql

SELECT lives_ok($$SELECT bulk_sync.bulk_backfill('{"actions": [
    {"action_id": "00000000-0000-4000-8000-0000000000a1", "user_id": "00000000-0000-4000-8000-000000000001",
     "lbs": "10.2", "logged_at": "2025-11-05T10:00:00Z", "verified": true},
    {"action_id": "00000000-0000-4000-8000-0000000000a2", "user_id": "00000000-0000-4000-8000-000000000001",
     "lbs": "0.8", "logged_at": "2025-11-05T10:30:00Z", "verified": true},
    {"action_id": "00000000-0000-4000-8000-0000000000a3", "user_id": "00000000-0000-4000-8000-000000000002",
     "lbs": "10.3", "logged_at": "2025-11-05T10:05:00Z", "verified": true},
    {"action_id": "00000000-0000-4000-8000-0000000000b1", "user_id": "00000000-0000-4000-8000-000000000002",
     "lbs": "4", "logged_at": "2025-11-05T11:00:00Z"}]}')$$, 'fixture loaded');
SELECT is(tests.totals(), ARRAY['21.300000', '21.300000', '21.300000'], 'fixture: the three totals');

-- The load applied its gains before its INSERT and told the count trigger so; that claim covered its
-- INSERT only. A DBA's INSERT in the same transaction is counted as usual.
SELECT is(nullif(current_setting('bulk_sync.precounted', true), ''), NULL, 'the load left no claim behind');
SELECT is_empty('SELECT * FROM bulk_sync._precount_claims', 'nor a row of one');
SELECT lives_ok($$INSERT INTO bulk_sync.user_actions (action_id, user_id, emissions_saved_lbs, verified, logged_at, verified_at)
    VALUES ('00000000-0000-4000-8000-0000000000c1', '00000000-0000-4000-8000-000000000003', 1.5, true,
            '2025-11-05T12:00:00Z', now())$$, 'a direct INSERT of a verified action');
SELECT is(tests.totals(), ARRAY['22.800000', '22.800000', '22.800000'], 'the direct INSERT is counted');

-- log_action counts its action itself and has the insert trigger skip its INSERT, for that statement
-- only: its answer carries the totals it wrote, and a direct INSERT after it is counted.
SELECT is(bulk_sync.log_action('{"action_id": "00000000-0000-4000-8000-0000000000c4", "user_id": "00000000-0000-4000-8000-000000000003",
    "lbs": "0.5", "logged_at": "2025-11-05T12:10:00Z", "verified": true}') - 'timestamp',
    jsonb_build_object('success', true, 'status', 'inserted', 'action_id', '00000000-0000-4000-8000-0000000000c4',
        'user_id', '00000000-0000-4000-8000-000000000003', 'emissions_lbs', '0.500000', 'user_total_lbs', '2.000000',
        'global_total_lbs', '23.300000', 'is_duplicate', false, 'message', 'Emission logged successfully'),
    'log_action answers with the totals it wrote');
SELECT results_eq(
    $$SELECT payload ->> 'action_id', payload ->> 'user_total_lbs', payload ->> 'global_total_lbs'
        FROM bulk_sync.events_since(0, 10000) ORDER BY event_id DESC LIMIT 1$$,
    $$VALUES ('00000000-0000-4000-8000-0000000000c4', '2.000000', '23.300000')$$,
    'and its event carries the same');
SELECT is(nullif(current_setting('bulk_sync.counted_by_caller', true), ''), NULL, 'log_action left no mark behind');
SELECT lives_ok($$INSERT INTO bulk_sync.user_actions (action_id, user_id, emissions_saved_lbs, verified, logged_at, verified_at)
    VALUES ('00000000-0000-4000-8000-0000000000c5', '00000000-0000-4000-8000-000000000003', 0.25, true,
            '2025-11-05T12:20:00Z', now())$$, 'a direct INSERT right after log_action');
SELECT is(tests.totals(), ARRAY['23.550000', '23.550000', '23.550000'], 'is counted');
-- A log_action whose INSERT fails leaves no mark either: the failed statement's (sub)transaction
-- takes the setting with it.
CREATE FUNCTION pg_temp.refuse_c6() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.action_id = '00000000-0000-4000-8000-0000000000c6' THEN
        RAISE EXCEPTION 'refused by the test' USING ERRCODE = 'P0001';
    END IF;
    RETURN NEW;
END
$$;
CREATE TRIGGER tests_refuse_c6 BEFORE INSERT ON bulk_sync.user_actions FOR EACH ROW EXECUTE FUNCTION pg_temp.refuse_c6();
SELECT throws_ok($$SELECT bulk_sync.log_action('{"action_id": "00000000-0000-4000-8000-0000000000c6",
    "user_id": "00000000-0000-4000-8000-000000000003", "lbs": "1", "logged_at": "2025-11-05T12:30:00Z", "verified": true}')$$,
    'P0001', 'refused by the test', 'a log_action whose INSERT fails');
DROP TRIGGER tests_refuse_c6 ON bulk_sync.user_actions;
SELECT is(nullif(current_setting('bulk_sync.counted_by_caller', true), ''), NULL, 'left no mark behind');
SELECT lives_ok($$INSERT INTO bulk_sync.user_actions (action_id, user_id, emissions_saved_lbs, verified, logged_at, verified_at)
    VALUES ('00000000-0000-4000-8000-0000000000c6', '00000000-0000-4000-8000-000000000003', 0.25, true,
            '2025-11-05T12:30:00Z', now())$$, 'so a direct INSERT after it');
SELECT is(tests.totals(), ARRAY['23.800000', '23.800000', '23.800000'], 'is counted');

-- A claim that does not match what a statement inserts stops it, and nothing changes.
SELECT tests.mark('after insert');
SELECT throws_ok($sql$DO $claim$
    BEGIN
        INSERT INTO bulk_sync._precount_claims (xid, claim) VALUES (pg_current_xact_id(), '1 1.500000');
        PERFORM set_config('bulk_sync.precounted', 'on', true);
        INSERT INTO bulk_sync.user_actions (action_id, user_id, emissions_saved_lbs, verified, logged_at, verified_at)
        VALUES ('00000000-0000-4000-8000-0000000000c2', '00000000-0000-4000-8000-000000000003', 2.5, true,
                '2025-11-05T12:30:00Z', now());
    END
    $claim$$sql$, 'XX000', 'counted actions (1 2.500000) differ from those already applied (1 1.500000)',
    'a claim that does not match the inserted actions is refused');
SELECT is(tests.fingerprint(), tests.fp('after insert'), 'the refused INSERT changed nothing');

-- A DBA deletes actions directly: a counted one of u1 (its latest), a counted one of u2, a pending one.
SELECT lives_ok($$DELETE FROM bulk_sync.user_actions WHERE action_id IN
    ('00000000-0000-4000-8000-0000000000a2', '00000000-0000-4000-8000-0000000000a3',
     '00000000-0000-4000-8000-0000000000b1')$$, 'a direct DELETE of three actions');
SELECT is(tests.totals(), ARRAY['12.700000', '12.700000', '12.700000'], 'the totals lost exactly the counted ones');
SELECT is((SELECT (total_emissions_lbs::text, action_count, last_action_at)::text FROM bulk_sync.user_stats
            WHERE user_id = '00000000-0000-4000-8000-000000000001'),
          '(10.200000,1,"2025-11-05 10:00:00+00")', 'u1: total, count and latest action follow');
SELECT is((SELECT (total_emissions_lbs::text, action_count)::text FROM bulk_sync.user_stats
            WHERE user_id = '00000000-0000-4000-8000-000000000002'),
          '(0.000000,0)', 'u2: nothing counted any more');
SELECT is((SELECT string_agg(payload ->> 'kind' || ' ' || (payload ->> 'user_total_lbs'), ', ' ORDER BY payload ->> 'user_id')
             FROM bulk_sync.events_since(0, 10000) WHERE payload ->> 'kind' = 'deleted'),
          'deleted 10.200000, deleted 0.000000', 'one deleted event per user that lost a counted action');
SELECT is(bulk_sync.reconcile('{"auto_correct": false}') -> 'in_sync', 'true'::jsonb, 'reconcile finds nothing to fix');
SELECT tests.mark('after delete');

-- Bad arguments: BS001, nothing changed.
SELECT throws_ok($$SELECT bulk_sync.reconcile('[]')$$, 'BS001', NULL, 'reconcile: a request that is not an object');
SELECT throws_ok($$SELECT bulk_sync.reconcile('{"auto_corect": false}')$$, 'BS001', NULL, 'reconcile: an unknown key');
SELECT throws_ok($$SELECT bulk_sync.reconcile('{"performed_by": " "}')$$, 'BS001', NULL, 'reconcile: a blank performed_by');
SELECT throws_ok($$SELECT bulk_sync.reconcile('{"performed_by": 7}')$$, 'BS001', NULL, 'reconcile: performed_by not a string');
SELECT throws_ok($$SELECT bulk_sync.reconcile('{"auto_correct": "no"}')$$, 'BS001', NULL, 'reconcile: auto_correct not a boolean');
SELECT throws_ok($$SELECT * FROM bulk_sync.events_since(-1)$$, 'BS001', NULL, 'events_since: a negative p_after');
SELECT throws_ok($$SELECT * FROM bulk_sync.events_since(0, 0)$$, 'BS001', NULL, 'events_since: p_limit 0');
SELECT throws_ok($$SELECT bulk_sync.publish_events(0)$$, 'BS001', NULL, 'publish_events: p_max 0');
SELECT throws_ok($$SELECT bulk_sync.revoke_action(NULL, 'why')$$, 'BS001', NULL, 'revoke_action: a NULL action_id');
SELECT throws_ok($$SELECT bulk_sync.user_total(NULL)$$, 'BS001', NULL, 'user_total: a NULL user');
SELECT throws_ok($$UPDATE bulk_sync.global_emissions SET total_lbs_saved = NULL WHERE id = 1$$, 'BS001', NULL,
    'global_emissions: a NULL total');
SELECT throws_ok($$SELECT bulk_sync.prune_events('-1 day')$$, 'BS001', NULL, 'prune_events: a negative interval');
SELECT throws_ok($$SELECT bulk_sync.leaderboard(-1)$$, 'BS001', NULL, 'leaderboard: a negative limit');
SELECT throws_ok($$SELECT bulk_sync.bulk_backfill('{"actions": [], "idempotency_key": 42}')$$, 'BS001', NULL,
    'bulk_backfill: an idempotency_key that is not a string');
SELECT throws_ok($$SELECT bulk_sync.bulk_backfill('{"actions": [], "idempotency_key": ""}')$$, 'BS001', NULL,
    'bulk_backfill: an empty idempotency_key');
SELECT throws_ok(format('SELECT bulk_sync.bulk_backfill(%L)', jsonb_build_object('actions', '[]'::jsonb, 'idempotency_key', repeat('k', 201))),
    'BS001', NULL, 'bulk_backfill: an idempotency_key of 201 characters');
SELECT is(tests.fingerprint(), tests.fp('after delete'), 'the rejected calls changed nothing');

-- The settings alone claim nothing: any session may set them. A writer who sets them before log_action
-- still has its action counted (and may not INSERT into user_actions itself: 08-security).
CREATE ROLE tests_writer NOLOGIN IN ROLE bulk_sync_writer;
SET LOCAL ROLE tests_writer;
SET LOCAL bulk_sync.precounted = '1 5.000000';
SET LOCAL bulk_sync.counted_by_caller = 'on';
SELECT is(bulk_sync.log_action('{"action_id": "00000000-0000-4000-8000-0000000000c3", "user_id": "00000000-0000-4000-8000-0000000000d9",
    "lbs": "5", "logged_at": "2025-11-05T12:00:00Z", "verified": true}') ->> 'user_total_lbs', '5.000000',
    'a writer''s own settings do not keep its action from the totals');
RESET ROLE;
SELECT is(tests.totals(), ARRAY['17.700000', '17.700000', '17.700000'], 'the three totals moved by its 5 lbs');

SELECT * FROM finish();
ROLLBACK;
