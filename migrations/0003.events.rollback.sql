-- 0003.events rollback: drops the event tables and their sequence.
DROP TABLE bulk_sync.events;
DROP SEQUENCE bulk_sync.event_id_seq;
DROP TABLE bulk_sync._event_outbox;
