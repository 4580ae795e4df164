-- 0008.user-delta: the one shape in which every writer hands a change of the counted set to
-- _apply_deltas, the only code that moves totals: one element per user.
-- depends: 0007.shared-load

CREATE TYPE bulk_sync._user_delta AS (
    user_id    uuid,
    lbs        numeric,
    n          integer,
    latest     timestamptz,
    removed    boolean,
    action_id  uuid,
    kind       text
);
COMMENT ON TYPE bulk_sync._user_delta IS
    'One user''s change of the counted set, as _apply_deltas takes it: lbs and n are added to the user''s totals (negative when actions left the set); latest is the newest logged_at gained; removed says the user lost a counted action (last_action_at is then recomputed); action_id names the one action moved, if only one was; kind is the change event''s kind.';
