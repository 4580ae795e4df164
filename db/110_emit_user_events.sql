-- _emit_user_events: appends one change event per user to the outbox, in the writer's transaction.
-- The payload carries the user's and the global total as this transaction sees them after its change.
CREATE OR REPLACE FUNCTION bulk_sync._emit_user_events(p_user_ids uuid[], p_action_ids uuid[], p_kinds text[])
RETURNS void
LANGUAGE plpgsql
AS $$
DECLARE
    v_global  text := bulk_sync._amount(bulk_sync.global_total());
BEGIN
    INSERT INTO bulk_sync._event_outbox (payload)
    SELECT jsonb_build_object(
               'kind',             d.kind,
               'user_id',          d.user_id,
               'action_id',        d.action_id,
               'user_total_lbs',   bulk_sync._amount(coalesce(s.total_emissions_lbs, 0)),
               'action_count',     coalesce(s.action_count, 0),
               'global_total_lbs', v_global,
               'occurred_at',      bulk_sync._iso(now()))
      FROM unnest(p_user_ids, p_action_ids, p_kinds) AS d(user_id, action_id, kind)
      LEFT JOIN bulk_sync.user_stats AS s ON s.user_id = d.user_id
     ORDER BY d.user_id;
END
$$;
