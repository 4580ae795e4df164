-- _in_form: whether the action_ids, user_ids and logged_ats of p_count actions, each given joined by
-- commas (string_agg(value, ',')), are all in their common form (_text_form). One regular expression
-- over a batch costs about what one text's match costs: ~1 ms for the uuids of 10,000 actions, against
-- ~40 ms one text at a time. As many commas as separators means that no text holds a comma (no form
-- has one) and none is missing (string_agg skips NULL), so the pieces the expression matches are the
-- texts.
CREATE OR REPLACE FUNCTION bulk_sync._in_form(
    p_action_ids  text,
    p_user_ids    text,
    p_logged_ats  text,
    p_count       bigint)
RETURNS boolean
LANGUAGE sql
IMMUTABLE PARALLEL SAFE
AS $$
    SELECT coalesce(length(p_action_ids) - length(replace(p_action_ids, ',', '')) = p_count - 1
                    AND length(p_user_ids) - length(replace(p_user_ids, ',', '')) = p_count - 1
                    AND length(p_logged_ats) - length(replace(p_logged_ats, ',', '')) = p_count - 1
                    AND p_action_ids || ',' || p_user_ids || ',' ~ ('^((' || bulk_sync._text_form('uuid') || '),)*$')
                    AND p_logged_ats || ',' ~ ('^((' || bulk_sync._text_form('logged_at') || '),)*$'),
                    false)
$$;
