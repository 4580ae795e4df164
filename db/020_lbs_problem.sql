-- _lbs_problem: the rule for an amount, on its exact value: why it is rejected, or NULL when it is fine.
-- NUMERIC(30,6) would round or cannot hold the rest: NaN, infinities, negatives, more than six significant
-- decimals, 10^24 and above. Every entry point (JSON, CSV, positional) asks this one function.
CREATE OR REPLACE FUNCTION bulk_sync._lbs_problem(p_lbs numeric)
RETURNS text
LANGUAGE sql
IMMUTABLE PARALLEL SAFE
AS $$
    SELECT CASE
               -- The common case in one test (NaN sorts above every number, so it fails "< 1e24").
               WHEN p_lbs >= 0 AND p_lbs < 1e24 AND scale(trim_scale(p_lbs)) <= 6 THEN NULL
               WHEN p_lbs IS NULL THEN 'is required'
               WHEN p_lbs IN ('NaN', 'Infinity', '-Infinity') THEN 'must be a finite decimal number'
               WHEN p_lbs < 0 THEN 'must not be negative'
               WHEN p_lbs >= 1e24 THEN 'must be below 10^24 (amounts are NUMERIC(30,6))'
               ELSE 'has more than six decimal places and would be rounded'
           END
$$;
