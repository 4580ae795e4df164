-- A DBA's direct INSERT and DELETE of actions are counted like any other change, also right after a
-- bulk load that applied its own gains, and the operational functions reject bad arguments with
-- BS001, changing nothing: the paths no other file reaches.
BEGIN;
SELECT plan(33);

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
SELECT is(tests.totals(), ARRAY['11.700000', '11.700000', '11.700000'], 'the totals lost exactly the counted ones');
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

-- The setting alone claims nothing: any session may set it. A writer who sets it before log_action
-- still has its action counted.
CREATE ROLE tests_writer NOLOGIN IN ROLE bulk_sync_writer;
SET LOCAL ROLE tests_writer;
SET LOCAL bulk_sync.precounted = '1 5.000000';
SELECT is(bulk_sync.log_action('{"action_id": "00000000-0000-4000-8000-0000000000c3", "user_id": "00000000-0000-4000-8000-0000000000d9",
    "lbs": "5", "logged_at": "2025-11-05T12:00:00Z", "verified": true}') ->> 'user_total_lbs', '5.000000',
    'a writer''s own bulk_sync.precounted does not keep its action from the totals');
RESET ROLE;
SELECT is(tests.totals(), ARRAY['16.700000', '16.700000', '16.700000'], 'the three totals moved by its 5 lbs');

SELECT * FROM finish();
ROLLBACK;
