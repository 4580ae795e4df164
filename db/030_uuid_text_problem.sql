-- _uuid_text_problem: the rule for a uuid as the client wrote it (JSON value or CSV field): why it is
-- rejected, or NULL. Only the canonical 8-4-4-4-12 hex form is accepted, so a cast cannot fail after it.
CREATE OR REPLACE FUNCTION bulk_sync._uuid_text_problem(p_value text)
RETURNS text
LANGUAGE sql
IMMUTABLE PARALLEL SAFE
AS $$
    SELECT CASE
               -- The canonical form (_text_form): ~2 µs a text, so bulk loads match a whole batch's at
               -- once (_in_form).
               WHEN p_value ~ ('^(' || bulk_sync._text_form('uuid') || ')$') THEN NULL
               WHEN p_value IS NULL THEN 'is required'
               ELSE 'is not a valid uuid (use the form 6f1c2a4e-8d3b-4c55-9a7e-2b1d0c9e8f70)'
           END
$$;
