-- _uuid_text_problem: the rule for a uuid as the client wrote it (JSON value or CSV field): why it is
-- rejected, or NULL. Only the canonical 8-4-4-4-12 hex form is accepted, so a cast cannot fail after it.
CREATE OR REPLACE FUNCTION bulk_sync._uuid_text_problem(p_value text)
RETURNS text
LANGUAGE sql
IMMUTABLE PARALLEL SAFE
AS $$
    SELECT CASE
               -- Hyphens at 9, 14, 19 and 24 and nowhere else, the rest hex (simple patterns: a counted
               -- regular expression costs several times as much on a file of millions of rows).
               WHEN p_value LIKE '________-____-____-____-____________' AND p_value NOT LIKE '%-%-%-%-%-%'
                AND p_value ~ '^[-0-9a-fA-F]*$'
               THEN NULL
               WHEN p_value IS NULL THEN 'is required'
               ELSE 'is not a valid uuid (use the form 6f1c2a4e-8d3b-4c55-9a7e-2b1d0c9e8f70)'
           END
$$;
