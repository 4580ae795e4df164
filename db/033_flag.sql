-- _flag: a CSV field as a boolean: true/t/yes/y/1 or false/f/no/n/0 (any case), false when empty,
-- NULL when it is none of these. The one reading of "verified" in a file.
CREATE OR REPLACE FUNCTION bulk_sync._flag(p_value text)
RETURNS boolean
LANGUAGE sql
IMMUTABLE PARALLEL SAFE
AS $$
    SELECT CASE lower(btrim(coalesce(p_value, '')))
               WHEN '' THEN false
               WHEN 'true' THEN true WHEN 't' THEN true WHEN 'yes' THEN true WHEN 'y' THEN true WHEN '1' THEN true
               WHEN 'false' THEN false WHEN 'f' THEN false WHEN 'no' THEN false WHEN 'n' THEN false WHEN '0' THEN false
           END
$$;
