-- 0011.checked-actions: a checked action as bulk loads pass it between functions: from a load's rows
-- (a file's chunk) or straight from a bulk_backfill request, to _insert_new_actions.
-- depends: 0010.precount-claims

-- A new type, used by nothing yet: nothing to lock out.
CREATE TYPE bulk_sync._checked_action AS (
    line       bigint,
    action_id  uuid,
    user_id    uuid,
    lbs        numeric(30,6),
    logged_at  timestamptz,
    verified   boolean,
    metadata   jsonb
);
COMMENT ON TYPE bulk_sync._checked_action IS
    'One action that passed the rules, typed by _action_values; line is its line or index in the input.';
