"""``bulk-sync migrate``: versioned yoyo migrations, then the repeatable ``db/`` definitions.

1. yoyo applies the pending files of ``migrations/`` while its bookkeeping connection holds
   the session-level ``pg_advisory_lock(1651862635, 5)``, waited for at most 120 s, so two
   concurrent migrates apply them one after the other. The lock ends with its session: a
   migrate that is killed never blocks the next one (yoyo's own lock, a row in ``yoyo_lock``,
   outlives the process that wrote it; that table is neither created nor read). Each
   migration is one transaction whose connection has ``lock_timeout`` set.
2. The ``db/*.sql`` files are applied, in filename order, in ONE transaction that first takes
   ``pg_advisory_xact_lock(1651862635, 4)``, so two concurrent migrates never interleave.
   After every file below ``db/9*`` (the privileges, which come last), that transaction drops
   every function, trigger and view of ``bulk_sync`` that the files did not (re)define (an
   orphan of an older release: its catalog row was not written by this transaction), then
   runs the ``db/9*`` files and records what it applied in ``bulk_sync._definitions_state``.
   yoyo's post-apply hook is not used: it is skipped when nothing is pending.

Safe on a live database: when nothing is pending and the stored SHA-256 of the ``db/`` files
and the MD5 of the catalog both match, step 2 is skipped and takes no lock at all. Otherwise
every lock is waited for at most ``lock_timeout`` (2 s by default), so a writer never queues
behind migrate for longer than that; a timed-out attempt rolls back completely and is retried
with backoff. After the last attempt migrate raises a ``CliError`` (exit 3) naming the
sessions that held the lock; nothing of the failed step is applied.

Both steps work for a non-superuser role that owns the database.
"""

from __future__ import annotations

import hashlib
import logging
import random
import re
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager, suppress
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import quote, urlencode

import psycopg
from psycopg import errors, sql
from psycopg.conninfo import conninfo_to_dict
from yoyo import read_migrations
from yoyo.backends.core.postgresql import PostgresqlPsycopgBackend
from yoyo.connections import parse_uri
from yoyo.migrations import default_migration_table

from bulk_sync import paths
from bulk_sync.db import APP_NAME
from bulk_sync.errors import EXIT_DATABASE, CliError

LOCK_CLASSID = 1651862635  # 'bs_k' as int4: the bulk_sync advisory-lock namespace
LOCK_MIGRATE = 4  # the db/ transaction
LOCK_MIGRATIONS = 5  # the session that applies the yoyo migrations
MIGRATIONS_LOCK_WAIT_S = 120
LOCK_TIMEOUT_MS = 2000  # the longest a writer may queue behind one of migrate's lock requests
ATTEMPTS = 6
BACKOFF_FIRST_S = 0.25
BACKOFF_MAX_S = 4.0

T = TypeVar("T")

# Every lock wait that ends in one of these rolls the attempt back and is retried.
RETRYABLE = (errors.LockNotAvailable, errors.DeadlockDetected)

# The tables that db/ puts triggers on: CREATE OR REPLACE TRIGGER takes SHARE ROW EXCLUSIVE
# on each, so the attempt takes those first, one statement each, and then either holds all of
# them or has waited (at most lock_timeout) for exactly one, which it can name. Views are not
# locked up front: LOCK TABLE on a view also locks its base tables, in the same strong mode.
_TRIGGER_TARGET = re.compile(
    r"CREATE\s+OR\s+REPLACE\s+TRIGGER\s+\w+\s+.*?\bON\s+(bulk_sync\.\w+)", re.I | re.S
)
_VIEW = re.compile(r"CREATE\s+OR\s+REPLACE\s+VIEW\s+(bulk_sync\.\w+)", re.I)

# One text per function, trigger, view and grant of bulk_sync, hashed: what db/ leaves behind.
# pg_catalog is the only schema on the search_path while it runs, so every name is qualified.
CATALOG_FINGERPRINT = """
SELECT md5(coalesce(string_agg(d.item, E'\\n' ORDER BY d.item), ''))
  FROM (SELECT format('function %s %s %s %s', p.oid::regprocedure, md5(pg_get_functiondef(p.oid)),
                      (SELECT string_agg(a::text, ',' ORDER BY a::text) FROM unnest(p.proacl) AS a),
                      obj_description(p.oid, 'pg_proc')) AS item
          FROM pg_proc AS p
         WHERE p.pronamespace = 'bulk_sync'::regnamespace AND p.prokind IN ('f', 'p')
        UNION ALL
        SELECT format('trigger %s', pg_get_triggerdef(t.oid))
          FROM pg_trigger AS t JOIN pg_class AS c ON c.oid = t.tgrelid
         WHERE c.relnamespace = 'bulk_sync'::regnamespace AND NOT t.tgisinternal
        UNION ALL
        SELECT format('relation %s %s %s %s', c.oid::regclass, c.relkind,
                      CASE WHEN c.relkind IN ('v', 'm') THEN md5(pg_get_viewdef(c.oid)) END,
                      (SELECT string_agg(a::text, ',' ORDER BY a::text) FROM unnest(c.relacl) AS a))
          FROM pg_class AS c
         WHERE c.relnamespace = 'bulk_sync'::regnamespace AND c.relkind IN ('r', 'p', 'v', 'm', 'S')
        UNION ALL
        SELECT format('schema %s', n.nspacl)
          FROM pg_namespace AS n
         WHERE n.nspname = 'bulk_sync') AS d
"""

# Objects of bulk_sync that this transaction did not write: db/ no longer defines them. Every
# CREATE OR REPLACE writes a new catalog row, whose xmin is the current transaction.
ORPHANS = """
SELECT 'VIEW', c.oid::regclass::text
  FROM pg_class AS c JOIN pg_rewrite AS r ON r.ev_class = c.oid AND r.rulename = '_RETURN'
 WHERE c.relnamespace = 'bulk_sync'::regnamespace AND c.relkind = 'v'
   AND r.xmin <> pg_current_xact_id()::xid
   AND NOT EXISTS (SELECT FROM pg_depend AS e WHERE e.classid = 'pg_class'::regclass
                   AND e.objid = c.oid AND e.deptype = 'e')
UNION ALL
SELECT 'TRIGGER', format('%I ON %s', t.tgname, t.tgrelid::regclass)
  FROM pg_trigger AS t JOIN pg_class AS c ON c.oid = t.tgrelid
 WHERE c.relnamespace = 'bulk_sync'::regnamespace AND NOT t.tgisinternal
   AND t.xmin <> pg_current_xact_id()::xid
UNION ALL
SELECT CASE p.prokind WHEN 'p' THEN 'PROCEDURE' WHEN 'a' THEN 'AGGREGATE' ELSE 'FUNCTION' END,
       p.oid::regprocedure::text
  FROM pg_proc AS p
 WHERE p.pronamespace = 'bulk_sync'::regnamespace
   AND p.xmin <> pg_current_xact_id()::xid
   AND NOT EXISTS (SELECT FROM pg_depend AS e WHERE e.classid = 'pg_proc'::regclass
                   AND e.objid = p.oid AND e.deptype = 'e')
"""

# Who holds a lock on the relation (or, when it is not known, on any bulk_sync relation).
HOLDERS = """
SELECT l.pid, a.state, a.query_start, l.mode, l.relation::regclass::text, left(a.query, 80)
  FROM pg_catalog.pg_locks AS l
  JOIN pg_catalog.pg_stat_activity AS a ON a.pid = l.pid
 WHERE l.locktype = 'relation' AND l.granted AND l.pid <> pg_catalog.pg_backend_pid()
   AND l.database = (SELECT oid FROM pg_catalog.pg_database WHERE datname = current_database())
   AND CASE WHEN %(relation)s::text IS NULL
            THEN l.relation IN (SELECT c.oid FROM pg_catalog.pg_class AS c
                                 WHERE c.relnamespace = 'bulk_sync'::regnamespace)
            ELSE l.relation = %(relation)s::text::regclass END
 ORDER BY a.xact_start NULLS LAST, l.pid
 LIMIT 3
"""


# Who holds the migrations lock: the session of another migrate (or of a DBA's own query).
MIGRATIONS_LOCK_HOLDERS = """
SELECT l.pid, a.application_name, a.state, a.backend_start, left(a.query, 80)
  FROM pg_catalog.pg_locks AS l
  JOIN pg_catalog.pg_stat_activity AS a ON a.pid = l.pid
 WHERE l.locktype = 'advisory' AND l.granted
   AND l.database = (SELECT oid FROM pg_catalog.pg_database WHERE datname = current_database())
   AND l.classid = %(classid)s AND l.objid = %(objid)s AND l.objsubid = 2
"""


class LockWaitExceeded(Exception):
    """One attempt waited ``lock_timeout`` for a lock (on ``relation`` when known)."""

    def __init__(self, relation: str | None, cause: psycopg.Error) -> None:
        super().__init__(str(cause))
        self.relation = relation
        self.cause = cause


def yoyo_uri(database_url: str, lock_timeout_ms: int | None = None) -> str:
    """Turn a libpq URL or ``key=value`` conninfo into yoyo's ``postgresql+psycopg`` URI.

    yoyo passes URI query parameters to ``psycopg.connect`` as keywords, so every
    connection parameter (``host`` as a socket directory included) travels as one; this
    keeps unix-socket URLs such as ``postgresql://postgres@/db?host=/run/dir`` working.
    ``lock_timeout_ms`` becomes ``-c lock_timeout=...`` in ``options``: yoyo applies each
    migration on a fresh connection of its own, which inherits it from the URI.
    """
    params = {k: str(v) for k, v in conninfo_to_dict(database_url).items() if v is not None}
    dbname = params.pop("dbname", "")
    params.setdefault("application_name", f"{APP_NAME} migrate")
    if lock_timeout_ms is not None:
        options = params.get("options", "")
        params["options"] = f"{options} -c lock_timeout={int(lock_timeout_ms)}".strip()
    query = urlencode(params, quote_via=quote)
    return f"postgresql+psycopg:///{quote(dbname, safe='')}" + (f"?{query}" if query else "")


def definition_files(directory: Path | None = None) -> list[Path]:
    """The ``db/*.sql`` files in the order they are applied (sorted by filename)."""
    directory = directory or paths.definitions_dir()
    return sorted(directory.glob("*.sql"), key=lambda path: path.name)


def files_checksum(files: list[Path]) -> str:
    """SHA-256 over every definition file's name and bytes, in application order."""
    digest = hashlib.sha256()
    for path in files:
        data = path.read_bytes()
        digest.update(f"{path.name}\0{len(data)}\0".encode())
        digest.update(data)
    return digest.hexdigest()


def _describe_holders(database_url: str, relation: str | None) -> str:
    """One line naming the sessions that hold a lock on ``relation`` (pid, state, query start)."""
    try:
        with psycopg.connect(
            database_url, autocommit=True, application_name=f"{APP_NAME} migrate"
        ) as conn:
            rows = conn.execute(HOLDERS, {"relation": relation}).fetchall()
    except psycopg.Error as exc:
        return f"the lock holders could not be read ({type(exc).__name__})"
    if not rows:
        return "the holder has finished since"
    return _held_by(
        f"pid {pid} ({state or 'unknown state'}, query started {_when(query_start)}, "
        f"{mode} on {rel}, query: {_one_line(query)!r})"
        for pid, state, query_start, mode, rel, query in rows
    )


def _held_by(described: Iterable[str]) -> str:
    return "held by " + "; ".join(described)


def _when(moment: datetime | None) -> str:
    return moment.isoformat() if moment else "unknown"


def _one_line(query: str | None) -> str:
    return re.sub(r"\s+", " ", query or "").strip()


def _with_retries(
    database_url: str,
    what: str,
    attempt: Callable[[], T],
    *,
    attempts: int,
    lock_timeout_ms: int,
    sleep: Callable[[float], None] = time.sleep,
) -> T:
    """Run ``attempt`` until it gets its locks; back off between tries; give up with exit 3."""
    last: LockWaitExceeded | None = None
    for number in range(1, attempts + 1):
        try:
            return attempt()
        except LockWaitExceeded as exc:
            last = exc
        except RETRYABLE as exc:
            last = LockWaitExceeded(None, exc)
        if number < attempts:
            delay = min(BACKOFF_FIRST_S * 2 ** (number - 1), BACKOFF_MAX_S)
            sleep(delay * random.uniform(0.8, 1.2))  # noqa: S311 (jitter, not crypto)
    assert last is not None
    target = last.relation or "a bulk_sync relation"
    reason = (
        "a deadlock"
        if isinstance(last.cause, errors.DeadlockDetected)
        else f"no lock on {target} within {lock_timeout_ms} ms"
    )
    raise CliError(
        f"migrate gave up on {what} after {attempts} attempts ({reason}); "
        f"{_describe_holders(database_url, last.relation)}; nothing of it was applied, "
        "retry when that transaction has finished",
        EXIT_DATABASE,
    ) from last.cause


def _describe_migrations_lock_holders(conn: psycopg.Connection) -> str:
    """Who holds the migrations lock (pid, application, state, session start, last query)."""
    try:
        rows = conn.execute(
            MIGRATIONS_LOCK_HOLDERS, {"classid": LOCK_CLASSID, "objid": LOCK_MIGRATIONS}
        ).fetchall()
    except psycopg.Error as exc:
        return f"its holder could not be read ({type(exc).__name__})"
    if not rows:
        return "its holder has finished since"
    return _held_by(
        f"pid {pid} ({application or 'no application_name'}, {state or 'unknown state'}, "
        f"session started {_when(backend_start)}, last query: {_one_line(query)!r})"
        for pid, application, state, backend_start, query in rows
    )


class SessionLockBackend(PostgresqlPsycopgBackend):
    """yoyo's psycopg backend whose lock is a session-level advisory lock, not a table row.

    yoyo locks by inserting a row into ``yoyo_lock`` and deleting it afterwards: a process
    killed in between leaves the row, and every later lock waits for it until it times out.
    ``pg_advisory_lock(LOCK_CLASSID, LOCK_MIGRATIONS)`` on the bookkeeping connection is
    released when that session ends, however the process ends. yoyo's own calls of ``lock()``
    (an upgrade of its internal tables) take the same lock, or nest in the one already held.
    """

    _lock_held = False

    def create_lock_table(self) -> None:
        """No ``yoyo_lock`` table: a row an older release left in one is never read."""

    @contextmanager
    def lock(self, timeout: float = 10) -> Iterator[None]:
        """Hold the migrations lock, waiting at most ``timeout`` seconds (0: for ever).

        A wait that runs out raises a ``CliError`` (exit 3) naming the session holding it.
        """
        if self._lock_held:
            yield
            return
        conn = self.connection
        try:
            # A session lock taken in a transaction outlives its commit; lock_timeout bounds
            # the wait for this statement alone.
            with conn.transaction():
                conn.execute(
                    "SELECT set_config('lock_timeout', %s, true)",
                    (f"{int(timeout * 1000)}ms",),
                )
                conn.execute("SELECT pg_advisory_lock(%s, %s)", (LOCK_CLASSID, LOCK_MIGRATIONS))
        except errors.LockNotAvailable as exc:
            raise CliError(
                f"migrate waited {timeout:g} s for the migrations lock (advisory lock "
                f"{LOCK_CLASSID}, {LOCK_MIGRATIONS}); {_describe_migrations_lock_holders(conn)}; "
                "retry when that session has ended",
                EXIT_DATABASE,
            ) from exc
        self._lock_held = True
        try:
            yield
        finally:
            self._lock_held = False
            # When the session is unusable, closing it (apply_migrations does) releases the lock.
            with suppress(psycopg.Error):
                conn.execute("SELECT pg_advisory_unlock(%s, %s)", (LOCK_CLASSID, LOCK_MIGRATIONS))


def migrations_backend(uri: str) -> SessionLockBackend:
    """What ``yoyo.get_backend`` returns for a ``postgresql+psycopg`` URI, with the session lock."""
    backend = SessionLockBackend(parse_uri(uri), default_migration_table)
    backend.init_database()
    return backend


def apply_migrations(
    database_url: str,
    migrations_dir: Path | None = None,
    *,
    lock_timeout_ms: int = LOCK_TIMEOUT_MS,
    attempts: int = ATTEMPTS,
    lock_wait_s: float = MIGRATIONS_LOCK_WAIT_S,
) -> list[str]:
    """Apply the pending yoyo migrations under the migrations lock; return the applied ids.

    The lock is waited for at most ``lock_wait_s`` seconds. Each migration is its own
    transaction: a lock timeout rolls that one back, and the pending ones are retried with
    backoff.
    """
    migrations_dir = migrations_dir or paths.migrations_dir()
    backend = migrations_backend(yoyo_uri(database_url, lock_timeout_ms))
    applied: list[str] = []
    try:
        migrations = read_migrations(str(migrations_dir))

        def attempt() -> None:
            with backend.lock(timeout=lock_wait_s):
                for migration in backend.to_apply(migrations):
                    backend.apply_one(migration)
                    applied.append(migration.id)

        _with_retries(
            database_url,
            "the pending migrations",
            attempt,
            attempts=attempts,
            lock_timeout_ms=lock_timeout_ms,
        )
        return applied
    finally:
        backend.connection.close()  # also releases the migrations lock


def _fingerprint(conn: psycopg.Connection) -> str:
    """The catalog MD5, read with pg_catalog alone on the search_path (qualified names)."""
    with conn.transaction():
        conn.execute("SELECT set_config('search_path', 'pg_catalog', true)")
        return conn.execute(CATALOG_FINGERPRINT).fetchone()[0]


def _stored_state(conn: psycopg.Connection) -> tuple[str, str] | None:
    if conn.execute("SELECT to_regclass('bulk_sync._definitions_state')").fetchone()[0] is None:
        return None
    row = conn.execute(
        "SELECT files_sha256, catalog_md5 FROM bulk_sync._definitions_state"
    ).fetchone()
    return None if row is None else (row[0], row[1])


def _lock_target(path: Path) -> str | None:
    """The relation a definition file locks: the view it replaces or the table of its trigger."""
    text = path.read_text(encoding="utf-8")
    found = _VIEW.search(text) or _TRIGGER_TARGET.search(text)
    return found.group(1) if found else None


def _trigger_tables(files: list[Path]) -> list[str]:
    """Every table that db/ puts a trigger on (not views), sorted, each once."""
    text = "\n".join(path.read_text(encoding="utf-8") for path in files)
    views = set(_VIEW.findall(text))
    return sorted(set(_TRIGGER_TARGET.findall(text)) - views)


def _apply_once(
    conn: psycopg.Connection, files: list[Path], checksum: str, lock_timeout_ms: int
) -> list[str]:
    """One attempt: every file, the orphans dropped, the state recorded; or nothing."""
    relation: str | None = None
    try:
        with conn.transaction():
            conn.execute(
                "SELECT set_config('lock_timeout', %s, true)", (f"{int(lock_timeout_ms)}ms",)
            )
            conn.execute("SELECT pg_advisory_xact_lock(%s, %s)", (LOCK_CLASSID, LOCK_MIGRATE))
            for target in _trigger_tables(files):
                relation = target
                if conn.execute("SELECT to_regclass(%s)", (target,)).fetchone()[0] is None:
                    continue  # a first install: the table appears with its migration
                schema, name = target.split(".", 1)
                conn.execute(
                    sql.SQL("LOCK TABLE {} IN SHARE ROW EXCLUSIVE MODE").format(
                        sql.Identifier(schema, name)
                    )
                )
            privileges = [path for path in files if path.name.startswith("9")]
            for path in [path for path in files if path not in privileges]:
                relation = _lock_target(path)
                # No parameters: the simple query protocol runs the whole file as it is.
                conn.execute(path.read_text(encoding="utf-8").encode("utf-8"))
            relation = None
            # Before the privileges: a GRANT or REVOKE rewrites the catalog row of every object
            # it names, which would make an orphan look freshly defined.
            dropped = []
            for kind, name in conn.execute(ORPHANS).fetchall():
                conn.execute(f"DROP {kind} {name}".encode())
                dropped.append(f"{kind.lower()} {name}")
            for path in privileges:
                conn.execute(path.read_text(encoding="utf-8").encode("utf-8"))
            fingerprint = _fingerprint(conn)
            conn.execute(
                "INSERT INTO bulk_sync._definitions_state AS s (files_sha256, catalog_md5)"
                " VALUES (%s, %s) ON CONFLICT (singleton) DO UPDATE"
                " SET files_sha256 = excluded.files_sha256, catalog_md5 = excluded.catalog_md5,"
                " applied_at = now(), applied_by = current_user",
                (checksum, fingerprint),
            )
            return dropped
    except RETRYABLE as exc:
        raise LockWaitExceeded(relation, exc) from exc


def apply_definitions(
    database_url: str,
    files: list[Path],
    *,
    force: bool = False,
    lock_timeout_ms: int = LOCK_TIMEOUT_MS,
    attempts: int = ATTEMPTS,
) -> dict[str, Any]:
    """Apply every definition file in one transaction, unless the database is already current.

    Returns ``{"applied": bool, "dropped": [orphans]}``.
    """
    checksum = files_checksum(files)
    with psycopg.connect(
        database_url, autocommit=True, application_name=f"{APP_NAME} migrate"
    ) as conn:
        if not force:
            stored = _stored_state(conn)
            if stored is not None and stored == (checksum, _fingerprint(conn)):
                return {"applied": False, "dropped": []}
        dropped = _with_retries(
            database_url,
            "the db/ definitions",
            lambda: _apply_once(conn, files, checksum, lock_timeout_ms),
            attempts=attempts,
            lock_timeout_ms=lock_timeout_ms,
        )
    return {"applied": True, "dropped": dropped}


def migrate(
    database_url: str,
    *,
    lock_timeout_ms: int = LOCK_TIMEOUT_MS,
    attempts: int = ATTEMPTS,
) -> dict[str, Any]:
    """Install or upgrade the ``bulk_sync`` schema; running it twice is a no-op.

    Returns ``{"applied_migrations": [ids], "definitions": <number of db/*.sql files>,
    "definitions_applied": bool, "dropped": [orphaned objects dropped]}``.
    """
    if lock_timeout_ms < 1 or attempts < 1:
        raise CliError("lock timeout and attempts must be at least 1")
    logging.getLogger("yoyo").setLevel(logging.ERROR)
    applied = apply_migrations(database_url, lock_timeout_ms=lock_timeout_ms, attempts=attempts)
    files = definition_files()
    outcome = apply_definitions(
        database_url,
        files,
        force=bool(applied),  # a migration may have changed what the definitions rely on
        lock_timeout_ms=lock_timeout_ms,
        attempts=attempts,
    )
    return {
        "applied_migrations": applied,
        "definitions": len(files),
        "definitions_applied": outcome["applied"],
        "dropped": outcome["dropped"],
    }
