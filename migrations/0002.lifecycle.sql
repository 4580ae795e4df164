-- 0002.lifecycle: verification and revocation of actions, with an audit row per transition.
-- An action counts when verified AND NOT revoked; revocation is final.
-- depends: 0001.core-schema

ALTER TABLE bulk_sync.user_actions
    ADD COLUMN revoked      boolean      NOT NULL DEFAULT false,
    ADD COLUMN verified_at  timestamptz,
    ADD COLUMN revoked_at   timestamptz;

UPDATE bulk_sync.user_actions SET verified_at = created_at WHERE verified AND verified_at IS NULL;

-- Counted actions per user in logged_at order, carrying the amount so that reconcile,
-- revocations and totals "as of" a time are index-only scans.
CREATE INDEX user_actions_counted
    ON bulk_sync.user_actions (user_id, logged_at) INCLUDE (emissions_saved_lbs)
    WHERE verified AND NOT revoked;

CREATE TABLE bulk_sync.action_transitions (
    transition_id  bigint       GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    action_id      uuid         NOT NULL,
    user_id        uuid         NOT NULL,
    from_status    text         NOT NULL CHECK (from_status IN ('pending', 'verified', 'revoked')),
    to_status      text         NOT NULL CHECK (to_status IN ('pending', 'verified', 'revoked')),
    reason         text,
    performed_by   text         NOT NULL,
    performed_at   timestamptz  NOT NULL DEFAULT now(),
    via            text         NOT NULL
);
CREATE INDEX action_transitions_action ON bulk_sync.action_transitions (action_id);
COMMENT ON TABLE bulk_sync.action_transitions IS
    'Audit of every status change of an action after it was logged: who, when, why and through which function.';
COMMENT ON COLUMN bulk_sync.action_transitions.via IS
    'The function that made the change: verify_action, revoke_action, log_action or bulk_backfill.';
