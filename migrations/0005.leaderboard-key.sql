-- 0005.leaderboard-key: the stored leaderboard_key column and its index, for databases installed
-- before 07a12e9 added them to 0001 in place. Fresh installs already have both: this is a no-op there.
-- depends: 0004.roles

-- Installs older than 07a12e9 lack the column. Adding a stored generated column rewrites
-- user_stats (one row per user) under an ACCESS EXCLUSIVE lock, bounded by migrate's lock_timeout.
-- The rewrite is the point (a stored key) and happens once, on upgraded databases only.
ALTER TABLE bulk_sync.user_stats
    -- squawk-ignore adding-field-with-default
    ADD COLUMN IF NOT EXISTS leaderboard_key numeric(30,6) GENERATED ALWAYS AS (-total_emissions_lbs) STORED;

COMMENT ON COLUMN bulk_sync.user_stats.leaderboard_key IS
    'The negated total, so that leaderboard order is ascending in every column of the index below.';

-- Those installs also have the index under the same name on the expression (-total_emissions_lbs),
-- which user_rank's row comparison cannot use: rebuild it on the column, exactly as 0001 now has it.
DO $$
BEGIN
    IF to_regclass('bulk_sync.user_stats_leaderboard') IS NOT NULL
       AND pg_catalog.pg_get_indexdef('bulk_sync.user_stats_leaderboard'::regclass) !~ 'leaderboard_key' THEN
        DROP INDEX bulk_sync.user_stats_leaderboard;
    END IF;
END
$$;
-- Not CONCURRENTLY: the ALTER above already holds user_stats ACCESS EXCLUSIVE in this transaction.
-- squawk-ignore require-concurrent-index-creation
CREATE INDEX IF NOT EXISTS user_stats_leaderboard
    ON bulk_sync.user_stats (leaderboard_key, last_action_at, user_id)
    WHERE action_count > 0;
