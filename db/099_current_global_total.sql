-- _current_global_total: the sum of the global slots, for internal callers.
-- PL/pgSQL so that its plan is cached for the session; bulk_sync.global_total() is the public face.
CREATE OR REPLACE FUNCTION bulk_sync._current_global_total()
RETURNS numeric(30,6)
LANGUAGE plpgsql
STABLE PARALLEL SAFE
AS $$
BEGIN
    RETURN (SELECT coalesce(sum(g.total_lbs), 0) FROM bulk_sync._global_slots AS g)::numeric(30,6);
END
$$;
