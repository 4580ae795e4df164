-- Bad input, table-driven: every BS001 rule of the contract (section 4) for log_action(jsonb), the
-- positional log_action and bulk_backfill, plus BS002/BS004/BS006 and NUMERIC(30,6) overflow (22003).
-- Each case must fail with its SQLSTATE and leave every bulk_sync table exactly as it was.
BEGIN;
SELECT plan(362);

\ir fixtures/common.sql

-- The DETAIL of the error a statement raises (NULL when it raises none).
CREATE FUNCTION tests.error_detail(p_sql text) RETURNS text
LANGUAGE plpgsql AS $$
DECLARE
    v_detail  text;
BEGIN
    EXECUTE p_sql;
    RETURN NULL;
EXCEPTION WHEN OTHERS THEN
    GET STACKED DIAGNOSTICS v_detail = PG_EXCEPTION_DETAIL;
    RETURN v_detail;
END
$$;

-- Each case uses its own action_ids, so a case that wrongly succeeds cannot change what the next one sees.
CREATE SEQUENCE tests.action_ids START 4096;
CREATE FUNCTION tests.new_action_id() RETURNS text
LANGUAGE sql AS $$ SELECT '00000000-0000-4000-8000-' || lpad(to_hex(nextval('tests.action_ids')), 12, '0') $$;

-- A valid log_action request with one key replaced (p_value NULL: the key removed).
CREATE FUNCTION tests.req(p_key text, p_value jsonb) RETURNS jsonb
LANGUAGE sql AS $$
    SELECT CASE WHEN p_value IS NULL THEN r - p_key ELSE r || jsonb_build_object(p_key, p_value) END
      FROM (SELECT jsonb_build_object('action_id', tests.new_action_id(), 'user_id', '00000000-0000-4000-8000-000000000005',
                                      'lbs', '1.5', 'logged_at', '2025-11-05T10:00:00Z', 'verified', true) AS r) AS x
$$;
-- The SQL of log_action(jsonb) with that request.
CREATE FUNCTION tests.log_sql(p_key text, p_value jsonb) RETURNS text
LANGUAGE sql AS $$
    SELECT format('SELECT bulk_sync.log_action(%L::jsonb)', tests.req(p_key, p_value))
$$;
-- The SQL of bulk_backfill with a valid first action and the modified request as the second one.
CREATE FUNCTION tests.bulk_sql(p_key text, p_value jsonb) RETURNS text
LANGUAGE sql AS $$
    SELECT format('SELECT bulk_sync.bulk_backfill(%L::jsonb)', jsonb_build_object('actions', jsonb_build_array(
        jsonb_build_object('action_id', tests.new_action_id(), 'user_id', '00000000-0000-4000-8000-000000000005',
                           'lbs', '2', 'logged_at', '2025-11-05T09:00:00Z', 'verified', true),
        tests.req(p_key, p_value))))
$$;
-- The SQL of the positional log_action with the given argument list.
-- '00000000-0000-4000-8000-0000000000f1' in the arguments is replaced by a new action_id.
CREATE FUNCTION tests.pos_sql(p_args text) RETURNS text
LANGUAGE sql AS $$
    SELECT format('SELECT bulk_sync.log_action(%s)', replace(p_args, '00000000-0000-4000-8000-0000000000f1', tests.new_action_id()))
$$;

-- The fixture: the seed's three actions, a pending one, a revoked one, and u8 at 6 * 10^23.
SELECT lives_ok($$SELECT bulk_sync.bulk_backfill('{"actions": [
    {"action_id": "00000000-0000-4000-8000-0000000000a1", "user_id": "00000000-0000-4000-8000-000000000001",
     "lbs": "10.2", "logged_at": "2025-11-05T10:00:00Z", "verified": true},
    {"action_id": "00000000-0000-4000-8000-0000000000a2", "user_id": "00000000-0000-4000-8000-000000000002",
     "lbs": "10.3", "logged_at": "2025-11-05T10:05:00Z", "verified": true},
    {"action_id": "00000000-0000-4000-8000-0000000000a3", "user_id": "00000000-0000-4000-8000-000000000003",
     "lbs": "10.4", "logged_at": "2025-11-05T10:10:00Z", "verified": true},
    {"action_id": "00000000-0000-4000-8000-0000000000b1", "user_id": "00000000-0000-4000-8000-000000000002",
     "lbs": "4", "logged_at": "2025-11-05T11:00:00Z"},
    {"action_id": "00000000-0000-4000-8000-0000000000c1", "user_id": "00000000-0000-4000-8000-000000000003",
     "lbs": "3", "logged_at": "2025-11-05T11:00:00Z", "verified": true},
    {"action_id": "00000000-0000-4000-8000-0000000000e1", "user_id": "00000000-0000-4000-8000-000000000008",
     "lbs": "600000000000000000000000", "logged_at": "2025-11-05T11:00:00Z", "verified": true},
    {"action_id": "00000000-0000-4000-8000-0000000000e2", "user_id": "00000000-0000-4000-8000-000000000008",
     "lbs": "600000000000000000000000", "logged_at": "2025-11-05T11:05:00Z"}],
    "idempotency_key": "fixture"}')$$, 'fixture loaded');
SELECT lives_ok($$SELECT bulk_sync.revoke_action('00000000-0000-4000-8000-0000000000c1', 'fixture: revoked')$$,
    'fixture: c1 revoked');
SELECT is((SELECT total_lbs_saved::text FROM bulk_sync.global_emissions WHERE id = 1), '600000000000000000000030.900000',
    'fixture: the global total');

------------------------------------------------------------------------------------------------------
-- The cases. names: a regex the error message must match (the field it names), where the rule has one.
CREATE TABLE tests.bad_inputs (
    id         serial PRIMARY KEY,
    case_name  text   NOT NULL UNIQUE,
    sql        text   NOT NULL,
    sqlstate   text   NOT NULL,
    names      text
);

INSERT INTO tests.bad_inputs (case_name, sql, sqlstate, names) VALUES
-- log_action(jsonb): required keys
('json: action_id missing',            tests.log_sql('action_id', NULL),                 'BS001', 'action_id'),
('json: action_id null',               tests.log_sql('action_id', 'null'),               'BS001', 'action_id'),
('json: user_id missing',              tests.log_sql('user_id', NULL),                   'BS001', 'user_id'),
('json: user_id null',                 tests.log_sql('user_id', 'null'),                 'BS001', 'user_id'),
('json: lbs missing',                  tests.log_sql('lbs', NULL),                       'BS001', 'lbs'),
('json: lbs null',                     tests.log_sql('lbs', 'null'),                     'BS001', 'lbs'),
('json: logged_at missing',            tests.log_sql('logged_at', NULL),                 'BS001', 'logged_at'),
('json: logged_at null',               tests.log_sql('logged_at', 'null'),               'BS001', 'logged_at'),
-- unknown keys
('json: unknown key verifed',          tests.log_sql('verifed', 'true'),                 'BS001', 'verifed'),
('json: unknown key lbs_saved',        tests.log_sql('lbs_saved', '"1"'),                'BS001', 'lbs_saved'),
-- uuids
('json: action_id a placeholder',      tests.log_sql('action_id', '"a1-uuid"'),          'BS001', 'action_id'),
('json: action_id empty',              tests.log_sql('action_id', '""'),                 'BS001', 'action_id'),
('json: action_id a number',           tests.log_sql('action_id', '42'),                 'BS001', 'action_id'),
('json: user_id too short',            tests.log_sql('user_id', '"00000000-0000-4000-8000-00000000001"'), 'BS001', 'user_id'),
('json: user_id not hex',              tests.log_sql('user_id', '"00000000-0000-4000-8000-00000000000g"'), 'BS001', 'user_id'),
-- timestamps
('json: logged_at malformed',          tests.log_sql('logged_at', '"2025-13-45T10:00:00Z"'), 'BS001', 'logged_at'),
('json: logged_at 30 February',        tests.log_sql('logged_at', '"2025-02-30T10:00:00Z"'), 'BS001', 'logged_at'),
('json: logged_at text',               tests.log_sql('logged_at', '"yesterday"'),        'BS001', 'logged_at'),
('json: logged_at a number',           tests.log_sql('logged_at', '1762336800'),         'BS001', 'logged_at'),
('json: logged_at without zone',       tests.log_sql('logged_at', '"2025-11-05T10:00:00"'), 'BS001', 'logged_at'),
('json: logged_at without zone, space', tests.log_sql('logged_at', '"2025-11-05 10:00:00"'), 'BS001', 'logged_at'),
('json: logged_at a date without zone', tests.log_sql('logged_at', '"2025-11-05"'),      'BS001', 'logged_at'),
('json: logged_at infinity',           tests.log_sql('logged_at', '"infinity"'),         'BS001', 'logged_at'),
('json: logged_at 5 min 1 s ahead',    tests.log_sql('logged_at', to_jsonb(now() + interval '5 minutes 1 second')), 'BS001', 'logged_at'),
('json: logged_at next year',          tests.log_sql('logged_at', to_jsonb(now() + interval '1 year')), 'BS001', 'logged_at'),
-- lbs
('json: lbs not a number',             tests.log_sql('lbs', '"abc"'),                    'BS001', 'lbs'),
('json: lbs empty string',             tests.log_sql('lbs', '""'),                       'BS001', 'lbs'),
('json: lbs with a comma',             tests.log_sql('lbs', '"10,2"'),                   'BS001', 'lbs'),
('json: lbs hexadecimal',              tests.log_sql('lbs', '"0x10"'),                   'BS001', 'lbs'),
('json: lbs a boolean',                tests.log_sql('lbs', 'true'),                     'BS001', 'lbs'),
('json: lbs an object',                tests.log_sql('lbs', '{"value": 1}'),             'BS001', 'lbs'),
('json: lbs NaN',                      tests.log_sql('lbs', '"NaN"'),                    'BS001', 'lbs'),
('json: lbs Infinity',                 tests.log_sql('lbs', '"Infinity"'),               'BS001', 'lbs'),
('json: lbs -Infinity',                tests.log_sql('lbs', '"-Infinity"'),              'BS001', 'lbs'),
('json: lbs negative string',          tests.log_sql('lbs', '"-1"'),                     'BS001', 'lbs'),
('json: lbs negative number',          tests.log_sql('lbs', '-0.000001'),                'BS001', 'lbs'),
('json: lbs 7 decimals',               tests.log_sql('lbs', '"10.1234567"'),             'BS001', 'lbs'),
('json: lbs 7 significant decimals with trailing zero', tests.log_sql('lbs', '"10.12345670"'), 'BS001', 'lbs'),
('json: lbs 7 decimals as a number',   tests.log_sql('lbs', '0.0000001'),                'BS001', 'lbs'),
('json: lbs 1e24',                     tests.log_sql('lbs', '"1e24"'),                   'BS001', 'lbs'),
('json: lbs 10^24 in digits',          tests.log_sql('lbs', '"1000000000000000000000000"'), 'BS001', 'lbs'),
('json: lbs 10^24 as a JSON number',   tests.log_sql('lbs', '1000000000000000000000000'), 'BS001', 'lbs'),
-- longer than numeric's input reads (16383 decimals, 131072 digits)
('json: lbs 10^140000 in digits',      tests.log_sql('lbs', to_jsonb('1' || repeat('0', 140000))), 'BS001', 'lbs'),
('json: lbs a 7th decimal after 20000 zeros', tests.log_sql('lbs', to_jsonb('1.' || repeat('0', 20000) || '1')), 'BS001', 'lbs'),
('json: lbs an exponent form of 2000 digits', tests.log_sql('lbs', to_jsonb('1' || repeat('0', 2000) || 'e-1990')), 'BS001', 'lbs'),
-- verified, metadata, the request itself
('json: verified a string',            tests.log_sql('verified', '"true"'),              'BS001', 'verified'),
('json: verified a number',            tests.log_sql('verified', '1'),                   'BS001', 'verified'),
('json: metadata a string',            tests.log_sql('metadata', '"note"'),              'BS001', 'metadata'),
('json: metadata an array',            tests.log_sql('metadata', '[]'),                  'BS001', 'metadata'),
('json: request an array',             $$SELECT bulk_sync.log_action('[]'::jsonb)$$,     'BS001', NULL),
('json: request SQL NULL',             $$SELECT bulk_sync.log_action(NULL::jsonb)$$,     'BS001', NULL),

('json: logged_at before the year 1 in UTC', tests.log_sql('logged_at', '"0001-01-01T00:00:00+01:00"'), 'BS001', 'logged_at'),

-- positional log_action
('pos: logged_at BC',     tests.pos_sql($$'00000000-0000-4000-8000-0000000000f1', '00000000-0000-4000-8000-000000000005', 1, '0044-03-15 00:00:00+00 BC', true$$), 'BS001', 'logged_at'),
('pos: action_id NULL',  tests.pos_sql($$NULL, '00000000-0000-4000-8000-000000000005', 1, '2025-11-05T10:00:00Z', true$$), 'BS001', 'action_id'),
('pos: user_id NULL',    tests.pos_sql($$'00000000-0000-4000-8000-0000000000f1', NULL, 1, '2025-11-05T10:00:00Z', true$$), 'BS001', 'user_id'),
('pos: lbs NULL',        tests.pos_sql($$'00000000-0000-4000-8000-0000000000f1', '00000000-0000-4000-8000-000000000005', NULL, '2025-11-05T10:00:00Z', true$$), 'BS001', 'lbs'),
('pos: logged_at NULL',  tests.pos_sql($$'00000000-0000-4000-8000-0000000000f1', '00000000-0000-4000-8000-000000000005', 1, NULL, true$$), 'BS001', 'logged_at'),
('pos: verified NULL',   tests.pos_sql($$'00000000-0000-4000-8000-0000000000f1', '00000000-0000-4000-8000-000000000005', 1, '2025-11-05T10:00:00Z', NULL$$), 'BS001', 'verified'),
('pos: lbs NaN',         tests.pos_sql($$'00000000-0000-4000-8000-0000000000f1', '00000000-0000-4000-8000-000000000005', 'NaN', '2025-11-05T10:00:00Z', true$$), 'BS001', 'lbs'),
('pos: lbs Infinity',    tests.pos_sql($$'00000000-0000-4000-8000-0000000000f1', '00000000-0000-4000-8000-000000000005', 'Infinity', '2025-11-05T10:00:00Z', true$$), 'BS001', 'lbs'),
('pos: lbs -Infinity',   tests.pos_sql($$'00000000-0000-4000-8000-0000000000f1', '00000000-0000-4000-8000-000000000005', '-Infinity', '2025-11-05T10:00:00Z', true$$), 'BS001', 'lbs'),
('pos: lbs negative',    tests.pos_sql($$'00000000-0000-4000-8000-0000000000f1', '00000000-0000-4000-8000-000000000005', -0.000001, '2025-11-05T10:00:00Z', true$$), 'BS001', 'lbs'),
('pos: lbs 7 decimals',  tests.pos_sql($$'00000000-0000-4000-8000-0000000000f1', '00000000-0000-4000-8000-000000000005', 10.1234567, '2025-11-05T10:00:00Z', true$$), 'BS001', 'lbs'),
('pos: lbs 1e24',        tests.pos_sql($$'00000000-0000-4000-8000-0000000000f1', '00000000-0000-4000-8000-000000000005', 1e24, '2025-11-05T10:00:00Z', true$$), 'BS001', 'lbs'),
('pos: logged_at infinity', tests.pos_sql($$'00000000-0000-4000-8000-0000000000f1', '00000000-0000-4000-8000-000000000005', 1, 'infinity', true$$), 'BS001', 'logged_at'),
('pos: logged_at -infinity', tests.pos_sql($$'00000000-0000-4000-8000-0000000000f1', '00000000-0000-4000-8000-000000000005', 1, '-infinity', true$$), 'BS001', 'logged_at'),
('pos: logged_at 5 min 1 s ahead', tests.pos_sql(format($$'00000000-0000-4000-8000-0000000000f1', '00000000-0000-4000-8000-000000000005', 1, %L, true$$, now() + interval '5 minutes 1 second')), 'BS001', 'logged_at'),
('pos: metadata an array', tests.pos_sql($$'00000000-0000-4000-8000-0000000000f1', '00000000-0000-4000-8000-000000000005', 1, '2025-11-05T10:00:00Z', true, '[1]'$$), 'BS001', 'metadata'),
('pos: metadata a number', tests.pos_sql($$'00000000-0000-4000-8000-0000000000f1', '00000000-0000-4000-8000-000000000005', 1, '2025-11-05T10:00:00Z', true, '7'$$), 'BS001', 'metadata'),

-- bulk_backfill: the request
('bulk: request SQL NULL',      $$SELECT bulk_sync.bulk_backfill(NULL)$$,                                   'BS001', NULL),
('bulk: request an array',      $$SELECT bulk_sync.bulk_backfill('[]')$$,                                   'BS001', NULL),
('bulk: actions missing',       $$SELECT bulk_sync.bulk_backfill('{"idempotency_key": "k"}')$$,             'BS001', 'actions'),
('bulk: actions null',          $$SELECT bulk_sync.bulk_backfill('{"actions": null}')$$,                    'BS001', 'actions'),
('bulk: actions an object',     $$SELECT bulk_sync.bulk_backfill('{"actions": {"action_id": "00000000-0000-4000-8000-0000000000f1"}}')$$, 'BS001', 'actions'),
('bulk: actions a string',      $$SELECT bulk_sync.bulk_backfill('{"actions": "[]"}')$$,                    'BS001', 'actions'),
('bulk: unknown key',           $$SELECT bulk_sync.bulk_backfill('{"actions": [], "idempotency": "k"}')$$,  'BS001', 'idempotency'),
-- bulk_backfill: one bad action after a valid one
('bulk: action not an object',  $$SELECT bulk_sync.bulk_backfill('{"actions": [42]}')$$,                    'BS001', NULL),
('bulk: action null',           $$SELECT bulk_sync.bulk_backfill('{"actions": [null]}')$$,                  'BS001', NULL),
('bulk: action_id missing',     tests.bulk_sql('action_id', NULL),                 'BS001', 'action_id'),
('bulk: user_id missing',       tests.bulk_sql('user_id', NULL),                   'BS001', 'user_id'),
('bulk: user_id null',          tests.bulk_sql('user_id', 'null'),                 'BS001', 'user_id'),
('bulk: lbs missing',           tests.bulk_sql('lbs', NULL),                       'BS001', 'lbs'),
('bulk: logged_at missing',     tests.bulk_sql('logged_at', NULL),                 'BS001', 'logged_at'),
('bulk: unknown key verifed',   tests.bulk_sql('verifed', 'true'),                 'BS001', 'verifed'),
('bulk: action_id malformed',   tests.bulk_sql('action_id', '"a1-uuid"'),          'BS001', 'action_id'),
('bulk: user_id malformed',     tests.bulk_sql('user_id', '"user1-uuid"'),         'BS001', 'user_id'),
('bulk: logged_at malformed',   tests.bulk_sql('logged_at', '"2025-02-30T10:00:00Z"'), 'BS001', 'logged_at'),
('bulk: logged_at without zone', tests.bulk_sql('logged_at', '"2025-11-05T10:00:00"'), 'BS001', 'logged_at'),
('bulk: logged_at a date without zone', tests.bulk_sql('logged_at', '"2025-11-05"'), 'BS001', 'logged_at'),
('bulk: logged_at 5 min 1 s ahead', tests.bulk_sql('logged_at', to_jsonb(now() + interval '5 minutes 1 second')), 'BS001', 'logged_at'),
('bulk: lbs not a number',      tests.bulk_sql('lbs', '"ten"'),                    'BS001', 'lbs'),
('bulk: lbs NaN',               tests.bulk_sql('lbs', '"NaN"'),                    'BS001', 'lbs'),
('bulk: lbs Infinity',          tests.bulk_sql('lbs', '"Infinity"'),               'BS001', 'lbs'),
('bulk: lbs -Infinity',         tests.bulk_sql('lbs', '"-Infinity"'),              'BS001', 'lbs'),
('bulk: lbs negative',          tests.bulk_sql('lbs', '-3'),                       'BS001', 'lbs'),
('bulk: lbs 7 decimals',        tests.bulk_sql('lbs', '"10.1234567"'),             'BS001', 'lbs'),
('bulk: lbs 1e24',              tests.bulk_sql('lbs', '"1e24"'),                   'BS001', 'lbs'),
('bulk: lbs 10^24 as a number', tests.bulk_sql('lbs', '1000000000000000000000000'), 'BS001', 'lbs'),
('bulk: verified a string',     tests.bulk_sql('verified', '"yes"'),               'BS001', 'verified'),
('bulk: metadata an array',     tests.bulk_sql('metadata', '["x"]'),               'BS001', 'metadata'),
-- a batch's uuids and times are first matched together (_in_form): two in one string are still one bad value,
-- and a time in the common form is still judged on its value
('bulk: action_id two uuids with a comma', tests.bulk_sql('action_id', '"00000000-0000-4000-8000-0000000000f1,00000000-0000-4000-8000-0000000000f2"'), 'BS001', 'action_id'),
('bulk: user_id two uuids with a comma', tests.bulk_sql('user_id', '"00000000-0000-4000-8000-000000000005,00000000-0000-4000-8000-000000000006"'), 'BS001', 'user_id'),
('bulk: logged_at two times with a comma', tests.bulk_sql('logged_at', '"2025-11-05T10:00:00Z,2025-11-05T10:00:00Z"'), 'BS001', 'logged_at'),
('bulk: logged_at in the common form, in 2999', tests.bulk_sql('logged_at', '"2999-01-01T00:00:00Z"'), 'BS001', 'logged_at'),

-- verify / revoke
('revoke: empty reason',        $$SELECT bulk_sync.revoke_action('00000000-0000-4000-8000-0000000000a1', '')$$,   'BS001', 'reason'),
('revoke: NULL reason',         $$SELECT bulk_sync.revoke_action('00000000-0000-4000-8000-0000000000a1', NULL)$$, 'BS001', 'reason'),
('verify: NULL action_id',      $$SELECT bulk_sync.verify_action(NULL)$$,                                          'BS001', NULL),
('verify: unknown action',      $$SELECT bulk_sync.verify_action('00000000-0000-4000-8000-0000000000ff')$$,        'BS004', NULL),
('revoke: unknown action',      $$SELECT bulk_sync.revoke_action('00000000-0000-4000-8000-0000000000ff', 'spam')$$, 'BS004', NULL),
('verify: a revoked action',    $$SELECT bulk_sync.verify_action('00000000-0000-4000-8000-0000000000c1')$$,        'BS006', NULL),
('json: known action_id, other lbs', tests.log_sql('action_id', '"00000000-0000-4000-8000-0000000000a1"'),          'BS002', NULL),

-- NUMERIC(30,6) overflow: u8 already has 6 * 10^23
('overflow: log_action, the user would reach 1.2 * 10^24',
    $$SELECT bulk_sync.log_action('{"action_id": "00000000-0000-4000-8000-0000000000e3", "user_id": "00000000-0000-4000-8000-000000000008",
        "lbs": "600000000000000000000000", "logged_at": "2025-11-05T12:00:00Z", "verified": true}')$$, '22003', NULL),
('overflow: positional log_action, the user would reach 1.2 * 10^24',
    tests.pos_sql($$'00000000-0000-4000-8000-0000000000e3', '00000000-0000-4000-8000-000000000008', 600000000000000000000000, '2025-11-05T12:00:00Z', true$$), '22003', NULL),
('overflow: bulk_backfill, two actions of 6 * 10^23 for a new user',
    $$SELECT bulk_sync.bulk_backfill('{"actions": [
        {"action_id": "00000000-0000-4000-8000-0000000000e4", "user_id": "00000000-0000-4000-8000-000000000009",
         "lbs": "600000000000000000000000", "logged_at": "2025-11-05T12:00:00Z", "verified": true},
        {"action_id": "00000000-0000-4000-8000-0000000000e5", "user_id": "00000000-0000-4000-8000-000000000009",
         "lbs": "600000000000000000000000", "logged_at": "2025-11-05T12:00:00Z", "verified": true}]}')$$, '22003', NULL),
('overflow: verify_action of u8''s pending 6 * 10^23',
    $$SELECT bulk_sync.verify_action('00000000-0000-4000-8000-0000000000e2')$$, '22003', NULL),
('overflow: verified resubmission of u8''s pending 6 * 10^23',
    $$SELECT bulk_sync.log_action('{"action_id": "00000000-0000-4000-8000-0000000000e2", "user_id": "00000000-0000-4000-8000-000000000008",
        "lbs": "600000000000000000000000", "logged_at": "2025-11-05T11:05:00Z", "verified": true}')$$, '22003', NULL),
('overflow: another user, the global total would reach 1.2 * 10^24',
    $$SELECT bulk_sync.log_action('{"action_id": "00000000-0000-4000-8000-0000000000e6", "user_id": "00000000-0000-4000-8000-00000000000a",
        "lbs": "600000000000000000000000", "logged_at": "2025-11-05T12:00:00Z", "verified": true}')$$, '22003', NULL);

-- For each case: the SQLSTATE, the field named in the message (where the rule has one), nothing changed.
CREATE FUNCTION tests.run_bad_inputs() RETURNS SETOF text
LANGUAGE plpgsql AS $$
DECLARE
    v_case    tests.bad_inputs;
    v_before  text;
BEGIN
    FOR v_case IN SELECT * FROM tests.bad_inputs ORDER BY id LOOP
        v_before := tests.fingerprint();
        RETURN NEXT throws_ok(v_case.sql, v_case.sqlstate, NULL, v_case.case_name || ': ' || v_case.sqlstate);
        IF v_case.names IS NOT NULL THEN
            RETURN NEXT throws_matching(v_case.sql, '\m' || v_case.names || '\M',
                                        v_case.case_name || ': the message names ' || v_case.names);
        END IF;
        RETURN NEXT is(tests.fingerprint(), v_before, v_case.case_name || ': nothing changed');
    END LOOP;
END
$$;

SELECT is((SELECT count(*) FROM tests.bad_inputs) >= 30, true, 'at least 30 bad-input cases');
SELECT * FROM tests.run_bad_inputs();

-- DETAIL carries the offending value.
SELECT matches(tests.error_detail(tests.log_sql('lbs', '"NaN"')), 'NaN', 'the DETAIL of a NaN lbs shows NaN');
SELECT matches(tests.error_detail(tests.log_sql('logged_at', '"2025-11-05T10:00:00"')), '2025-11-05T10:00:00',
    'the DETAIL of a zoneless logged_at shows it');
SELECT matches(tests.error_detail(tests.log_sql('verifed', 'true')), 'verifed', 'the DETAIL of an unknown key shows it');

------------------------------------------------------------------------------------------------------
-- Accepted edge values
SELECT lives_ok($$SELECT bulk_sync.log_action('{"action_id": "00000000-0000-4000-8000-0000000000f1",
    "user_id": "00000000-0000-4000-8000-000000000006", "lbs": "10.2000000", "logged_at": "2025-11-05T10:00:00Z"}')$$,
    'lbs "10.2000000": trailing zeros are accepted');
SELECT is((SELECT emissions_saved_lbs::text FROM bulk_sync.user_actions WHERE action_id = '00000000-0000-4000-8000-0000000000f1'),
    '10.200000', 'and stored as 10.200000');
SELECT lives_ok($$SELECT bulk_sync.log_action('{"action_id": "00000000-0000-4000-8000-0000000000f2",
    "user_id": "00000000-0000-4000-8000-000000000006", "lbs": "999999999999999999999999.999999",
    "logged_at": "2025-11-05T10:00:00Z"}')$$, 'lbs 999999999999999999999999.999999 (string) is accepted');
SELECT is((SELECT emissions_saved_lbs::text FROM bulk_sync.user_actions WHERE action_id = '00000000-0000-4000-8000-0000000000f2'),
    '999999999999999999999999.999999', 'and stored exactly');
SELECT lives_ok($$SELECT bulk_sync.log_action('{"action_id": "00000000-0000-4000-8000-0000000000f3",
    "user_id": "00000000-0000-4000-8000-000000000006", "lbs": 999999999999999999999999.999999,
    "logged_at": "2025-11-05T10:00:00Z"}')$$, 'lbs 999999999999999999999999.999999 (JSON number) is accepted');
SELECT is((SELECT emissions_saved_lbs::text FROM bulk_sync.user_actions WHERE action_id = '00000000-0000-4000-8000-0000000000f3'),
    '999999999999999999999999.999999', 'and stored exactly, not through a float');
SELECT lives_ok(tests.pos_sql($$'00000000-0000-4000-8000-0000000000f4', '00000000-0000-4000-8000-000000000006',
    999999999999999999999999.9999990, '2025-11-05T10:00:00Z'$$), 'positional: the largest amount with a trailing zero is accepted');
SELECT lives_ok(format('SELECT bulk_sync.log_action(%L::jsonb)', jsonb_build_object(
        'action_id', '00000000-0000-4000-8000-0000000000fa', 'user_id', '00000000-0000-4000-8000-000000000006',
        'lbs', repeat('0', 5000) || '2.5' || repeat('0', 20000), 'logged_at', '2025-11-05T10:00:00Z')),
    'lbs padded with more zeros than numeric reads is accepted');
SELECT is((SELECT emissions_saved_lbs::text FROM bulk_sync.user_actions WHERE action_id = '00000000-0000-4000-8000-0000000000fa'),
    '2.500000', 'and stored as 2.500000');
SELECT is((SELECT jsonb_agg(r -> 'success' ORDER BY n)
             FROM jsonb_array_elements(bulk_sync.log_actions(jsonb_build_object('actions', jsonb_build_array(
                      jsonb_build_object('action_id', '00000000-0000-4000-8000-0000000000fb',
                                         'user_id', '00000000-0000-4000-8000-000000000006',
                                         'lbs', '1' || repeat('0', 140000), 'logged_at', '2025-11-05T10:00:00Z'),
                      jsonb_build_object('action_id', '00000000-0000-4000-8000-0000000000fc',
                                         'user_id', '00000000-0000-4000-8000-000000000006',
                                         'lbs', '1.' || repeat('0', 20000), 'logged_at', '2025-11-05T10:00:00Z'))))
                  -> 'results') WITH ORDINALITY AS e(r, n)),
    '[false, true]', 'log_actions: an amount too long for numeric fails alone; a padded one is logged');
SELECT lives_ok(tests.bulk_sql('lbs', '"0.000001"'), 'bulk: lbs 0.000001 is accepted');
SELECT lives_ok($$SELECT bulk_sync.log_action('{"action_id": "00000000-0000-4000-8000-0000000000f8",
    "user_id": "00000000-0000-4000-8000-000000000006", "lbs": "-0", "logged_at": "2025-11-05T10:00:00Z"}')$$,
    'lbs "-0" is zero, as the JSON number -0 is, not a negative amount');
SELECT is((SELECT emissions_saved_lbs::text FROM bulk_sync.user_actions WHERE action_id = '00000000-0000-4000-8000-0000000000f8'),
    '0.000000', 'and stored as 0.000000');
SELECT lives_ok(tests.bulk_sql('lbs', '"-0.000"'), 'bulk: lbs "-0.000" is accepted');
SELECT is_empty($$SELECT * FROM bulk_sync._action_problems(NULL, '00000000-0000-4000-8000-0000000000f9',
                  '00000000-0000-4000-8000-000000000006', '-0.0e3', '2025-11-05T10:00:00Z', 'true', NULL)$$,
    'CSV: lbs -0.0e3 is zero');
SELECT results_eq($$SELECT r.field, r.reason FROM bulk_sync._action_problems(NULL, '00000000-0000-4000-8000-0000000000f9',
                      '00000000-0000-4000-8000-000000000006', '-0.01', '2025-11-05T10:00:00Z', 'true', NULL) AS r$$,
    $$VALUES ('lbs', 'must not be negative')$$, 'CSV: lbs -0.01 is still negative');
SELECT results_eq($$SELECT v, bulk_sync._lbs_text_problem(v) FROM unnest(ARRAY['-abc', '-', '-Infinity', '-2e3']) AS v$$,
    $$VALUES ('-abc', 'is not a decimal number (send a plain decimal such as "10.2")'),
             ('-', 'is not a decimal number (send a plain decimal such as "10.2")'),
             ('-Infinity', 'must be a finite decimal number'),
             ('-2e3', 'must not be negative')$$,
    'lbs: only a number with a minus sign is called negative');
SELECT lives_ok(tests.pos_sql(format($$'00000000-0000-4000-8000-0000000000f5', '00000000-0000-4000-8000-000000000006', 1, %L, true$$,
    now() + interval '5 minutes')), 'logged_at exactly 5 minutes ahead is accepted');
SELECT lives_ok(format('SELECT bulk_sync.log_action(%L::jsonb)', jsonb_build_object(
        'action_id', '00000000-0000-4000-8000-0000000000f6', 'user_id', '00000000-0000-4000-8000-000000000006',
        'lbs', '1', 'logged_at', to_char(now() AT TIME ZONE 'UTC' + interval '4 minutes', 'YYYY-MM-DD"T"HH24:MI:SS"Z"'))),
    'logged_at 4 minutes ahead with Z is accepted');

-- The rules run anywhere a query can, in a parallel worker too: a CSV field that is not JSON is caught
-- in _json_object's exception block, which a worker cannot enter, so the planner must keep it in the
-- leader. Forced parallel mode runs the query below in a worker whenever its functions allow it.
CREATE TABLE tests.csv_metadata AS
SELECT g AS line, CASE WHEN g % 2 = 0 THEN 'not json' ELSE '{"note": 1}' END AS metadata
  FROM generate_series(1, 10) AS g;
ANALYZE tests.csv_metadata;
DO $$
BEGIN
    PERFORM set_config(CASE WHEN current_setting('server_version_num')::integer >= 160000
                            THEN 'debug_parallel_query' ELSE 'force_parallel_mode' END, 'on', true);
END
$$;
SELECT results_eq(
    $$SELECT m.line, r.field, r.reason
        FROM tests.csv_metadata AS m
       CROSS JOIN LATERAL bulk_sync._action_problems(NULL, '00000000-0000-4000-8000-0000000000f7',
                 '00000000-0000-4000-8000-000000000006', '1', '2025-11-05T10:00:00Z', 'true', m.metadata) AS r
       ORDER BY m.line$$,
    $$SELECT g::integer, 'metadata', 'must be a JSON object' FROM generate_series(2, 10, 2) AS g$$,
    'CSV metadata that is not JSON is found with parallel query forced');
SELECT is_empty(
    $$SELECT p.oid::regprocedure::text
        FROM pg_proc AS p JOIN pg_language AS l ON l.oid = p.prolang
       WHERE p.pronamespace = 'bulk_sync'::regnamespace AND l.lanname = 'plpgsql'
         AND p.proparallel <> 'u' AND p.prosrc ~* '\mEXCEPTION\s+WHEN'$$,
    'no PL/pgSQL function with an exception block is marked parallel safe or restricted');

SELECT * FROM finish();
ROLLBACK;
