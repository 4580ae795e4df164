-- publish_events: numbers committed outbox events, oldest written first, and wakes listeners once per batch.
-- Only one publisher at a time (advisory lock held to commit), so event ids never go backwards.
CREATE OR REPLACE FUNCTION bulk_sync.publish_events(p_max integer DEFAULT 10000, p_wait boolean DEFAULT false)
RETURNS integer
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = bulk_sync, pg_catalog, pg_temp
AS $$
DECLARE
    v_count   integer;
    v_last    bigint;
    v_single  jsonb;
BEGIN
    IF p_max IS NULL OR p_max < 1 THEN
        RAISE EXCEPTION 'publish_events: p_max must be positive' USING ERRCODE = 'BS001', DETAIL = format('p_max: %s', p_max);
    END IF;
    IF p_wait THEN
        PERFORM pg_advisory_xact_lock(1651862635, 2);
    ELSIF NOT pg_try_advisory_xact_lock(1651862635, 2) THEN
        RETURN 0;  -- another session is publishing; its events appear when it commits
    END IF;

    -- Whole outbox rows, oldest first, until p_max events are taken: a row holds one writing
    -- statement's events (or, written before 0009.event-batches, one rendered payload). Each typed
    -- event is rendered here, with its row's global total and time.
    WITH taken AS (
        SELECT r.outbox_id
          FROM (SELECT o.outbox_id,
                       sum(coalesce(o.event_count, 1)) OVER (ORDER BY o.outbox_id) - coalesce(o.event_count, 1) AS before
                  FROM (SELECT x.outbox_id, x.event_count FROM bulk_sync._event_outbox AS x
                         ORDER BY x.outbox_id LIMIT p_max) AS o) AS r
         WHERE r.before < p_max
    ), moved AS (
        DELETE FROM bulk_sync._event_outbox AS o
         WHERE o.outbox_id IN (SELECT t.outbox_id FROM taken AS t)
        RETURNING o.outbox_id, o.payload, o.events, o.global_total, o.created_at
    ), published AS (
        INSERT INTO bulk_sync.events (event_id, payload, created_at)
        SELECT nextval('bulk_sync.event_id_seq'), e.payload, e.created_at
          FROM (SELECT coalesce(m.payload, bulk_sync._event_payload(u.kind, u.user_id, u.action_id, u.user_total,
                                                                    u.action_count, m.global_total, m.created_at))
                       AS payload, m.created_at
                  FROM moved AS m
                  LEFT JOIN LATERAL unnest(m.events) WITH ORDINALITY AS u ON true
                 ORDER BY m.outbox_id, u.ordinality) AS e
        RETURNING event_id, payload
    )
    SELECT count(*)::integer, max(p.event_id), CASE WHEN count(*) = 1 THEN (array_agg(p.payload))[1] END
      INTO v_count, v_last, v_single
      FROM published AS p;

    IF v_count > 0 THEN
        -- One notification per batch, whatever its size: payload well under NOTIFY's 8000 bytes.
        PERFORM pg_notify('bulk_sync_leaderboard', (
            jsonb_build_object('last_event_id', v_last,
                               'events', v_count,
                               'global_total_lbs', bulk_sync._amount(bulk_sync._current_global_total()))
            || CASE WHEN v_single IS NOT NULL
                    THEN jsonb_build_object('kind', v_single -> 'kind',
                                            'user_id', v_single -> 'user_id',
                                            'user_total_lbs', v_single -> 'user_total_lbs',
                                            'action_id', v_single -> 'action_id')
                    ELSE '{}'::jsonb END)::text);
    END IF;
    RETURN v_count;
END
$$;
COMMENT ON FUNCTION bulk_sync.publish_events(integer, boolean) IS
    'Numbers committed pending events, oldest written first, each writing statement''s events together, until p_max are numbered (more when one statement wrote more), and sends one bulk_sync_leaderboard notification; returns how many it published. When another session is publishing it returns 0 at once, or with p_wait waits for it. Run by bulk-sync worker and by events_since.';
