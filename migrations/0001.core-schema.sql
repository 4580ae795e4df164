-- 0001.core-schema: the ledger's storage — actions, per-user totals, the slotted global total,
-- reconcile's audit trail and bulk idempotency keys. Functions and views live in db/.
-- depends:

CREATE SCHEMA bulk_sync;
COMMENT ON SCHEMA bulk_sync IS 'bulk-sync: exact running totals of verified user actions';

-- The source of truth: one row per action_id. Facts never change through the API.
CREATE TABLE bulk_sync.user_actions (
    action_id            uuid          PRIMARY KEY,
    user_id              uuid          NOT NULL,
    emissions_saved_lbs  numeric(30,6) NOT NULL CHECK (emissions_saved_lbs >= 0),
    verified             boolean       NOT NULL DEFAULT false,
    logged_at            timestamptz   NOT NULL,
    created_at           timestamptz   NOT NULL DEFAULT now(),
    metadata             jsonb         NOT NULL DEFAULT '{}' CHECK (jsonb_typeof(metadata) = 'object')
);
COMMENT ON TABLE bulk_sync.user_actions IS
    'One row per action_id; an action counts towards the totals when it is verified (and, from 0002, not revoked).';

-- Per-user running totals, maintained by the triggers on user_actions.
CREATE TABLE bulk_sync.user_stats (
    user_id              uuid          PRIMARY KEY,
    total_emissions_lbs  numeric(30,6) NOT NULL DEFAULT 0 CHECK (total_emissions_lbs >= 0),
    action_count         integer       NOT NULL DEFAULT 0 CHECK (action_count >= 0),
    last_action_at       timestamptz,
    last_updated         timestamptz   NOT NULL DEFAULT now(),
    leaderboard_key      numeric(30,6) GENERATED ALWAYS AS (-total_emissions_lbs) STORED
);
COMMENT ON TABLE bulk_sync.user_stats IS
    'Per-user totals of counted actions; last_action_at is the latest logged_at among them (leaderboard tie-break).';
COMMENT ON COLUMN bulk_sync.user_stats.action_count IS 'Number of counted actions.';

COMMENT ON COLUMN bulk_sync.user_stats.leaderboard_key IS
    'The negated total, so that leaderboard order is ascending in every column of the index below.';

-- Leaderboard order (total DESC, last_action_at, user_id) as one ascending key, so both ORDER BY
-- and "how many rank ahead of me" (a row comparison, which needs plain columns) use this index.
CREATE INDEX user_stats_leaderboard
    ON bulk_sync.user_stats (leaderboard_key, last_action_at, user_id)
    WHERE action_count > 0;

-- The global total, spread over slots so that concurrent writers do not queue on one row.
-- Writers add to slot pg_backend_pid() % 64; slot 64 takes reconcile's corrections.
-- The total is sum(total_lbs), exact in every snapshot (see docs/DESIGN.md).
CREATE TABLE bulk_sync._global_slots (
    slot          smallint      PRIMARY KEY CHECK (slot BETWEEN 0 AND 64),
    total_lbs     numeric(30,6) NOT NULL DEFAULT 0,
    last_updated  timestamptz   NOT NULL DEFAULT now()
) WITH (fillfactor = 20);
INSERT INTO bulk_sync._global_slots (slot) SELECT generate_series(0, 64);
COMMENT ON TABLE bulk_sync._global_slots IS
    'Slots of the global total; read it through bulk_sync.global_emissions or bulk_sync.global_total().';

-- One row per reconcile run.
CREATE TABLE bulk_sync.reconciliation_runs (
    run_id             uuid          PRIMARY KEY DEFAULT gen_random_uuid(),
    started_at         timestamptz   NOT NULL DEFAULT clock_timestamp(),
    finished_at        timestamptz,
    performed_by       text          NOT NULL,
    auto_correct       boolean       NOT NULL,
    in_sync            boolean       NOT NULL,
    fixed              boolean       NOT NULL,
    users_out_of_sync  integer       NOT NULL,
    result             jsonb         NOT NULL
);
CREATE INDEX reconciliation_runs_started_at ON bulk_sync.reconciliation_runs (started_at);

-- One row per correction that reconcile applied (the seed's columns).
CREATE TABLE bulk_sync.emissions_corrections (
    correction_id          uuid          PRIMARY KEY DEFAULT gen_random_uuid(),
    previous_total         numeric(30,6) NOT NULL,
    corrected_total        numeric(30,6) NOT NULL,
    discrepancy            numeric(30,6) NOT NULL,
    reason                 text          NOT NULL,
    performed_at           timestamptz   NOT NULL DEFAULT now(),
    performed_by           text,
    reconciliation_run_id  uuid          REFERENCES bulk_sync.reconciliation_runs DEFERRABLE INITIALLY DEFERRED,
    metadata               jsonb         NOT NULL DEFAULT '{}'
);
CREATE INDEX emissions_corrections_run ON bulk_sync.emissions_corrections (reconciliation_run_id);
COMMENT ON TABLE bulk_sync.emissions_corrections IS
    'Audit trail of reconcile''s fixes: scope global, or user with metadata->>''user_id''.';

-- bulk_backfill idempotency keys: the actions' hash and the first response.
CREATE TABLE bulk_sync.idempotency_keys (
    idempotency_key  text          PRIMARY KEY,
    request_sha256   bytea         NOT NULL,
    response         jsonb,
    created_at       timestamptz   NOT NULL DEFAULT now()
);

-- A parsed, validated batch action, as bulk_backfill passes it between its statements.
CREATE TYPE bulk_sync._batch_action AS (
    idx        integer,
    action_id  uuid,
    user_id    uuid,
    lbs        numeric(30,6),
    logged_at  timestamptz,
    verified   boolean,
    metadata   jsonb
);
