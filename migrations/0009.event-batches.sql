-- 0009.event-batches: writers store change events typed, one outbox row per statement, and the
-- publisher renders each event's JSON when it numbers it (see publish_events). A bulk chunk that
-- changes 10,000 users wrote 10,000 outbox rows, each with its JSON built in the writer's
-- transaction; it now writes one row.
-- depends: 0008.user-delta

CREATE TYPE bulk_sync._user_event AS (
    kind          text,
    user_id       uuid,
    action_id     uuid,
    user_total    numeric,
    action_count  integer
);
COMMENT ON TYPE bulk_sync._user_event IS
    'One change event as a writer stores it in bulk_sync._event_outbox.events: the keys of its payload (see _event_payload) but the global total and the time, which its outbox row holds for every event of the statement.';

-- Rows written before this migration keep their payload and are published as they are. No row
-- is rewritten: the new columns have no default, and the constraint is checked on the outbox,
-- which holds the events not yet published only.
ALTER TABLE bulk_sync._event_outbox
    -- Only publish_events reads the outbox, and it reads both forms.
    -- squawk-ignore ban-drop-not-null
    ALTER COLUMN payload DROP NOT NULL,
    ADD COLUMN events bulk_sync._user_event[],
    ADD COLUMN event_count bigint,
    ADD COLUMN global_total numeric,
    -- One row holds thousands of events: stored out of line uncompressed, which costs about
    -- half as much as compressing them, and the row lives only until the next publish.
    ALTER COLUMN events SET STORAGE EXTERNAL,
    -- The ALTER holds the outbox ACCESS EXCLUSIVE anyway, and the check reads its few rows.
    -- squawk-ignore constraint-missing-not-valid
    ADD CONSTRAINT _event_outbox_one_form
        CHECK (CASE WHEN events IS NULL THEN payload IS NOT NULL AND event_count IS NULL AND global_total IS NULL
                    ELSE payload IS NULL AND global_total IS NOT NULL AND event_count > 0
                         AND event_count = cardinality(events) END);

COMMENT ON COLUMN bulk_sync._event_outbox.payload IS
    'An event as rendered JSON: rows written before 0009.event-batches.';
COMMENT ON COLUMN bulk_sync._event_outbox.events IS
    'The events of one writing statement, in order; each is published with global_total and created_at.';
COMMENT ON COLUMN bulk_sync._event_outbox.event_count IS
    'How many events the row holds, so that the publisher and status() count them without reading the array.';
COMMENT ON COLUMN bulk_sync._event_outbox.global_total IS
    'The global total after the statement that wrote events, which every one of them carries.';
