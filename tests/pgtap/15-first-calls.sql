-- The first calls of a session: PostgreSQL plans their statements for the very arguments given (custom
-- plans) and folds those constants into every expression it can. A request that is not a JSON object
-- must be BS001 then too, not an error of an operator folded at planning ("cannot delete from scalar").
-- Nothing may call log_action in this file before these cases.
BEGIN;
SELECT plan(6);

SELECT throws_ok($$SELECT bulk_sync.log_action(NULL::jsonb)$$, 'BS001', NULL, 'first call: a SQL NULL request');
SELECT throws_ok($$SELECT bulk_sync.log_action('"x"'::jsonb)$$, 'BS001', NULL, 'a string request');
SELECT throws_ok($$SELECT bulk_sync.log_action('12'::jsonb)$$, 'BS001', NULL, 'a number request');
SELECT throws_ok($$SELECT bulk_sync.log_action('true'::jsonb)$$, 'BS001', NULL, 'a boolean request');
SELECT throws_ok($$SELECT bulk_sync.log_action('null'::jsonb)$$, 'BS001', NULL, 'a JSON null request');
SELECT throws_ok($$SELECT bulk_sync.bulk_backfill('{"actions": ["x", 7]}'::jsonb)$$, 'BS001', NULL,
    'bulk_backfill: actions that are not objects');

SELECT * FROM finish();
ROLLBACK;
