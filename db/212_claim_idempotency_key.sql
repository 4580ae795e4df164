-- _claim_idempotency_key: the first call with a key claims it (NULL); a repeat with the same request hash
-- gets the first call's stored response; another request under the same key is BS003. A concurrent repeat
-- waits on the key's unique index until the first commits.
CREATE OR REPLACE FUNCTION bulk_sync._claim_idempotency_key(p_key text, p_sha bytea, p_where text)
RETURNS jsonb
LANGUAGE plpgsql
AS $$
DECLARE
    v_stored_sha  bytea;
    v_response    jsonb;
BEGIN
    INSERT INTO bulk_sync.idempotency_keys (idempotency_key, request_sha256)
    VALUES (p_key, p_sha)
        ON CONFLICT (idempotency_key) DO NOTHING;
    IF FOUND THEN
        RETURN NULL;
    END IF;
    SELECT k.request_sha256, k.response INTO v_stored_sha, v_response
      FROM bulk_sync.idempotency_keys AS k WHERE k.idempotency_key = p_key;
    IF v_stored_sha <> p_sha THEN
        RAISE EXCEPTION '%: idempotency_key % was already used with different actions', p_where, p_key
            USING ERRCODE = 'BS003', DETAIL = format('idempotency_key: %s', p_key),
                  HINT = 'Use a new key for a new batch.';
    END IF;
    RETURN v_response;
END
$$;

