-- 0007.shared-load: the checked rows of a bulk load in one table that every session of the load can
-- read, so that a file can be checked by several sessions at once and applied by any of them.
-- depends: 0006.definitions-state

-- The loads in progress. A load is known by a random token, which only the definer functions and
-- the session that opened the load see; the backend that opened it tells a live load from one whose
-- runner died (see _stage_open). UNLOGGED like the rows: after a crash both are empty.
CREATE UNLOGGED TABLE bulk_sync._loads (
    load           uuid         PRIMARY KEY,
    opened_by_pid  bigint       NOT NULL,
    opened_at      timestamptz  NOT NULL DEFAULT now()
);
COMMENT ON TABLE bulk_sync._loads IS
    'Bulk loads in progress (bulk_backfill, bulk-sync backfill): each one''s token and the backend that opened it. Internal to the bulk core.';

-- One row per checked action of a load (see _stage_check): typed, with its line in the input and
-- whether its action_id was stored when it was checked. UNLOGGED: a load's rows live for the load
-- only, and a crash ends every load (its actions are then simply loaded again).
CREATE UNLOGGED TABLE bulk_sync._load_rows (
    load       uuid           NOT NULL,
    line       bigint         NOT NULL,
    action_id  uuid           NOT NULL,
    user_id    uuid           NOT NULL,
    lbs        numeric(30,6)  NOT NULL,
    logged_at  timestamptz    NOT NULL,
    verified   boolean        NOT NULL,
    metadata   jsonb          NOT NULL,
    copies     bigint         NOT NULL DEFAULT 1,
    known      boolean        NOT NULL,
    pending    boolean        NOT NULL,
    conflicts  boolean        NOT NULL
);
COMMENT ON TABLE bulk_sync._load_rows IS
    'The checked rows of the bulk loads in bulk_sync._loads. copies: the rows of the input one action stands for; known: its action_id was stored when checked; pending: stored unverified and not revoked; conflicts: stored with other facts (BS002).';
-- A new, empty table: nothing to lock out. Chunks read their users' rows through it.
-- squawk-ignore require-concurrent-index-creation
CREATE INDEX _load_rows_user ON bulk_sync._load_rows (load, user_id);
