-- status: what a DBA or the runner's status command wants at a glance.
-- Totals, the last reconcile run, events waiting to be published and whether a worker holds its lock.
CREATE OR REPLACE FUNCTION bulk_sync.status()
RETURNS jsonb
LANGUAGE sql
STABLE
SECURITY DEFINER
SET search_path = bulk_sync, pg_catalog, pg_temp
AS $$
    SELECT jsonb_build_object(
        'global_total_lbs', bulk_sync._amount(bulk_sync._current_global_total()),
        'users',            (SELECT count(*) FROM bulk_sync.user_stats AS s WHERE s.action_count > 0),
        'counted_actions',  (SELECT coalesce(sum(s.action_count), 0) FROM bulk_sync.user_stats AS s),
        'last_reconcile',   (SELECT r.result || jsonb_build_object('finished_at', bulk_sync._iso(r.finished_at))
                               FROM bulk_sync.reconciliation_runs AS r ORDER BY r.started_at DESC LIMIT 1),
        'events_pending',   (SELECT coalesce(sum(coalesce(o.event_count, 1)), 0) FROM bulk_sync._event_outbox AS o),
        'last_event_id',    (SELECT max(e.event_id) FROM bulk_sync.events AS e),
        'worker_alive',     EXISTS (SELECT FROM pg_catalog.pg_locks AS l
                                     WHERE l.locktype = 'advisory' AND l.granted
                                       AND l.database = (SELECT d.oid FROM pg_catalog.pg_database AS d
                                                          WHERE d.datname = current_database())
                                       AND l.classid = 1651862635 AND l.objid = 1 AND l.objsubid = 2))
$$;
COMMENT ON FUNCTION bulk_sync.status() IS
    'Totals, the last reconcile run, events pending publication, the last event id and whether a bulk-sync worker is running.';
