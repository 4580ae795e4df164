-- _iso: formats a timestamp the way every JSON response carries it.
-- ISO 8601 in UTC with a Z; fractional seconds only when there are any.
CREATE OR REPLACE FUNCTION bulk_sync._iso(p_value timestamptz)
RETURNS text
LANGUAGE sql
STABLE PARALLEL SAFE
AS $$
    SELECT CASE
               WHEN date_trunc('second', p_value) = p_value
               THEN to_char(p_value AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS"Z"')
               ELSE to_char(p_value AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"')
           END
$$;
