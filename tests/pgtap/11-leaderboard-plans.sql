-- The leaderboard's queries are served by the index user_stats_leaderboard: the top of the board
-- and the count of users ahead of one user are index scans, not sorts of user_stats.
BEGIN;
SELECT plan(4);

INSERT INTO bulk_sync.user_stats (user_id, total_emissions_lbs, action_count, last_action_at)
SELECT format('00000000-0000-4000-8000-%s', lpad(i::text, 12, '0'))::uuid, (i % 5000) / 7.0,
       1, timestamptz '2025-11-05T10:00:00Z' + i * interval '1 second'
  FROM generate_series(1, 50000) AS i;
ANALYZE bulk_sync.user_stats;

CREATE FUNCTION pg_temp.plan(p_query text) RETURNS text LANGUAGE plpgsql AS $$
DECLARE
    v_line  text;
    v_plan  text := '';
BEGIN
    FOR v_line IN EXECUTE 'EXPLAIN (COSTS OFF) ' || p_query LOOP
        v_plan := v_plan || v_line || E'\n';
    END LOOP;
    RETURN v_plan;
END
$$;

-- The statements below are the ones inside bulk_sync.leaderboard and bulk_sync.user_rank.
SELECT matches(pg_temp.plan($q$
    SELECT s.user_id FROM bulk_sync.user_stats AS s
     WHERE s.action_count > 0
     ORDER BY s.leaderboard_key, s.last_action_at, s.user_id
     LIMIT 10 OFFSET 0 $q$),
    'Index (Only )?Scan using user_stats_leaderboard', 'the top 10 is an index scan of user_stats_leaderboard');
SELECT doesnt_match(pg_temp.plan($q$
    SELECT s.user_id FROM bulk_sync.user_stats AS s
     WHERE s.action_count > 0
     ORDER BY s.leaderboard_key, s.last_action_at, s.user_id
     LIMIT 10 OFFSET 0 $q$),
    'Sort', 'the top 10 needs no sort');
SELECT matches(pg_temp.plan($q$
    SELECT count(*) FROM bulk_sync.user_stats AS o
     WHERE o.action_count > 0
       AND (o.leaderboard_key, o.last_action_at, o.user_id)
           < ((-'700.5'::numeric), timestamptz '2025-11-05T12:00:00Z', '00000000-0000-4000-8000-000000000500'::uuid) $q$),
    '(Index Scan|Index Only Scan|Bitmap Index Scan) (using|on) user_stats_leaderboard',
    'counting the users ahead of a high rank is an index scan');
SELECT is((SELECT rank FROM bulk_sync.user_rank('00000000-0000-4000-8000-000000004999')), 1::bigint,
          'the user with the top total ranks first');

SELECT * FROM finish();
ROLLBACK;
