-- log_actions (contract §3.2b): each result is what a separate log_action call, made in array order in
-- one transaction, would return, and the ledger ends as it would. Every scenario runs both ways from the
-- same state (each undone after), and the results (less the call's timestamp) and the state must match.
BEGIN;
SELECT plan(53);

\ir fixtures/common.sql

-- The ledger's state, less what differs by design between one call and many (event rows, ids).
CREATE FUNCTION tests.state() RETURNS text
LANGUAGE sql AS $$
    SELECT concat_ws(E'\n',
        (SELECT string_agg(format('%s %s %s %s %s %s %s %s', a.action_id, a.user_id, a.emissions_saved_lbs, a.verified,
                                  a.revoked, a.logged_at, a.verified_at, a.metadata), E'\n' ORDER BY a.action_id)
           FROM bulk_sync.user_actions AS a),
        (SELECT string_agg(format('%s %s %s %s', s.user_id, s.total_emissions_lbs, s.action_count, s.last_action_at),
                           E'\n' ORDER BY s.user_id)
           FROM bulk_sync.user_stats AS s),
        (SELECT string_agg(format('%s %s %s %s', t.action_id, t.from_status, t.to_status, t.via), E'\n'
                           ORDER BY t.action_id, t.to_status)
           FROM bulk_sync.action_transitions AS t),
        (SELECT total_lbs_saved::text FROM bulk_sync.global_emissions WHERE id = 1))
$$;

-- The reference: one log_action(jsonb) call per action, in order; a BS001, BS002 or overflow becomes
-- that action's error, as log_actions reports it.
CREATE FUNCTION tests.one_by_one(p_request jsonb) RETURNS jsonb
LANGUAGE plpgsql AS $$
DECLARE
    v_results  jsonb := '[]';
    v_doc      jsonb;
    v_state    text;
    v_message  text;
    v_detail   text;
BEGIN
    FOR v_doc IN SELECT e FROM jsonb_array_elements(p_request -> 'actions') AS e LOOP
        BEGIN
            v_results := v_results || jsonb_build_array(bulk_sync.log_action(v_doc));
        EXCEPTION WHEN SQLSTATE 'BS001' OR SQLSTATE 'BS002' OR numeric_value_out_of_range THEN
            GET STACKED DIAGNOSTICS v_state = RETURNED_SQLSTATE, v_message = MESSAGE_TEXT, v_detail = PG_EXCEPTION_DETAIL;
            v_results := v_results || jsonb_build_array(jsonb_build_object(
                'success', false,
                'action_id', CASE WHEN jsonb_typeof(v_doc) = 'object' THEN v_doc -> 'action_id' END,
                'error', jsonb_build_object('code', v_state, 'message', v_message, 'detail', nullif(v_detail, ''))));
        END;
    END LOOP;
    RETURN jsonb_build_object('results', v_results,
                              'global_total_lbs', bulk_sync._amount(bulk_sync._current_global_total()));
END
$$;

-- Results without the call's timestamp (the one thing log_actions may answer once for the batch).
CREATE FUNCTION tests.untimed(p_response jsonb) RETURNS jsonb
LANGUAGE sql AS $$
    SELECT jsonb_build_object('results', (SELECT coalesce(jsonb_agg(r - 'timestamp' ORDER BY i), '[]')
                                            FROM jsonb_array_elements(p_response -> 'results') WITH ORDINALITY AS x(r, i)),
                              'global_total_lbs', p_response -> 'global_total_lbs')
$$;

-- Both ways from the same state, each undone after; kept under a name.
CREATE TABLE tests.compared (name text PRIMARY KEY, batch jsonb, single jsonb, batch_state text, single_state text);
CREATE FUNCTION tests.compare(p_name text, p_request jsonb) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    v_batch         jsonb;
    v_single        jsonb;
    v_batch_state   text;
    v_single_state  text;
BEGIN
    BEGIN
        v_batch := bulk_sync.log_actions(p_request);
        v_batch_state := tests.state();
        RAISE EXCEPTION 'undo' USING ERRCODE = 'TS001';
    EXCEPTION WHEN SQLSTATE 'TS001' THEN NULL;
    END;
    BEGIN
        v_single := tests.one_by_one(p_request);
        v_single_state := tests.state();
        RAISE EXCEPTION 'undo' USING ERRCODE = 'TS001';
    EXCEPTION WHEN SQLSTATE 'TS001' THEN NULL;
    END;
    INSERT INTO tests.compared VALUES (p_name, v_batch, v_single, v_batch_state, v_single_state);
END
$$;
CREATE FUNCTION tests.statuses(p_name text) RETURNS text
LANGUAGE sql AS $$
    SELECT string_agg(coalesce(r ->> 'status', r -> 'error' ->> 'code'), ',' ORDER BY i)
      FROM tests.compared AS c, jsonb_array_elements(c.batch -> 'results') WITH ORDINALITY AS x(r, i)
     WHERE c.name = p_name
$$;

-- The fixture: u1 with a counted action, u2 with a pending one, u3 with a revoked one, u8 near the limit.
SELECT lives_ok($$SELECT bulk_sync.bulk_backfill('{"actions": [
    {"action_id": "00000000-0000-4000-8000-0000000000a1", "user_id": "00000000-0000-4000-8000-000000000001",
     "lbs": "10.2", "logged_at": "2025-11-05T10:00:00Z", "verified": true},
    {"action_id": "00000000-0000-4000-8000-0000000000b2", "user_id": "00000000-0000-4000-8000-000000000002",
     "lbs": "4", "logged_at": "2025-11-05T11:00:00Z"},
    {"action_id": "00000000-0000-4000-8000-0000000000c3", "user_id": "00000000-0000-4000-8000-000000000003",
     "lbs": "3", "logged_at": "2025-11-05T11:00:00Z", "verified": true},
    {"action_id": "00000000-0000-4000-8000-0000000000e8", "user_id": "00000000-0000-4000-8000-000000000008",
     "lbs": "600000000000000000000000", "logged_at": "2025-11-05T11:00:00Z", "verified": true}]}')$$,
    'fixture loaded');
SELECT lives_ok($$SELECT bulk_sync.revoke_action('00000000-0000-4000-8000-0000000000c3', 'fixture')$$, 'fixture: c3 revoked');
SELECT tests.mark('fixture');

-- A helper for the scenarios: an action as JSON.
CREATE FUNCTION tests.a(p_action text, p_user text, p_lbs text, p_verified boolean DEFAULT true,
                        p_logged_at text DEFAULT '2025-11-05T12:00:00Z') RETURNS jsonb
LANGUAGE sql AS $$
    SELECT jsonb_build_object('action_id', '00000000-0000-4000-8000-0000000000' || p_action,
                              'user_id', '00000000-0000-4000-8000-00000000000' || p_user,
                              'lbs', p_lbs, 'logged_at', p_logged_at, 'verified', p_verified)
$$;

SELECT tests.compare('new and repeated', jsonb_build_object('actions', jsonb_build_array(
    tests.a('f1', '4', '1.5'), tests.a('f2', '4', '2.25'), tests.a('f1', '4', '1.50'), tests.a('f3', '5', '7', false),
    tests.a('f1', '4', '1.5', false))));
SELECT tests.compare('pending then verified', jsonb_build_object('actions', jsonb_build_array(
    tests.a('f4', '5', '3', false), tests.a('f5', '5', '1'), tests.a('f4', '5', '3.0'), tests.a('f4', '5', '3'))));
SELECT tests.compare('stored actions', jsonb_build_object('actions', jsonb_build_array(
    tests.a('a1', '1', '10.2', true, '2025-11-05T10:00:00Z'),
    tests.a('b2', '2', '4', false, '2025-11-05T11:00:00Z'),
    tests.a('b2', '2', '4', true, '2025-11-05T11:00:00Z'),
    tests.a('c3', '3', '3', true, '2025-11-05T11:00:00Z'),
    tests.a('b2', '2', '4', true, '2025-11-05T11:00:00Z'))));
SELECT tests.compare('conflicts', jsonb_build_object('actions', jsonb_build_array(
    tests.a('a1', '1', '10.3', true, '2025-11-05T10:00:00Z'),
    tests.a('f6', '6', '1'), tests.a('f6', '7', '1'), tests.a('f6', '6', '2'),
    tests.a('f6', '6', '1', true, '2025-11-05T12:00:01Z'), tests.a('f6', '6', '1.000000'))));
SELECT tests.compare('bad items', jsonb_build_object('actions', jsonb_build_array(
    tests.a('f7', '6', '-1'), '42'::jsonb, tests.a('f8', '6', '1') || '{"verifed": true}',
    tests.a('f9', '6', '2'), tests.a('f7', '6', '1'), 'null'::jsonb, tests.a('fa', '6', '1.1234567'))));
SELECT tests.compare('overflow', jsonb_build_object('actions', jsonb_build_array(
    tests.a('fb', '8', '1'), tests.a('fc', '8', '600000000000000000000000'), tests.a('fd', '8', '2'),
    tests.a('fe', '9', '500000000000000000000000'))));
-- The uuids and times of a request are first matched all at once (_in_form): two uuids in one string
-- are still one bad action_id, a time in the common form is still judged on its value, and a valid time
-- in another form is still accepted.
SELECT tests.compare('forms', jsonb_build_object('actions', jsonb_build_array(
    tests.a('e1', '6', '1'),
    tests.a('e2', '6', '1') || '{"action_id": "00000000-0000-4000-8000-0000000000e2,00000000-0000-4000-8000-0000000000e3"}',
    tests.a('e4', '6', '1', true, '2999-01-01T00:00:00Z'))));
SELECT tests.compare('another form', jsonb_build_object('actions', jsonb_build_array(
    tests.a('e5', '6', '1', true, '2025-11-05T12:00:00+01:00'), tests.a('e6', '6', '1'))));
SELECT tests.compare('empty', '{"actions": []}');

SELECT is(tests.statuses('new and repeated'), 'inserted,inserted,duplicate,inserted,duplicate', 'new and repeated: the statuses');
SELECT is(tests.statuses('pending then verified'), 'inserted,inserted,verified,duplicate', 'pending then verified: the statuses');
SELECT is(tests.statuses('stored actions'), 'duplicate,duplicate,verified,duplicate,duplicate', 'stored actions: the statuses');
SELECT is(tests.statuses('conflicts'), 'BS002,inserted,BS002,BS002,BS002,duplicate', 'conflicts: the statuses');
SELECT is(tests.statuses('bad items'), 'BS001,BS001,BS001,inserted,inserted,BS001,BS001', 'bad items: the statuses');
SELECT is(tests.statuses('overflow'), 'inserted,22003,inserted,22003', 'overflow: the overflowing actions fail alone');
SELECT is(tests.statuses('forms'), 'inserted,BS001,BS001', 'forms: the statuses');
SELECT is(tests.statuses('another form'), 'inserted,inserted', 'another form: the statuses');
SELECT is(tests.statuses('empty'), NULL, 'empty: no results');

-- The heart of it: the same answers and the same ledger as one call per action.
SELECT is(tests.untimed(c.batch), tests.untimed(c.single), c.name || ': the results are log_action''s, in order')
  FROM tests.compared AS c ORDER BY c.name;
SELECT is(c.batch_state, c.single_state, c.name || ': the ledger ends as after one call per action')
  FROM tests.compared AS c ORDER BY c.name;
SELECT is((SELECT count(DISTINCT r ->> 'timestamp') FROM jsonb_array_elements(c.batch -> 'results') AS r
            WHERE r ? 'timestamp') <= 1, true, c.name || ': one timestamp for the call')
  FROM tests.compared AS c ORDER BY c.name;

-- Running totals: each result carries the totals right after its action.
SELECT is((SELECT string_agg(r ->> 'user_total_lbs' || '/' || (r ->> 'global_total_lbs'), ' ' ORDER BY i)
             FROM tests.compared AS c, jsonb_array_elements(c.batch -> 'results') WITH ORDINALITY AS x(r, i)
            WHERE c.name = 'pending then verified'),
          '0.000000/600000000000000000000010.200000 1.000000/600000000000000000000011.200000 '
          || '4.000000/600000000000000000000014.200000 4.000000/600000000000000000000014.200000',
          'pending then verified: the user and global totals after each action');

-- The call itself.
SELECT is(tests.fingerprint(), tests.fp('fixture'), 'every comparison was undone');
SELECT throws_ok($$SELECT bulk_sync.log_actions('[]')$$, 'BS001', NULL, 'a request that is not an object is BS001');
SELECT throws_ok($$SELECT bulk_sync.log_actions('{"actions": {}}')$$, 'BS001', NULL, 'actions not an array is BS001');
SELECT throws_ok($$SELECT bulk_sync.log_actions('{}')$$, 'BS001', NULL, 'no actions is BS001');
SELECT throws_ok($$SELECT bulk_sync.log_actions('{"actions": [], "idempotency_key": "k"}')$$, 'BS001', NULL,
    'an unknown key is BS001');
SELECT throws_ok(format('SELECT bulk_sync.log_actions(%L)',
                        jsonb_build_object('actions', (SELECT jsonb_agg(tests.a('f1', '4', '1')) FROM generate_series(1, 50001)))),
                 'BS005', NULL, 'more than 50,000 actions is BS005');
SELECT is(tests.fingerprint(), tests.fp('fixture'), 'the failed calls changed nothing');

-- Applied for real: totals stay exact and one event per user is written for the batch.
SELECT lives_ok($$SELECT bulk_sync.log_actions(jsonb_build_object('actions', jsonb_build_array(
    tests.a('f1', '4', '1.5'), tests.a('f2', '4', '2.25'), tests.a('f3', '5', '7'))))$$, 'a batch applied');
SELECT is(tests.totals(), ARRAY['600000000000000000000020.950000', '600000000000000000000020.950000',
                                '600000000000000000000020.950000'], 'the three totals agree');
SELECT is((SELECT count(*) FROM bulk_sync.events_since(0, 10000)
            WHERE payload ->> 'user_id' IN ('00000000-0000-4000-8000-000000000004', '00000000-0000-4000-8000-000000000005')),
          2::bigint, 'one event per user of the batch');

-- The set statements run with generic plans, forced around them alone: whichever path a call takes,
-- the caller's plan_cache_mode is the same after it.
SELECT set_config('plan_cache_mode', 'force_custom_plan', true);
SELECT lives_ok($$SELECT bulk_sync.log_actions(jsonb_build_object('actions', jsonb_build_array(
    tests.a('f4', '6', '1'), tests.a('f5', '6', '-1'))))$$, 'a batch with a bad action');
SELECT is(current_setting('plan_cache_mode'), 'force_custom_plan', 'a set-based call keeps the caller''s plan_cache_mode');
SELECT lives_ok($$SELECT bulk_sync.log_actions(jsonb_build_object('actions', jsonb_build_array(
    tests.a('fb', '8', '1'), tests.a('fc', '8', '600000000000000000000000'))))$$, 'a batch that overflows');
SELECT is(current_setting('plan_cache_mode'), 'force_custom_plan', 'so does a call that takes the per-action path');

SELECT * FROM finish();
ROLLBACK;
