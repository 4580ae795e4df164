-- 0010.precount-claims: where a bulk chunk claims the gains it applied before its INSERT, so that the
-- insert trigger does not count them again (see _stage_apply and _count_inserted_actions).
-- depends: 0009.event-batches

-- The claim was the setting bulk_sync.precounted alone, which any session may set: a writer could
-- set it before calling log_action and have a counted action stored without its totals. A row here
-- is written by bulk_sync's own functions only; the setting now only says that there is one.

-- UNLOGGED: a claim lives for its transaction only (and a crash ends every transaction).
-- A new, empty table: nothing to lock out.
CREATE UNLOGGED TABLE bulk_sync._precount_claims (
    xid    xid8  PRIMARY KEY,
    claim  text  NOT NULL
);
COMMENT ON TABLE bulk_sync._precount_claims IS
    'A bulk chunk''s claim to the insert trigger, for its transaction (xid): "<counted actions> <their sum>" it applied before its INSERT. Used up by that INSERT.';
