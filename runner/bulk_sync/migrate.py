"""``bulk-sync migrate``: versioned yoyo migrations, then the repeatable ``db/`` definitions.

1. yoyo applies the pending files of ``migrations/`` under its own backend lock.
2. Every ``db/*.sql`` file is executed, in filename order, in ONE transaction that first
   takes ``pg_advisory_xact_lock(1651862635, 4)``, so two concurrent migrates never
   interleave. yoyo's post-apply hook is not used: it is skipped when nothing is pending.

Both steps work for a non-superuser role that owns the database.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

import psycopg
from psycopg.conninfo import conninfo_to_dict
from yoyo import get_backend, read_migrations

from bulk_sync import paths
from bulk_sync.db import APP_NAME

LOCK_CLASSID = 1651862635  # 'bs_k' as int4: the bulk_sync advisory-lock namespace
LOCK_MIGRATE = 4
YOYO_LOCK_TIMEOUT_S = 120


def yoyo_uri(database_url: str) -> str:
    """Turn a libpq URL or ``key=value`` conninfo into yoyo's ``postgresql+psycopg`` URI.

    yoyo passes URI query parameters to ``psycopg.connect`` as keywords, so every
    connection parameter (``host`` as a socket directory included) travels as one; this
    keeps unix-socket URLs such as ``postgresql://postgres@/db?host=/run/dir`` working.
    """
    params = {k: str(v) for k, v in conninfo_to_dict(database_url).items() if v is not None}
    dbname = params.pop("dbname", "")
    params.setdefault("application_name", f"{APP_NAME} migrate")
    query = urlencode(params, quote_via=quote)
    return f"postgresql+psycopg:///{quote(dbname, safe='')}" + (f"?{query}" if query else "")


def definition_files(directory: Path | None = None) -> list[Path]:
    """The ``db/*.sql`` files in the order they are applied (sorted by filename)."""
    directory = directory or paths.definitions_dir()
    return sorted(directory.glob("*.sql"), key=lambda path: path.name)


def apply_migrations(database_url: str, migrations_dir: Path | None = None) -> list[str]:
    """Apply the pending yoyo migrations under yoyo's lock; return the applied ids."""
    migrations_dir = migrations_dir or paths.migrations_dir()
    backend = get_backend(yoyo_uri(database_url))
    try:
        migrations = read_migrations(str(migrations_dir))
        with backend.lock(timeout=YOYO_LOCK_TIMEOUT_S):
            pending = backend.to_apply(migrations)
            backend.apply_migrations(pending)
        return [migration.id for migration in pending]
    finally:
        backend.connection.close()


def apply_definitions(database_url: str, files: list[Path]) -> None:
    """Execute every definition file in one transaction, serialised by an advisory lock."""
    with psycopg.connect(database_url, application_name=f"{APP_NAME} migrate") as conn:
        conn.execute("SELECT pg_advisory_xact_lock(%s, %s)", (LOCK_CLASSID, LOCK_MIGRATE))
        for path in files:
            # No parameters: the simple query protocol runs the whole file as it is.
            conn.execute(path.read_text(encoding="utf-8").encode("utf-8"))


def migrate(database_url: str) -> dict[str, Any]:
    """Install or upgrade the ``bulk_sync`` schema; running it twice is a no-op.

    Returns ``{"applied_migrations": [ids], "definitions": <number of db/*.sql files>}``.
    """
    logging.getLogger("yoyo").setLevel(logging.ERROR)
    applied = apply_migrations(database_url)
    files = definition_files()
    apply_definitions(database_url, files)
    return {"applied_migrations": applied, "definitions": len(files)}
