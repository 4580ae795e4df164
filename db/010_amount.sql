-- _amount: formats an amount the way every JSON response carries it.
-- Exactly six decimals as a string, so no client ever parses a float ("10.200000").
CREATE OR REPLACE FUNCTION bulk_sync._amount(p_value numeric)
RETURNS text
LANGUAGE sql
IMMUTABLE PARALLEL SAFE
AS $$
    SELECT (p_value::numeric(30,6))::text
$$;
