-- _take_slot: the global slot this transaction adds to, claimed without waiting wherever it can.
-- A writer keeps its slot until it commits, and the same transaction may go on to take other users
-- (a second call) or action rows (a bulk chunk). A writer that waited for that slot while holding one
-- of them would close a cycle. So a slot is claimed by a transaction-level advisory lock,
-- (1651862635, 100 + slot), taken only when it is free: the backend's own slot (pg_backend_pid() % 64)
-- first, then the next ones in turn. Only when all 64 are claimed does it wait, for its own. A claim
-- lasts until the transaction ends; its own claims never stop it, so a later change in the same
-- transaction takes the same slot again or another free one.
CREATE OR REPLACE FUNCTION bulk_sync._take_slot()
RETURNS integer
LANGUAGE plpgsql
AS $$
DECLARE
    v_home  integer := pg_backend_pid() % 64;
    v_slot  integer;
BEGIN
    FOR v_step IN 0..63 LOOP
        v_slot := (v_home + v_step) % 64;
        IF pg_try_advisory_xact_lock(1651862635, 100 + v_slot) THEN
            RETURN v_slot;
        END IF;
    END LOOP;
    PERFORM pg_advisory_xact_lock(1651862635, 100 + v_home);
    RETURN v_home;
END
$$;
