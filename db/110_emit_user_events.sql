-- _emit_user_events: appends one change event per user to the outbox, with the totals as this
-- transaction now sees them. Used where totals are set rather than moved (reconcile's fixes).
CREATE OR REPLACE FUNCTION bulk_sync._emit_user_events(p_user_ids uuid[], p_kind text)
RETURNS void
LANGUAGE sql
AS $$
    INSERT INTO bulk_sync._event_outbox (payload)
    SELECT bulk_sync._event_payload(p_kind, u.user_id, NULL, coalesce(s.total_emissions_lbs, 0),
                                    coalesce(s.action_count, 0), g.total)
      FROM unnest(p_user_ids) AS u(user_id)
     CROSS JOIN (SELECT bulk_sync._current_global_total() AS total) AS g
      LEFT JOIN bulk_sync.user_stats AS s ON s.user_id = u.user_id
     ORDER BY u.user_id
$$;
