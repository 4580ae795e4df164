-- _logged_at_text_problem: the rule for a time as the client wrote it: ISO 8601 with a zone offset, a real
-- calendar date, then _logged_at_problem on its value. NULL when it is fine; the cast cannot fail after it.
CREATE OR REPLACE FUNCTION bulk_sync._logged_at_text_problem(p_value text)
RETURNS text
LANGUAGE sql
STABLE PARALLEL SAFE
AS $$
    SELECT CASE
               -- The common form, 2025-11-05T10:00:00Z (_text_form).
               WHEN p_value ~ ('^(' || bulk_sync._text_form('logged_at') || ')$')
               THEN bulk_sync._logged_at_problem(p_value::timestamptz)
               -- Fixed-width date, hours 00-23, minutes and seconds 00-59, offsets up to 15:59: all that
               -- PostgreSQL's input accepts, except 24:00 and leap seconds, and nothing it rejects ...
               WHEN p_value ~ '^([0-9]{3}[1-9]|[0-9]{2}[1-9]0|[0-9][1-9]00|[1-9]000)-(0[1-9]|1[0-2])-(0[1-9]|[12][0-9]|3[01])[T ]([01][0-9]|2[0-3]):[0-5][0-9](:[0-5][0-9](\.[0-9]{1,6})?)?([zZ]|[+-](0[0-9]|1[0-5])(:?[0-5][0-9])?)$'
               THEN CASE
                        -- ... but a day past the end of its month (30 February).
                        WHEN substr(p_value, 9, 2) COLLATE "C" > '28'
                         AND substr(p_value, 9, 2)::integer >
                             CASE substr(p_value, 6, 2)::integer
                                 WHEN 2 THEN CASE WHEN substr(p_value, 1, 4)::integer % 4 = 0
                                                       AND (substr(p_value, 1, 4)::integer % 100 <> 0
                                                            OR substr(p_value, 1, 4)::integer % 400 = 0)
                                                  THEN 29 ELSE 28 END
                                 WHEN 4 THEN 30 WHEN 6 THEN 30 WHEN 9 THEN 30 WHEN 11 THEN 30
                                 ELSE 31
                             END
                        THEN 'is not a valid date'
                        ELSE bulk_sync._logged_at_problem(p_value::timestamptz)
                    END
               -- Otherwise, say why.
               WHEN p_value IS NULL THEN 'is required'
               WHEN p_value ~ '^[0-9]{4}-[0-9]{2}-[0-9]{2}([T ][0-9:.]*)?$'
               THEN 'has no zone offset (end it with Z or an offset such as +01:00)'
               ELSE 'is not an ISO 8601 timestamp (use the form 2025-11-05T10:00:00Z)'
           END
$$;
