-- _batch_where: how an error names an action inside a batch: its 0-based index and, when
-- readable, its action_id. The runner maps the index back to the input file's line number.
CREATE OR REPLACE FUNCTION bulk_sync._batch_where(p_idx integer, p_doc jsonb)
RETURNS text
LANGUAGE sql
IMMUTABLE PARALLEL SAFE
AS $$
    SELECT CASE
               WHEN jsonb_typeof(p_doc) = 'object' AND jsonb_typeof(p_doc -> 'action_id') = 'string'
               THEN format('actions[%s] (action_id %s)', p_idx, p_doc ->> 'action_id')
               ELSE format('actions[%s]', p_idx)
           END
$$;
