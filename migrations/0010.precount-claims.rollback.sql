-- 0010.precount-claims rollback: the release before claims through the setting alone.
DROP TABLE bulk_sync._precount_claims;
