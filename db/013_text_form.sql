-- _text_form: the common form of a field as the client writes it, as a regular expression (unanchored):
-- 'uuid', the canonical 8-4-4-4-12 hex form (the whole rule for a uuid), and 'logged_at', the usual
-- 2025-11-05T10:00:00Z with each field in range (days up to 28: later days take _logged_at_text_problem's
-- general path). A text in its form is accepted by the field's rule, or rejected only for its value.
-- One statement of each form, for one text (_uuid_text_problem, _logged_at_text_problem) and for a
-- whole batch at once (_in_form). None contains a comma, which _in_form uses as a separator.
CREATE OR REPLACE FUNCTION bulk_sync._text_form(p_field text)
RETURNS text
LANGUAGE sql
IMMUTABLE PARALLEL SAFE
AS $$
    SELECT CASE p_field
               WHEN 'uuid'
               THEN '[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}'
               WHEN 'logged_at'
               THEN '([0-9]{3}[1-9]|[0-9]{2}[1-9]0|[0-9][1-9]00|[1-9]000)-(0[1-9]|1[0-2])-(0[1-9]|1[0-9]|2[0-8])'
                    'T([01][0-9]|2[0-3]):[0-5][0-9]:[0-5][0-9]Z'
           END
$$;
