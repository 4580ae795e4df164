-- _load_held: the load p_load is open, and stays open until the caller's transaction ends (its row in
-- _loads is held FOR KEY SHARE, so that _stage_close or the end of a dead runner's load waits for it).
CREATE OR REPLACE FUNCTION bulk_sync._load_held(p_load uuid)
RETURNS void
LANGUAGE plpgsql
SET search_path = bulk_sync, pg_catalog, pg_temp
AS $$
BEGIN
    PERFORM FROM bulk_sync._loads AS l WHERE l.load = p_load FOR KEY SHARE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'bulk load % is not open', p_load
            USING ERRCODE = '55000',
                  HINT = 'A load is open from _stage_open() until _stage_close(), or until the session that opened it ends.';
    END IF;
END
$$;
