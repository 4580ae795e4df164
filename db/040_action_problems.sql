-- _action_problems: every BS001 rule for one action, as (field, reason, value) rows; none when it is valid.
-- The one rulebook: log_action, log_actions, bulk_backfill and file loads all ask it. An action comes as a
-- JSON object (p_doc) or as the text fields of a CSV row (p_doc NULL); the rules are the same for both,
-- except that JSON types matter for verified and metadata, and a CSV's verified is a word (see _flag).
-- p_in_form: the caller found action_id, user_id and logged_at in their common form (_in_form, asked
-- of a whole batch), so of those only logged_at's value is left to judge.

-- Earlier releases had no p_in_form: that signature would make every shorter call ambiguous.
DO $$
BEGIN
    IF to_regprocedure('bulk_sync._action_problems(jsonb, text, text, text, text, text, text)') IS NOT NULL THEN
        DROP FUNCTION bulk_sync._action_problems(jsonb, text, text, text, text, text, text);
    END IF;
END
$$;

CREATE OR REPLACE FUNCTION bulk_sync._action_problems(
    p_doc        jsonb,
    p_action_id  text DEFAULT NULL,
    p_user_id    text DEFAULT NULL,
    p_lbs        text DEFAULT NULL,
    p_logged_at  text DEFAULT NULL,
    p_verified   text DEFAULT NULL,
    p_metadata   text DEFAULT NULL,
    p_in_form    boolean DEFAULT false)
RETURNS TABLE (field text, reason text, value text)
LANGUAGE sql
-- PARALLEL UNSAFE like _json_object, which it calls for a CSV row's metadata.
STABLE PARALLEL UNSAFE
AS $$
    -- One reason per field (NULL: fine). A valid action costs one pass over them (the WHERE); only an
    -- invalid one is unpivoted into rows, with the values for DETAIL.
    SELECT u.field, u.reason, u.value
      FROM (SELECT CASE WHEN jsonb_typeof(p_doc) <> 'object' THEN 'must be a JSON object' END AS action,
                   CASE WHEN x.unknown <> '{}'
                        THEN 'is not a known key (allowed: action_id, user_id, lbs, logged_at, verified, metadata)'
                   END AS keys,
                   x.unknown,
                   CASE WHEN NOT p_in_form
                        THEN bulk_sync._uuid_text_problem(coalesce(p_action_id, p_doc ->> 'action_id'))
                   END AS action_id,
                   CASE WHEN NOT p_in_form
                        THEN bulk_sync._uuid_text_problem(coalesce(p_user_id, p_doc ->> 'user_id'))
                   END AS user_id,
                   bulk_sync._lbs_text_problem(coalesce(p_lbs, p_doc ->> 'lbs')) AS lbs,
                   CASE WHEN p_in_form
                        THEN bulk_sync._logged_at_problem(coalesce(p_logged_at, p_doc ->> 'logged_at')::timestamptz)
                        ELSE bulk_sync._logged_at_text_problem(coalesce(p_logged_at, p_doc ->> 'logged_at'))
                   END AS logged_at,
                   CASE WHEN p_doc IS NULL
                        THEN CASE WHEN bulk_sync._flag(p_verified) IS NULL THEN 'must be true or false' END
                        WHEN jsonb_typeof(p_doc -> 'verified') NOT IN ('boolean', 'null') THEN 'must be true or false'
                   END AS verified,
                   CASE WHEN p_doc IS NULL
                        THEN CASE WHEN btrim(p_metadata) <> '' AND bulk_sync._json_object(p_metadata) IS NULL
                                  THEN 'must be a JSON object' END
                        WHEN jsonb_typeof(p_doc -> 'metadata') NOT IN ('object', 'null') THEN 'must be a JSON object'
                   END AS metadata
              -- The keys of an object that are not the action's. Only a CASE guards "-", which raises on
              -- a scalar: planning a call with a constant p_doc folds every other expression over it.
              FROM (SELECT CASE WHEN jsonb_typeof(p_doc) = 'object'
                                THEN p_doc - ARRAY['action_id', 'user_id', 'lbs', 'logged_at', 'verified', 'metadata']
                           END AS unknown) AS x) AS r
     CROSS JOIN LATERAL unnest(
         ARRAY['action',
               (SELECT string_agg(k, ', ' ORDER BY k) FROM jsonb_object_keys(coalesce(r.unknown, '{}')) AS k),
               'action_id', 'user_id', 'lbs', 'logged_at', 'verified', 'metadata'],
         ARRAY[r.action, r.keys, r.action_id, r.user_id, r.lbs, r.logged_at, r.verified, r.metadata],
         ARRAY[left(p_doc::text, 200),
               CASE WHEN r.keys IS NOT NULL THEN left(r.unknown::text, 200) END,
               coalesce(p_action_id, p_doc ->> 'action_id'),
               coalesce(p_user_id, p_doc ->> 'user_id'),
               coalesce(p_lbs, p_doc ->> 'lbs'),
               coalesce(p_logged_at, p_doc ->> 'logged_at'),
               coalesce(p_verified, (p_doc -> 'verified')::text),
               left(coalesce(p_metadata, (p_doc -> 'metadata')::text), 200)]) AS u(field, reason, value)
     WHERE coalesce(r.action, r.keys, r.action_id, r.user_id, r.lbs, r.logged_at, r.verified, r.metadata) IS NOT NULL
       AND u.reason IS NOT NULL
       AND (u.field = 'action' OR r.action IS NULL)
$$;
