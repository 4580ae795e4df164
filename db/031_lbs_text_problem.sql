-- _lbs_text_problem: the rule for an amount as the client wrote it: a plain decimal (a JSON number's text
-- or a string), then _lbs_problem on its exact value (see _decimal_text for one longer than any amount).
-- NULL when it is fine; the cast cannot fail after it.
CREATE OR REPLACE FUNCTION bulk_sync._lbs_text_problem(p_value text)
RETURNS text
LANGUAGE sql
IMMUTABLE PARALLEL SAFE
AS $$
    SELECT CASE
               -- The common cases first: a plain decimal (the cheapest pattern), any decimal with an
               -- exponent; then the rule on the exact value.
               WHEN p_value ~ '^[0-9]+\.?[0-9]*$' OR p_value ~ '^([0-9]+(\.[0-9]*)?|\.[0-9]+)([eE][+-]?[0-9]{1,4})?$'
               -- The plain cast keeps _lbs_problem inlined: given the longer argument, the planner
               -- would call it as a function of its own for every row (4x the cost of the rule).
               THEN CASE WHEN length(p_value) <= 1000 THEN bulk_sync._lbs_problem(p_value::numeric)
                         WHEN p_value ~ '[eE]' THEN 'is not a decimal number (send a plain decimal such as "10.2")'
                         ELSE bulk_sync._lbs_problem(bulk_sync._decimal_text(p_value)::numeric)
                    END
               -- Zero with a minus sign ("-0", "-0.00") is zero, as it is for a JSON number or the
               -- numeric argument: not negative, and nothing to alter.
               WHEN p_value ~ '^-(0+(\.0*)?|\.0+)([eE][+-]?[0-9]{1,4})?$' THEN NULL
               -- Otherwise, say why.
               WHEN p_value IS NULL THEN 'is required'
               WHEN lower(btrim(p_value)) IN ('nan', 'infinity', '+infinity', '-infinity', 'inf', '+inf', '-inf')
               THEN 'must be a finite decimal number'
               WHEN p_value ~ '^-([0-9]+(\.[0-9]*)?|\.[0-9]+)([eE][+-]?[0-9]{1,4})?$' THEN 'must not be negative'
               ELSE 'is not a decimal number (send a plain decimal such as "10.2")'
           END
$$;
