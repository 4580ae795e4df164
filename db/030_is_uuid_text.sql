-- _is_uuid_text: the canonical textual shape of a uuid in a JSON request (8-4-4-4-12 hex).
-- Shared by the per-action parser and the set-based batch parser so both accept exactly the same input.
CREATE OR REPLACE FUNCTION bulk_sync._is_uuid_text(p_value text)
RETURNS boolean
LANGUAGE sql
IMMUTABLE PARALLEL SAFE
AS $$
    SELECT p_value ~ '^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$'
$$;
