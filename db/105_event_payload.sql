-- _event_payload: the JSON of one change event, the same wherever an event is published.
-- Keys: kind, user_id, action_id (when one action caused it), user_total_lbs, action_count, global_total_lbs, occurred_at.
CREATE OR REPLACE FUNCTION bulk_sync._event_payload(
    p_kind          text,
    p_user_id       uuid,
    p_action_id     uuid,
    p_user_total    numeric,
    p_action_count  integer,
    p_global_total  numeric,
    p_occurred_at   timestamptz)
RETURNS jsonb
LANGUAGE sql
STABLE PARALLEL SAFE
AS $$
    SELECT jsonb_build_object(
               'kind',             p_kind,
               'user_id',          p_user_id,
               'action_id',        p_action_id,
               'user_total_lbs',   bulk_sync._amount(p_user_total),
               'action_count',     p_action_count,
               'global_total_lbs', bulk_sync._amount(p_global_total),
               'occurred_at',      bulk_sync._iso(p_occurred_at))
$$;
