-- _lock_users: takes the user_stats rows of the given users, in user_id order, creating missing ones,
-- and returns the users whose rows it created. Every writer calls it before it touches an action, so
-- locks are always taken users first, then actions, then one slot: writers can wait for each other
-- but never in a cycle.

-- Earlier releases returned void, and CREATE OR REPLACE cannot change a return type.
DO $$
BEGIN
    IF to_regprocedure('bulk_sync._lock_users(uuid[])') IS NOT NULL
       AND (SELECT p.prorettype FROM pg_catalog.pg_proc AS p
             WHERE p.oid = to_regprocedure('bulk_sync._lock_users(uuid[])')) = 'pg_catalog.void'::regtype THEN
        DROP FUNCTION bulk_sync._lock_users(uuid[]);
    END IF;
END
$$;

CREATE OR REPLACE FUNCTION bulk_sync._lock_users(p_user_ids uuid[])
RETURNS uuid[]
LANGUAGE plpgsql
AS $$
DECLARE
    v_created  uuid[];
BEGIN
    -- ON CONFLICT DO UPDATE locks the existing row even when its WHERE is false, and returns only
    -- the rows it inserted. One user (log_action, verify_action, revoke_action) takes one-row
    -- statements: the set statement (a data-modifying CTE, a sort and an aggregate) cost log_action
    -- about 3% of its time. Its row, which nearly always exists, is locked by SELECT ... FOR UPDATE,
    -- the same lock at half the cost of the INSERT; with one user there is no order to keep.
    IF cardinality(p_user_ids) = 1 THEN
        PERFORM FROM bulk_sync.user_stats AS s WHERE s.user_id = p_user_ids[1] FOR UPDATE;
        IF FOUND THEN
            RETURN '{}'::uuid[];
        END IF;
        INSERT INTO bulk_sync.user_stats AS s (user_id) VALUES (p_user_ids[1])
            ON CONFLICT (user_id) DO UPDATE SET last_updated = excluded.last_updated WHERE false
        RETURNING ARRAY[s.user_id] INTO v_created;
        RETURN coalesce(v_created, '{}');
    END IF;

    WITH created AS (
        INSERT INTO bulk_sync.user_stats AS s (user_id)
        SELECT DISTINCT u.user_id FROM unnest(p_user_ids) AS u(user_id) ORDER BY 1
            ON CONFLICT (user_id) DO UPDATE SET last_updated = excluded.last_updated WHERE false
        RETURNING s.user_id
    )
    SELECT coalesce(array_agg(c.user_id), '{}') INTO v_created FROM created AS c;
    RETURN v_created;
END
$$;
