-- 0006.definitions-state: what `bulk-sync migrate` last applied from db/, so that a re-run on a
-- current database skips the definitions and takes no lock that a writer could queue behind.
-- depends: 0005.leaderboard-key

CREATE TABLE bulk_sync._definitions_state (
    singleton     boolean      PRIMARY KEY DEFAULT true CHECK (singleton),
    files_sha256  text         NOT NULL,
    catalog_md5   text         NOT NULL,
    applied_at    timestamptz  NOT NULL DEFAULT now(),
    applied_by    text         NOT NULL DEFAULT current_user
);
COMMENT ON TABLE bulk_sync._definitions_state IS
    'One row: the SHA-256 of the db/ files migrate last applied and an MD5 of the functions, triggers, views and grants they left. migrate re-applies db/ when either differs.';
