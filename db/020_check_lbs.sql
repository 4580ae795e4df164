-- _check_lbs: the one rule for an amount, shared by every entry point.
-- Rejects (BS001) what NUMERIC(30,6) would round or cannot hold: NaN, infinities, negatives,
-- more than six significant decimals, 10^24 and above. Returns the value unchanged.
CREATE OR REPLACE FUNCTION bulk_sync._check_lbs(p_lbs numeric, p_where text)
RETURNS numeric
LANGUAGE plpgsql
IMMUTABLE PARALLEL SAFE
AS $$
BEGIN
    IF p_lbs IS NULL THEN
        RAISE EXCEPTION '%: lbs is required', p_where
            USING ERRCODE = 'BS001', DETAIL = 'lbs: null';
    ELSIF p_lbs = 'NaN'::numeric OR p_lbs IN ('Infinity'::numeric, '-Infinity'::numeric) THEN
        RAISE EXCEPTION '%: lbs must be a finite decimal number', p_where
            USING ERRCODE = 'BS001', DETAIL = format('lbs: %s', p_lbs);
    ELSIF p_lbs < 0 THEN
        RAISE EXCEPTION '%: lbs must not be negative', p_where
            USING ERRCODE = 'BS001', DETAIL = format('lbs: %s', p_lbs);
    ELSIF p_lbs >= 1e24 THEN
        RAISE EXCEPTION '%: lbs must be below 10^24', p_where
            USING ERRCODE = 'BS001', DETAIL = format('lbs: %s', p_lbs),
                  HINT = 'Amounts are NUMERIC(30,6).';
    ELSIF scale(trim_scale(p_lbs)) > 6 THEN
        RAISE EXCEPTION '%: lbs has more than six decimal places and would be rounded', p_where
            USING ERRCODE = 'BS001', DETAIL = format('lbs: %s', p_lbs),
                  HINT = 'Amounts are NUMERIC(30,6); send at most six significant decimals.';
    END IF;
    RETURN p_lbs;
END
$$;
