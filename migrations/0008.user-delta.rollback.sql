-- 0008.user-delta rollback: the type goes with the one function that takes it (_apply_deltas);
-- `bulk-sync migrate` of the release before defines its own _apply_deltas again.
DROP TYPE bulk_sync._user_delta CASCADE;
