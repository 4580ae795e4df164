-- Privileges, in one place: nothing for PUBLIC, then what each of the three roles may do.
-- Runs after every other definition so that new functions never keep PostgreSQL's default EXECUTE.
-- The three roles lose everything too, so that a grant an earlier release made (or a DBA added by
-- hand) does not outlive this file: migrate applies it in one transaction, nobody sees the gap.
REVOKE ALL ON SCHEMA bulk_sync FROM PUBLIC, bulk_sync_reader, bulk_sync_writer, bulk_sync_admin;
REVOKE ALL ON ALL TABLES IN SCHEMA bulk_sync FROM PUBLIC, bulk_sync_reader, bulk_sync_writer, bulk_sync_admin;
REVOKE ALL ON ALL SEQUENCES IN SCHEMA bulk_sync FROM PUBLIC, bulk_sync_reader, bulk_sync_writer, bulk_sync_admin;
REVOKE ALL ON ALL FUNCTIONS IN SCHEMA bulk_sync FROM PUBLIC, bulk_sync_reader, bulk_sync_writer, bulk_sync_admin;

GRANT USAGE ON SCHEMA bulk_sync TO bulk_sync_reader, bulk_sync_writer, bulk_sync_admin;

-- Writers record actions; they read nothing directly.
GRANT EXECUTE ON FUNCTION
    bulk_sync.log_action(jsonb),
    bulk_sync.log_action(uuid, uuid, numeric, timestamptz, boolean, jsonb),
    bulk_sync.log_actions(jsonb),
    bulk_sync.bulk_backfill(jsonb),
    bulk_sync.verify_action(uuid, text),
    bulk_sync.revoke_action(uuid, text, text),
    -- the runner's file load: stage (COPY) and check each part, find BS002, apply in chunks, end the
    -- load; the same core as bulk_backfill
    bulk_sync._stage_open(uuid),
    bulk_sync._stage_check(uuid, bigint, integer),
    bulk_sync._stage_load(uuid, integer, integer, jsonb),
    bulk_sync._stage_apply(uuid, uuid, uuid, text, text, text),
    bulk_sync._stage_close(uuid)
TO bulk_sync_writer;

-- Readers see everything and call the read functions.
GRANT SELECT ON ALL TABLES IN SCHEMA bulk_sync TO bulk_sync_reader;
-- but not the tokens of loads in progress, which let a writer add to or end a load (each checked
-- row of a load carries its token too)
REVOKE SELECT ON bulk_sync._loads, bulk_sync._load_rows FROM bulk_sync_reader;
GRANT EXECUTE ON FUNCTION
    bulk_sync.leaderboard(integer, integer),
    bulk_sync.user_rank(uuid),
    bulk_sync.leaderboard_around(uuid, integer),
    bulk_sync.leaderboard_json(integer, integer),
    bulk_sync.global_total(timestamptz),
    bulk_sync.user_total(uuid, timestamptz),
    -- the current totals they read (global_total and user_total run as their caller)
    bulk_sync._current_global_total(),
    bulk_sync._current_user_total(uuid),
    bulk_sync.events_since(bigint, integer),
    bulk_sync.status()
TO bulk_sync_reader;

-- Admins are members of both roles (0004.roles) and run the operational functions.
GRANT EXECUTE ON FUNCTION
    bulk_sync.reconcile(jsonb),
    bulk_sync.publish_events(integer, boolean),
    bulk_sync.prune_events(interval),
    bulk_sync._end_abandoned_loads()
TO bulk_sync_admin;
