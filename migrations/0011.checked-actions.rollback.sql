-- 0011.checked-actions rollback: the type goes with the one function that takes it (_insert_new_actions);
-- `bulk-sync migrate` of the release before defines its own _stage_apply and bulk_backfill again.
DROP TYPE bulk_sync._checked_action CASCADE;
