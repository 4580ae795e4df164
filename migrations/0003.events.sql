-- 0003.events: durable change events. Writers append to an outbox; the publisher numbers them
-- in commit order into bulk_sync.events (see docs/DESIGN.md, "Events").
-- depends: 0002.lifecycle

CREATE TABLE bulk_sync._event_outbox (
    outbox_id   bigint       GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    payload     jsonb        NOT NULL,
    created_at  timestamptz  NOT NULL DEFAULT now()
);
COMMENT ON TABLE bulk_sync._event_outbox IS 'Events written by committed or in-flight transactions, not yet numbered.';

CREATE SEQUENCE bulk_sync.event_id_seq AS bigint;

CREATE TABLE bulk_sync.events (
    event_id      bigint       PRIMARY KEY,
    payload       jsonb        NOT NULL,
    created_at    timestamptz  NOT NULL,
    published_at  timestamptz  NOT NULL DEFAULT now()
);
CREATE INDEX events_published_at ON bulk_sync.events (published_at);
COMMENT ON TABLE bulk_sync.events IS
    'Published change events; event_id increases in commit order. Read with bulk_sync.events_since().';
