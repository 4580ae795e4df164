-- 0002.lifecycle rollback: drops the transition audit and the revocation columns.
DROP TABLE bulk_sync.action_transitions;
DROP INDEX bulk_sync.user_actions_counted;
ALTER TABLE bulk_sync.user_actions
    DROP COLUMN revoked,
    DROP COLUMN verified_at,
    DROP COLUMN revoked_at;
