#!/usr/bin/env bash
# Entry point of the compose `tests` service: the pgTAP suites with pg_prove
# against the `postgres` service, then the whole suite (scripts/test, which
# starts its own throwaway cluster as the container's postgres user).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

url=${PGTAP_DATABASE_URL:?set PGTAP_DATABASE_URL to the postgres service}
echo "== pgTAP against the postgres service"
bulk-sync --database-url "$url" migrate >/dev/null
psql "$url" --no-psqlrc --quiet -v ON_ERROR_STOP=1 -c 'CREATE EXTENSION IF NOT EXISTS pgtap'
pg_prove --failures -d "$url" tests/pgtap/*.sql

echo "== full suite"
exec bash scripts/test "$@"
