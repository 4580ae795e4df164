-- _emit_user_events: appends one change event per user to the outbox, all in one row, with the
-- totals as this transaction now sees them. Used where totals are set rather than moved
-- (reconcile's fixes).
CREATE OR REPLACE FUNCTION bulk_sync._emit_user_events(p_user_ids uuid[], p_kind text)
RETURNS void
LANGUAGE sql
AS $$
    INSERT INTO bulk_sync._event_outbox (events, event_count, global_total)
    SELECT array_agg((p_kind, u.user_id, NULL, coalesce(s.total_emissions_lbs, 0), coalesce(s.action_count, 0))::bulk_sync._user_event
                     ORDER BY u.user_id),
           count(*),
           bulk_sync._current_global_total()
      FROM unnest(p_user_ids) AS u(user_id)
      LEFT JOIN bulk_sync.user_stats AS s ON s.user_id = u.user_id
    HAVING count(*) > 0
$$;
