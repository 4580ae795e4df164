-- _current_user_total: one user's maintained total (0 for an unknown user), for internal callers.
-- PL/pgSQL so that its plan is cached for the session; bulk_sync.user_total() is the public face.
CREATE OR REPLACE FUNCTION bulk_sync._current_user_total(p_user_id uuid)
RETURNS numeric(30,6)
LANGUAGE plpgsql
STABLE PARALLEL SAFE
AS $$
BEGIN
    RETURN coalesce((SELECT s.total_emissions_lbs FROM bulk_sync.user_stats AS s WHERE s.user_id = p_user_id), 0)::numeric(30,6);
END
$$;
