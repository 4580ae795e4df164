"""`bulk-sync migrate` on a live database: it never stalls writers, drops orphans, upgrades.

A real writer transaction holds user_actions (or user_stats) open while `bulk-sync migrate`
runs as a subprocess: another writer still gets through within 3 s, migrate retries and,
when the lock never comes, exits 3 naming the holder's pid with nothing applied. The same
writer stops a migrate inside a migration, holding the migrations lock, to show that a second
migrate waits for it and that a killed one leaves nothing behind that blocks the next.
"""

from __future__ import annotations

import json
import signal
import subprocess
import time
import uuid
from collections.abc import Callable
from decimal import Decimal
from typing import Any

import psycopg
import pytest
from psycopg.types.json import Jsonb
from yoyo import get_backend, read_migrations

from bulk_sync.errors import EXIT_DATABASE, CliError
from bulk_sync.migrate import LOCK_CLASSID, LOCK_MIGRATIONS, apply_migrations, migrate
from helpers import (
    assert_exact_totals,
    cli_command,
    cli_env,
    connect,
    log_action,
    new_id,
    reconcile,
    stop_process,
    wait_for,
)
from test_migrations import MIGRATIONS_DIR, definitions, yoyo_url

WRITER_BUDGET_S = 3.0  # the contract: a writer never queues behind migrate for more than ~2 s


def _action(user: str, lbs: str = "1.500000") -> dict[str, Any]:
    return {
        "action_id": new_id(),
        "user_id": user,
        "lbs": lbs,
        "logged_at": "2025-01-01T00:00:00Z",
        "verified": True,
    }


def _catalog_rows(conn: psycopg.Connection) -> list[tuple[Any, ...]]:
    """Every bulk_sync function, trigger and view row with its xmin: unchanged means untouched."""
    return conn.execute(
        "SELECT 'f', oid::regprocedure::text, xmin::text FROM pg_proc"
        " WHERE pronamespace = 'bulk_sync'::regnamespace"
        " UNION ALL SELECT 't', tgname::text, xmin::text FROM pg_trigger"
        " WHERE tgrelid = 'bulk_sync.user_actions'::regclass"
        " UNION ALL SELECT 'v', ev_class::regclass::text, xmin::text FROM pg_rewrite"
        " WHERE ev_class = 'bulk_sync.global_emissions'::regclass ORDER BY 1, 2"
    ).fetchall()


def _stored_checksum(conn: psycopg.Connection) -> str:
    return conn.execute("SELECT files_sha256 FROM bulk_sync._definitions_state").fetchone()[0]


def _holder(url: str, user: str) -> psycopg.Connection:
    """A writer transaction left open after one log_action (RowExclusive on the tables)."""
    holder = connect(url, autocommit=False, application_name="bulk-sync-test-holder")
    holder.execute("SELECT bulk_sync.log_action(%s)", (Jsonb(_action(user)),))
    return holder


def _migrate_waiting(conn: psycopg.Connection) -> bool:
    return conn.execute(
        "SELECT EXISTS (SELECT FROM pg_stat_activity WHERE datname = current_database()"
        " AND application_name = 'bulk-sync migrate' AND wait_event_type = 'Lock')"
    ).fetchone()[0]


def _start_migrate(url: str, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        cli_command(url, "migrate", *args),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=cli_env(),
    )


def _timed_log_action(conn: psycopg.Connection, user: str) -> float:
    started = time.monotonic()
    response = log_action(conn, _action(user, "2.000000"))
    elapsed = time.monotonic() - started
    assert response["status"] == "inserted"
    return elapsed


def test_rerun_on_a_current_database_takes_no_lock(db_url: str) -> None:
    """Current db/: migrate skips the definitions, so even an open writer does not slow it."""
    with connect(db_url) as conn:
        before = _catalog_rows(conn)
        holder = _holder(db_url, new_id())
        try:
            started = time.monotonic()
            result = migrate(db_url, attempts=1)
            assert time.monotonic() - started < WRITER_BUDGET_S
            assert result["applied_migrations"] == []
            assert result["definitions_applied"] is False
        finally:
            holder.rollback()
            holder.close()
        assert _catalog_rows(conn) == before


def test_writers_pass_while_migrate_waits_then_it_gives_up(db_url: str) -> None:
    """A writer transaction open on user_actions; migrate forced to re-apply db/.

    The other writer finishes within 3 s; migrate gives up (exit 3) naming the holder's pid,
    and nothing is applied. Once the holder commits, migrate succeeds.
    """
    with connect(db_url) as conn:
        conn.execute("UPDATE bulk_sync._definitions_state SET files_sha256 = 'stale'")
        before = _catalog_rows(conn)
        holder = _holder(db_url, new_id())
        holder_pid = holder.info.backend_pid
        try:
            proc = _start_migrate(db_url, "--attempts", "2", "--lock-timeout", "2000")
            wait_for(lambda: _migrate_waiting(conn), 30, what="migrate to wait for its lock")
            writer = connect(db_url)  # on the holder's slot or not: it claims a free one
            elapsed = _timed_log_action(writer, new_id())
            assert elapsed < WRITER_BUDGET_S, f"a writer waited {elapsed:.2f}s behind migrate"
            # A second writer arriving during migrate's second attempt is just as quick.
            wait_for(lambda: _migrate_waiting(conn), 30, what="migrate's second attempt")
            elapsed = _timed_log_action(writer, new_id())
            assert elapsed < WRITER_BUDGET_S, f"a writer waited {elapsed:.2f}s behind migrate"
            stdout, stderr = proc.communicate(timeout=60)
            assert proc.returncode == 3, (stdout, stderr)
            lines = stderr.strip().splitlines()
            assert len(lines) == 1, stderr
            assert lines[0].startswith("bulk-sync: error: migrate gave up"), stderr
            assert f"pid {holder_pid} " in lines[0], stderr
            assert "idle in transaction" in lines[0], stderr
            assert "bulk_sync.user_actions" in lines[0], stderr
            assert stdout == ""
            # Nothing applied: no catalog row rewritten, the stale checksum still there.
            assert _catalog_rows(conn) == before
            assert _stored_checksum(conn) == "stale"
            holder.commit()
        finally:
            holder.close()

        proc = _start_migrate(db_url)
        stdout, stderr = proc.communicate(timeout=60)
        assert proc.returncode == 0, stderr
        assert _stored_checksum(conn) != "stale"
        assert _catalog_rows(conn) != before
        assert_exact_totals(conn, Decimal("5.500000"))
        assert reconcile(conn)["in_sync"] is True


def test_migrate_retries_until_the_holder_commits(db_url: str) -> None:
    """The holder commits during migrate's backoff: a later attempt applies everything."""
    with connect(db_url) as conn:
        conn.execute("UPDATE bulk_sync._definitions_state SET files_sha256 = 'stale'")
        defs = definitions(conn)
        holder = _holder(db_url, new_id())
        try:
            proc = _start_migrate(db_url, "--attempts", "6", "--lock-timeout", "500")
            wait_for(lambda: _migrate_waiting(conn), 30, what="migrate to wait for its lock")
            time.sleep(1.5)  # at least two timed-out attempts
            holder.commit()
        finally:
            holder.close()
        stdout, stderr = proc.communicate(timeout=60)
        assert proc.returncode == 0, stderr
        assert '"definitions_applied": true' in stdout
        assert _stored_checksum(conn) != "stale"
        # Re-applied, same definitions: same oids and texts, nothing dropped.
        assert definitions(conn) == defs
        assert '"dropped": []' in stdout


def _unapply_0005(url: str) -> None:
    """Roll back 0005.leaderboard-key (it has no rollback: it is only unmarked), so that it is
    pending; re-applied, it takes a lock on user_stats that an open writer holds up."""
    backend = get_backend(yoyo_url(url))
    try:
        migrations = read_migrations(str(MIGRATIONS_DIR))
        with backend.lock():
            backend.rollback_migrations(
                migrations.filter(lambda m: m.id in ("0005.leaderboard-key",))
            )
        assert "0005.leaderboard-key" not in {
            m.id for m in migrations if m.hash in backend.get_applied_migration_hashes()
        }
    finally:
        backend.connection.close()


def test_pending_migration_waits_briefly_and_gives_up(db_url: str) -> None:
    """A migration altering user_stats under an open writer: exit 3, not applied, writers pass."""
    _unapply_0005(db_url)
    with connect(db_url) as conn:
        holder = _holder(db_url, new_id())
        holder_pid = holder.info.backend_pid
        try:
            proc = _start_migrate(db_url, "--attempts", "2")
            wait_for(lambda: _migrate_waiting(conn), 30, what="the migration to wait")
            writer = connect(db_url)  # on the holder's slot or not: it claims a free one
            elapsed = _timed_log_action(writer, new_id())
            assert elapsed < WRITER_BUDGET_S, f"a writer waited {elapsed:.2f}s behind migrate"
            stdout, stderr = proc.communicate(timeout=60)
            assert proc.returncode == 3, (stdout, stderr)
            assert "pending migrations" in stderr
            assert f"pid {holder_pid} " in stderr, stderr
            holder.commit()
        finally:
            holder.close()
    assert migrate(db_url)["applied_migrations"] == ["0005.leaderboard-key"]
    with connect(db_url) as conn:
        assert_exact_totals(conn, Decimal("3.500000"))


# --------------------------------------------------------------------------- migrations lock


def _waiting_for_migrations_lock(conn: psycopg.Connection) -> bool:
    return conn.execute(
        "SELECT EXISTS (SELECT FROM pg_locks WHERE locktype = 'advisory' AND NOT granted"
        " AND classid = %s AND objid = %s AND objsubid = 2)",
        (LOCK_CLASSID, LOCK_MIGRATIONS),
    ).fetchone()[0]


def _freeze_inside_0005(proc: subprocess.Popen[str], conn: psycopg.Connection) -> None:
    """Stop (SIGSTOP) a migrate while 0005 waits for the open writer's lock on user_stats.

    A migration runs under the migrations lock, so the frozen process holds it. Its wait still
    being there after the stop shows that the process had not had its answer (a timeout):
    it was inside the lock. Otherwise it is let go and stopped at its next attempt.
    """
    while True:
        wait_for(lambda: _migrate_waiting(conn), 30, what="0005 to wait for user_stats")
        proc.send_signal(signal.SIGSTOP)
        if _migrate_waiting(conn):
            return
        proc.send_signal(signal.SIGCONT)


def _finish(proc: subprocess.Popen[str]) -> dict[str, Any]:
    """Wait for a migrate subprocess (far longer than it needs); its printed JSON result."""
    try:
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        stop_process(proc, signal.SIGKILL)
    assert proc.returncode == 0, stderr
    return json.loads(stdout)


def test_a_killed_migrate_does_not_block_the_next(db_url: str) -> None:
    """migrate SIGKILLed while it holds the migrations lock: the next one migrates everything.

    The lock belongs to the killed process's session, which ends with it. A lock that outlived
    it (yoyo's row in yoyo_lock) would hold the next migrate for 120 s, then exit 3.
    """
    _unapply_0005(db_url)
    with connect(db_url) as conn:
        holder = _holder(db_url, new_id())
        try:
            killed = _start_migrate(db_url, "--attempts", "100")
            try:
                _freeze_inside_0005(killed, conn)
            finally:
                stop_process(killed, signal.SIGKILL)
            assert killed.returncode == -signal.SIGKILL
            holder.commit()
        finally:
            holder.close()
        result = _finish(_start_migrate(db_url))
        assert result["applied_migrations"] == ["0005.leaderboard-key"]
        assert result["definitions_applied"] is True
        assert_exact_totals(conn, Decimal("1.500000"))
        assert reconcile(conn)["in_sync"] is True
    assert migrate(db_url, attempts=1) == {
        "applied_migrations": [],
        "definitions": result["definitions"],
        "definitions_applied": False,
        "dropped": [],
    }


def test_a_second_migrate_waits_for_the_first(db_url: str) -> None:
    """Two migrates of one database, both held up by 0005: one waits for the migrations lock
    while the other is inside it; 0005 is applied once, and the other finds nothing pending."""
    _unapply_0005(db_url)
    with connect(db_url) as conn:
        holder = _holder(db_url, new_id())
        procs: list[subprocess.Popen[str]] = []
        try:
            procs.append(_start_migrate(db_url, "--attempts", "100"))
            wait_for(lambda: _migrate_waiting(conn), 30, what="0005 to wait for user_stats")
            procs.append(_start_migrate(db_url, "--attempts", "100"))
            wait_for(
                lambda: _waiting_for_migrations_lock(conn),
                30,
                what="a migrate to wait for the migrations lock",
            )
            assert [proc.poll() for proc in procs] == [None, None]
            holder.commit()
            results = [_finish(proc) for proc in procs]
        finally:
            holder.close()
            for proc in procs:
                stop_process(proc, signal.SIGKILL)
        assert sorted(result["applied_migrations"] for result in results) == [
            [],
            ["0005.leaderboard-key"],
        ]
        assert_exact_totals(conn, Decimal("1.500000"))


def test_a_yoyo_lock_row_of_an_older_release_is_ignored(db_url: str) -> None:
    """A row an older bulk-sync left in yoyo_lock (killed while holding yoyo's lock)."""
    _unapply_0005(db_url)  # yoyo itself, so the yoyo_lock table exists
    with connect(db_url) as conn:
        conn.execute("INSERT INTO yoyo_lock (locked, ctime, pid) VALUES (1, now(), 4242)")
    result = _finish(_start_migrate(db_url))
    assert result["applied_migrations"] == ["0005.leaderboard-key"]


def test_migrate_gives_up_on_the_migrations_lock_naming_its_holder(db_url: str) -> None:
    """Another session holds the migrations lock for longer than migrate waits: exit 3, with
    the holder's pid and application, and nothing applied."""
    _unapply_0005(db_url)
    with connect(db_url, application_name="bulk-sync-test-lock-holder") as holder:
        holder.execute("SELECT pg_advisory_lock(%s, %s)", (LOCK_CLASSID, LOCK_MIGRATIONS))
        with pytest.raises(CliError) as raised:
            apply_migrations(db_url, lock_wait_s=0.5)
        assert raised.value.exit_code == EXIT_DATABASE
        message = raised.value.message
        assert message.startswith("migrate waited 0.5 s for the migrations lock"), message
        assert f"pid {holder.info.backend_pid} (bulk-sync-test-lock-holder, idle," in message
    assert migrate(db_url)["applied_migrations"] == ["0005.leaderboard-key"]


# --------------------------------------------------------------------------- orphans


def _catalog(conn: psycopg.Connection) -> dict[str, list[tuple[Any, ...]]]:
    """What a fresh install and an upgrade must agree on, names only (no oids)."""
    queries = {
        "functions": "SELECT p.oid::regprocedure::text, p.prosrc, p.proconfig::text,"
        " p.prosecdef, p.provolatile, p.proretset, pg_get_function_result(p.oid),"
        " pg_get_function_arguments(p.oid), obj_description(p.oid, 'pg_proc'),"
        " (SELECT array_agg(a::text ORDER BY a::text) FROM unnest(p.proacl) AS a)"
        " FROM pg_proc AS p WHERE p.pronamespace = 'bulk_sync'::regnamespace",
        "triggers": "SELECT pg_get_triggerdef(t.oid), t.tgenabled FROM pg_trigger AS t"
        " JOIN pg_class AS c ON c.oid = t.tgrelid"
        " WHERE c.relnamespace = 'bulk_sync'::regnamespace AND NOT t.tgisinternal",
        "relations": "SELECT c.relname, c.relkind,"
        " CASE WHEN c.relkind = 'v' THEN pg_get_viewdef(c.oid) END,"
        " obj_description(c.oid, 'pg_class'),"
        " (SELECT array_agg(a::text ORDER BY a::text) FROM unnest(c.relacl) AS a)"
        " FROM pg_class AS c WHERE c.relnamespace = 'bulk_sync'::regnamespace"
        " AND c.relkind IN ('r', 'v', 'm', 'S', 'p')",
        "columns": "SELECT c.relname, a.attname, format_type(a.atttypid, a.atttypmod),"
        " a.attnotnull, a.attgenerated, pg_get_expr(d.adbin, d.adrelid),"
        " col_description(c.oid, a.attnum)"
        " FROM pg_attribute AS a JOIN pg_class AS c ON c.oid = a.attrelid"
        " LEFT JOIN pg_attrdef AS d ON d.adrelid = a.attrelid AND d.adnum = a.attnum"
        " WHERE c.relnamespace = 'bulk_sync'::regnamespace AND c.relkind IN ('r', 'v')"
        " AND a.attnum > 0 AND NOT a.attisdropped",
        "indexes": "SELECT indexrelid::regclass::text, pg_get_indexdef(indexrelid) FROM pg_index"
        " WHERE indrelid IN (SELECT oid FROM pg_class"
        " WHERE relnamespace = 'bulk_sync'::regnamespace)",
        "constraints": "SELECT conrelid::regclass::text, conname, pg_get_constraintdef(oid)"
        " FROM pg_constraint WHERE connamespace = 'bulk_sync'::regnamespace",
        "schema": "SELECT nspname, (SELECT array_agg(a::text ORDER BY a::text)"
        " FROM unnest(nspacl) AS a) FROM pg_namespace WHERE nspname = 'bulk_sync'",
    }
    with conn.transaction():
        conn.execute("SET LOCAL search_path = pg_catalog")
        return {
            name: sorted(conn.execute(query).fetchall(), key=repr)
            for name, query in queries.items()
        }


def _assert_same_catalog(actual: dict[str, Any], expected: dict[str, Any]) -> None:
    for name in expected:
        # Rows are compared whole; the message names them by their first two columns.
        extra = [row[:2] for row in actual[name] if row not in expected[name]]
        missing = [row[:2] for row in expected[name] if row not in actual[name]]
        assert (extra, missing) == ([], []), f"{name}: differ {extra!r}, expected {missing!r}"


def test_migrate_drops_orphans_and_restores_privileges(
    db_url: str, template_url: str, connect: Callable[..., psycopg.Connection]
) -> None:
    """Objects db/ does not define are dropped, in the same transaction; grants follow db/."""
    with connect(db_url) as conn:
        conn.execute(
            "CREATE FUNCTION bulk_sync.old_total(p_user uuid) RETURNS numeric"
            " LANGUAGE sql AS $$ SELECT 1::numeric $$"
        )
        conn.execute(
            "CREATE FUNCTION bulk_sync._old_trigger() RETURNS trigger LANGUAGE plpgsql"
            " AS $$ BEGIN RETURN NULL; END $$"
        )
        conn.execute(
            "CREATE TRIGGER _050_old AFTER TRUNCATE ON bulk_sync.user_actions"
            " FOR EACH STATEMENT EXECUTE FUNCTION bulk_sync._old_trigger()"
        )
        conn.execute("CREATE VIEW bulk_sync.old_view AS SELECT 1 AS one")
        conn.execute("GRANT EXECUTE ON FUNCTION bulk_sync.reconcile(jsonb) TO bulk_sync_reader")
        conn.execute("GRANT EXECUTE ON FUNCTION bulk_sync.old_total(uuid) TO bulk_sync_writer")
    result = migrate(db_url)
    assert result["definitions_applied"] is True
    assert sorted(result["dropped"]) == [
        "function bulk_sync._old_trigger()",
        "function bulk_sync.old_total(uuid)",
        "trigger _050_old ON bulk_sync.user_actions",
        "view bulk_sync.old_view",
    ]
    with connect(db_url) as conn, connect(template_url) as template:
        _assert_same_catalog(_catalog(conn), _catalog(template))
    assert migrate(db_url)["definitions_applied"] is False


def test_upgrade_from_the_first_release_equals_a_fresh_install(
    make_db: Callable[..., str], first_release: Any
) -> None:
    """Installed by b1910e4's own migrate, upgraded by this one: the catalog of a fresh install."""
    old, fresh = make_db(template=None), make_db(template=None)
    first_release.migrate(old)
    with connect(old) as conn:
        user = str(uuid.uuid4())
        log_action(conn, _action(user, "4.250000"))
        assert conn.execute(
            "SELECT to_regclass('bulk_sync._definitions_state') IS NULL"
        ).fetchone()[0]
    result = migrate(old)
    assert result["applied_migrations"] == [
        "0005.leaderboard-key",
        "0006.definitions-state",
        "0007.shared-load",
        "0008.user-delta",
        "0009.event-batches",
        "0010.precount-claims",
        "0011.checked-actions",
        "0012.slot-spare-pages",
    ]
    migrate(fresh)
    with connect(old) as upgraded, connect(fresh) as installed:
        _assert_same_catalog(_catalog(upgraded), _catalog(installed))
        # The event the first release stored as JSON, then one stored typed since: both published,
        # in order, in the same shape.
        other = str(uuid.uuid4())
        log_action(upgraded, _action(other, "1.000000"))
        payloads = [e for (e,) in upgraded.execute("SELECT payload FROM bulk_sync.events_since(0)")]
        assert [
            (e["kind"], e["user_id"], e["user_total_lbs"], e["global_total_lbs"]) for e in payloads
        ] == [("logged", user, "4.250000", "4.250000"), ("logged", other, "1.000000", "5.250000")]
        assert sorted(payloads[0]) == sorted(payloads[1])
        assert_exact_totals(upgraded, Decimal("5.250000"))
        assert reconcile(upgraded)["in_sync"] is True
        rank = upgraded.execute(
            "SELECT rank, total_lbs::text FROM bulk_sync.user_rank(%s)", (user,)
        ).fetchone()
        assert rank == (1, "4.250000")
    assert migrate(old)["definitions_applied"] is False


@pytest.fixture
def first_release(tmp_path_factory: pytest.TempPathFactory) -> Any:
    from release_tree import Release

    return Release.extract("b1910e4", tmp_path_factory.mktemp("b1910e4"))
