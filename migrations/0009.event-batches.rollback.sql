-- 0009.event-batches rollback: the release before reads payload only. Events still stored typed
-- are published first, in order, by this release's publish_events; then the columns go.
SELECT bulk_sync.publish_events(2147483647, true);
ALTER TABLE bulk_sync._event_outbox
    DROP CONSTRAINT _event_outbox_one_form,
    DROP COLUMN events,
    DROP COLUMN event_count,
    DROP COLUMN global_total;
ALTER TABLE bulk_sync._event_outbox ALTER COLUMN payload SET NOT NULL;
DROP TYPE bulk_sync._user_event;
