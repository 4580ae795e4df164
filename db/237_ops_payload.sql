-- _ops_payload: the text of a bulk_sync_ops notification carrying a list, cut to fit NOTIFY.
-- A payload must stay under 8000 bytes; 100 recent actions take about 19 kB (see docs/DESIGN.md).
CREATE OR REPLACE FUNCTION bulk_sync._ops_payload(p_payload jsonb, p_list_key text, p_list jsonb)
RETURNS text
LANGUAGE plpgsql
IMMUTABLE PARALLEL SAFE
AS $$
DECLARE
    v_max_bytes  constant integer := 7999;
    v_full       text;
    v_base       integer;
    v_keep       integer;
BEGIN
    IF p_list IS NULL THEN
        RETURN p_payload::text;
    END IF;
    v_full := (p_payload || jsonb_build_object(p_list_key, p_list,
                                               p_list_key || '_count', jsonb_array_length(p_list),
                                               p_list_key || '_truncated', false))::text;
    IF octet_length(v_full) <= v_max_bytes THEN
        RETURN v_full;
    END IF;
    -- The newest entries that fit: each element costs its own text plus a ", " separator.
    v_base := octet_length((p_payload || jsonb_build_object(p_list_key, '[]'::jsonb,
                                                            p_list_key || '_count', jsonb_array_length(p_list),
                                                            p_list_key || '_truncated', true))::text);
    SELECT coalesce(max(f.n), 0)::integer INTO v_keep
      FROM (SELECT e.n, sum(octet_length(e.item::text) + 2) OVER (ORDER BY e.n) AS used
              FROM jsonb_array_elements(p_list) WITH ORDINALITY AS e(item, n)) AS f
     WHERE v_base + f.used <= v_max_bytes;
    RETURN (p_payload || jsonb_build_object(p_list_key, coalesce((SELECT jsonb_agg(e.item ORDER BY e.n)
                                                                    FROM jsonb_array_elements(p_list) WITH ORDINALITY AS e(item, n)
                                                                   WHERE e.n <= v_keep), '[]'::jsonb),
                                            p_list_key || '_count', jsonb_array_length(p_list),
                                            p_list_key || '_truncated', true))::text;
END
$$;
