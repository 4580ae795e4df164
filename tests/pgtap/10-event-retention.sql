-- prune_events: published events older than the retention are deleted, newer ones and the outbox
-- are kept, and a reader resuming from a kept id still gets everything after it.
BEGIN;
SELECT plan(6);

SELECT bulk_sync.bulk_backfill(jsonb_build_object('actions', (
    SELECT jsonb_agg(jsonb_build_object(
               'action_id', format('00000000-0000-4000-8000-%s', lpad(i::text, 12, '0')),
               'user_id',   format('00000000-0000-4000-9000-%s', lpad(i::text, 12, '0')),
               'lbs', '1.5', 'logged_at', '2025-11-05T10:00:00Z', 'verified', true))
      FROM generate_series(1, 6) AS i)));
SELECT is((SELECT count(*) FROM bulk_sync.events_since(0)), 6::bigint, 'six events published');

-- Age the first four as if published ten days ago.
UPDATE bulk_sync.events SET published_at = now() - interval '10 days'
 WHERE event_id IN (SELECT event_id FROM bulk_sync.events ORDER BY event_id LIMIT 4);
SELECT bulk_sync.log_action('00000000-0000-4000-8000-0000000000ff', '00000000-0000-4000-9000-000000000001',
                            '2', '2025-11-05T11:00:00Z', true);

SELECT is(bulk_sync.prune_events(interval '7 days'), 4::bigint, 'prune_events deletes the four old events');
SELECT is((SELECT count(*) FROM bulk_sync.events), 2::bigint, 'the two recent published events are kept');
SELECT is((SELECT count(*) FROM bulk_sync._event_outbox), 1::bigint, 'the unpublished event is not pruned');
SELECT is((SELECT array_agg(payload ->> 'user_id' ORDER BY event_id)
             FROM bulk_sync.events_since((SELECT min(event_id) FROM bulk_sync.events))),
          ARRAY['00000000-0000-4000-9000-000000000006', '00000000-0000-4000-9000-000000000001'],
          'a reader resuming from a kept id gets every later event');
SELECT throws_ok($$SELECT bulk_sync.prune_events(interval '-1 day')$$, 'BS001', NULL,
                 'a negative retention is BS001');

SELECT * FROM finish();
ROLLBACK;
