"""Migrations: upgrading data written under 0001, rolling back, re-running, other databases.

yoyo is driven directly (get_backend / read_migrations on migrations/) where a
test needs a state between migrations; bulk_sync.migrate.migrate() is the
runner's install-or-upgrade path under test.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from yoyo import get_backend, read_migrations
from yoyo.backends.base import DatabaseBackend

from bulk_sync.migrate import migrate
from helpers import amount, assert_exact_totals, connect, log_action, reconcile

MIGRATIONS_DIR = Path(__file__).resolve().parent.parent / "migrations"
MIGRATION_IDS = [
    "0001.core-schema",
    "0002.lifecycle",
    "0003.events",
    "0004.roles",
    "0005.leaderboard-key",
    "0006.definitions-state",
    "0007.shared-load",
    "0008.user-delta",
    "0009.event-batches",
    "0010.precount-claims",
    "0011.checked-actions",
    "0012.slot-spare-pages",
]
ROLES = ("bulk_sync_reader", "bulk_sync_writer", "bulk_sync_admin")


def yoyo_url(url: str) -> str:
    """yoyo's spelling of a postgresql:// URL."""
    assert url.startswith("postgresql://")
    return "postgresql+psycopg://" + url.removeprefix("postgresql://")


def open_backend(url: str) -> DatabaseBackend:
    return get_backend(yoyo_url(url))


def applied_ids(backend: DatabaseBackend) -> list[str]:
    migrations = read_migrations(str(MIGRATIONS_DIR))
    hashes = backend.get_applied_migration_hashes()
    return sorted(m.id for m in migrations if m.hash in hashes)


def scalar(conn: psycopg.Connection, query: str, params: tuple[Any, ...] = ()) -> Any:
    return conn.execute(query, params).fetchone()[0]


def relation_exists(conn: psycopg.Connection, name: str) -> bool:
    return scalar(conn, "SELECT to_regclass(%s) IS NOT NULL", (name,))


def column_exists(conn: psycopg.Connection, table: str, column: str) -> bool:
    return scalar(
        conn,
        "SELECT EXISTS (SELECT FROM information_schema.columns"
        " WHERE table_schema = 'bulk_sync' AND table_name = %s AND column_name = %s)",
        (table, column),
    )


def schema_exists(conn: psycopg.Connection) -> bool:
    return scalar(conn, "SELECT EXISTS (SELECT FROM pg_namespace WHERE nspname = 'bulk_sync')")


def yoyo_records(conn: psycopg.Connection) -> dict[str, list[tuple[Any, ...]]]:
    """Every row of every yoyo bookkeeping table, by table."""
    tables = [
        row[0]
        for row in conn.execute(
            "SELECT table_name FROM information_schema.tables"
            " WHERE table_schema = 'public' AND table_name LIKE '%%yoyo%%' ORDER BY 1"
        ).fetchall()
    ]
    assert tables, "no yoyo tables"
    return {
        table: conn.execute(
            sql.SQL("SELECT * FROM {} ORDER BY 1").format(sql.Identifier(table))
        ).fetchall()
        for table in tables
    }


def definitions(conn: psycopg.Connection) -> list[tuple[Any, ...]]:
    """Identity and text of every function, trigger and view in bulk_sync."""
    functions = conn.execute(
        "SELECT p.oid::bigint, p.oid::regprocedure::text, md5(pg_get_functiondef(p.oid)),"
        " p.proacl::text FROM pg_proc AS p"
        " WHERE p.pronamespace = 'bulk_sync'::regnamespace ORDER BY 2"
    ).fetchall()
    triggers = conn.execute(
        "SELECT t.oid::bigint, t.tgname, pg_get_triggerdef(t.oid) FROM pg_trigger AS t"
        " JOIN pg_class AS c ON c.oid = t.tgrelid"
        " WHERE c.relnamespace = 'bulk_sync'::regnamespace AND NOT t.tgisinternal ORDER BY 2"
    ).fetchall()
    views = conn.execute(
        "SELECT c.oid::bigint, c.relname, pg_get_viewdef(c.oid) FROM pg_class AS c"
        " WHERE c.relnamespace = 'bulk_sync'::regnamespace AND c.relkind = 'v' ORDER BY 2"
    ).fetchall()
    return [*functions, *triggers, *views]


def smoke(url: str) -> None:
    """The installed schema works: log a verified action, totals exact, reconcile in sync."""
    with connect(url) as conn:
        before = Decimal(assert_exact_totals(conn))
        request = {
            "action_id": str(uuid.uuid4()),
            "user_id": str(uuid.uuid4()),
            "lbs": "3.250000",
            "logged_at": "2024-05-01T12:00:00Z",
            "verified": True,
        }
        response = log_action(conn, request)
        assert response["status"] == "inserted"
        assert response["global_total_lbs"] == amount(before + Decimal("3.25"))
        assert_exact_totals(conn, before + Decimal("3.25"))
        assert reconcile(conn)["in_sync"] is True


@pytest.fixture
def empty_db(make_db: Callable[..., str]) -> str:
    """A new, empty database (no bulk_sync schema)."""
    return make_db(template=None)


# --------------------------------------------------------------------------- upgrade


T0 = datetime(2024, 2, 1, tzinfo=UTC)
U1, U2, U3 = (str(uuid.UUID(int=n)) for n in (0xA1, 0xB2, 0xC3))
OLD_ACTIONS = [
    # action_id, user_id, lbs, verified, logged_at, created_at, metadata
    (str(uuid.UUID(int=0x1001)), U1, "10.200000", True, T0, T0 + timedelta(minutes=1), "{}"),
    (str(uuid.UUID(int=0x1002)), U1, "0.000001", True, T0 + timedelta(hours=1), T0, '{"a": 1}'),
    (str(uuid.UUID(int=0x1003)), U2, "999999.999999", True, T0, T0, "{}"),
    (str(uuid.UUID(int=0x1004)), U2, "5.500000", False, T0, T0, "{}"),
    (str(uuid.UUID(int=0x1005)), U3, "7.000000", False, T0, T0, '{"src": "old"}'),
]


def _old_stats() -> dict[str, tuple[str, int, datetime]]:
    stats: dict[str, tuple[Decimal, int, datetime]] = {}
    for _id, user, lbs, verified, at, _created, _meta in OLD_ACTIONS:
        if verified:
            total, count, last = stats.get(user, (Decimal(0), 0, at))
            stats[user] = (total + Decimal(lbs), count + 1, max(last, at))
    return {u: (amount(t), n, last) for u, (t, n, last) in stats.items()}


def test_upgrade_from_0001_keeps_every_row_and_total(empty_db: str) -> None:
    backend = open_backend(empty_db)
    try:
        migrations = read_migrations(str(MIGRATIONS_DIR))
        assert [m.id for m in migrations] == MIGRATION_IDS
        with backend.lock():
            backend.apply_migrations(
                backend.to_apply(migrations.filter(lambda m: m.id == "0001.core-schema"))
            )
        assert applied_ids(backend) == ["0001.core-schema"]
    finally:
        backend.connection.close()

    stats = _old_stats()
    expected_total = sum((Decimal(a[2]) for a in OLD_ACTIONS if a[3]), Decimal(0))
    with connect(empty_db) as conn:
        assert not column_exists(conn, "user_actions", "revoked")
        with conn.transaction():
            for row in OLD_ACTIONS:
                conn.execute(
                    "INSERT INTO bulk_sync.user_actions (action_id, user_id, emissions_saved_lbs,"
                    " verified, logged_at, created_at, metadata)"
                    " VALUES (%s, %s, %s, %s, %s, %s, %s)",
                    row,
                )
            for user, (total, count, last) in stats.items():
                conn.execute(
                    "INSERT INTO bulk_sync.user_stats (user_id, total_emissions_lbs, action_count,"
                    " last_action_at) VALUES (%s, %s, %s, %s)",
                    (user, total, count, last),
                )
            # The global total spread over two writer slots, as 0001's writers would leave it.
            conn.execute(
                "UPDATE bulk_sync._global_slots SET total_lbs = CASE slot WHEN 3 THEN %s"
                " WHEN 40 THEN %s ELSE 0 END",
                (expected_total - Decimal("10.2"), Decimal("10.2")),
            )
            conn.execute(
                "INSERT INTO bulk_sync.idempotency_keys (idempotency_key, request_sha256, response)"
                " VALUES ('old-key', '\\x00', '{\"success\": true}')"
            )
        actions_before = conn.execute(
            "SELECT action_id::text, user_id::text, emissions_saved_lbs::text, verified,"
            " logged_at, created_at, metadata FROM bulk_sync.user_actions ORDER BY 1"
        ).fetchall()
        stats_before = conn.execute(
            "SELECT user_id::text, total_emissions_lbs::text, action_count, last_action_at,"
            " last_updated FROM bulk_sync.user_stats ORDER BY 1"
        ).fetchall()

    result = migrate(empty_db)
    assert result["applied_migrations"] == MIGRATION_IDS[1:]

    with connect(empty_db) as conn:
        actions_after = conn.execute(
            "SELECT action_id::text, user_id::text, emissions_saved_lbs::text, verified,"
            " logged_at, created_at, metadata FROM bulk_sync.user_actions ORDER BY 1"
        ).fetchall()
        assert actions_after == actions_before
        assert (
            conn.execute(
                "SELECT user_id::text, total_emissions_lbs::text, action_count, last_action_at,"
                " last_updated FROM bulk_sync.user_stats ORDER BY 1"
            ).fetchall()
            == stats_before
        )
        # New columns defaulted: nothing revoked; verified_at back-filled for verified rows only.
        lifecycle = conn.execute(
            "SELECT action_id::text, revoked, revoked_at, verified_at IS NOT DISTINCT FROM"
            " CASE WHEN verified THEN created_at END FROM bulk_sync.user_actions ORDER BY 1"
        ).fetchall()
        assert lifecycle == [(a[0], False, None, True) for a in sorted(OLD_ACTIONS)]
        assert scalar(conn, "SELECT response FROM bulk_sync.idempotency_keys") == {"success": True}
        assert_exact_totals(conn, expected_total)
        result = reconcile(conn)
        assert result["in_sync"] is True
        assert result["user_stats_sum"] == amount(expected_total)
        assert scalar(conn, "SELECT count(*) FROM bulk_sync.emissions_corrections") == 0

        # The old unverified action is verified by a resubmission; the totals follow.
        old = OLD_ACTIONS[3]
        response = log_action(
            conn,
            {
                "action_id": old[0],
                "user_id": old[1],
                "lbs": old[2],
                "logged_at": old[4].isoformat(),
                "verified": True,
            },
        )
        assert response["status"] == "verified"
        assert_exact_totals(conn, expected_total + Decimal(old[2]))
        assert reconcile(conn)["in_sync"] is True


# --------------------------------------------------------------------------- rollback


def _event_counts(conn: psycopg.Connection) -> tuple[int, int]:
    """(events published, events still in the outbox)."""
    published = scalar(conn, "SELECT count(*) FROM bulk_sync.events")
    pending = scalar(conn, "SELECT (bulk_sync.status() ->> 'events_pending')::bigint")
    return int(published), int(pending)


def _check_after_rollback(
    conn: psycopg.Connection, migration_id: str, events_before: tuple[int, int]
) -> None:
    if migration_id == "0012.slot-spare-pages":
        assert scalar(
            conn, "SELECT reloptions FROM pg_class WHERE oid = 'bulk_sync._global_slots'::regclass"
        ) == ["fillfactor=20"]
    elif migration_id == "0011.checked-actions":
        assert scalar(conn, "SELECT to_regtype('bulk_sync._checked_action') IS NULL")
    elif migration_id == "0010.precount-claims":
        assert not relation_exists(conn, "bulk_sync._precount_claims")
    elif migration_id == "0009.event-batches":
        assert not column_exists(conn, "_event_outbox", "events")
        assert scalar(conn, "SELECT to_regtype('bulk_sync._user_event') IS NULL")
        # The events still stored typed were published, none lost, before their column went.
        published, pending = events_before
        assert pending > 0
        assert scalar(conn, "SELECT count(*) FROM bulk_sync._event_outbox") == 0
        assert scalar(conn, "SELECT count(*) FROM bulk_sync.events") == published + pending
    elif migration_id == "0008.user-delta":
        assert scalar(conn, "SELECT to_regtype('bulk_sync._user_delta') IS NULL")
        assert relation_exists(conn, "bulk_sync._load_rows")
    elif migration_id == "0007.shared-load":
        assert not relation_exists(conn, "bulk_sync._load_rows")
        assert not relation_exists(conn, "bulk_sync._loads")
        assert relation_exists(conn, "bulk_sync._definitions_state")
    elif migration_id == "0006.definitions-state":
        assert not relation_exists(conn, "bulk_sync._definitions_state")
        assert relation_exists(conn, "bulk_sync.user_stats_leaderboard")
    elif migration_id == "0005.leaderboard-key":
        # No rollback: 0001 creates the same column and index on a fresh install.
        assert column_exists(conn, "user_stats", "leaderboard_key")
        assert relation_exists(conn, "bulk_sync.user_stats_leaderboard")
    elif migration_id == "0004.roles":
        assert not scalar(
            conn, "SELECT has_schema_privilege('bulk_sync_reader', 'bulk_sync', 'USAGE')"
        )
        assert not scalar(
            conn,
            "SELECT has_function_privilege('bulk_sync_writer',"
            " 'bulk_sync.log_action(jsonb)', 'EXECUTE')",
        )
        assert relation_exists(conn, "bulk_sync.events")
    elif migration_id == "0003.events":
        assert not relation_exists(conn, "bulk_sync.events")
        assert not relation_exists(conn, "bulk_sync._event_outbox")
        assert not relation_exists(conn, "bulk_sync.event_id_seq")
        assert column_exists(conn, "user_actions", "revoked")
    elif migration_id == "0002.lifecycle":
        assert not column_exists(conn, "user_actions", "revoked")
        assert not column_exists(conn, "user_actions", "verified_at")
        assert not relation_exists(conn, "bulk_sync.action_transitions")
        assert relation_exists(conn, "bulk_sync.user_actions")
    elif migration_id == "0001.core-schema":
        assert not schema_exists(conn)
    else:
        raise AssertionError(f"no check for {migration_id}")


def test_rollback_every_migration_then_migrate_again(db_url: str) -> None:
    """From a used head database, roll back every migration one by one; then migrate again."""
    smoke(db_url)  # some data in every table the rollbacks drop
    backend = open_backend(db_url)
    try:
        migrations = read_migrations(str(MIGRATIONS_DIR))
        assert applied_ids(backend) == MIGRATION_IDS
        order = [m.id for m in backend.to_rollback(migrations)]
        assert order == MIGRATION_IDS[::-1]
        with connect(db_url) as conn:
            events_before = _event_counts(conn)
            for migration in backend.to_rollback(migrations):
                with backend.lock():
                    # rollback_migrations skips a migration it deems bad: the checks below
                    # prove that this one really was rolled back.
                    backend.rollback_migrations(
                        migrations.filter(lambda m, wanted=migration.id: m.id == wanted)
                    )
                remaining = applied_ids(backend)
                assert migration.id not in remaining
                assert remaining == MIGRATION_IDS[: MIGRATION_IDS.index(migration.id)]
                _check_after_rollback(conn, migration.id, events_before)
            assert applied_ids(backend) == []
            assert not schema_exists(conn)
            # Roles are cluster-wide: 0004's rollback leaves them for the other databases.
            assert scalar(
                conn, "SELECT count(*) FROM pg_roles WHERE rolname = ANY(%s)", (list(ROLES),)
            ) == len(ROLES)
    finally:
        backend.connection.close()

    result = migrate(db_url)
    assert result["applied_migrations"] == MIGRATION_IDS
    smoke(db_url)


# --------------------------------------------------------------------------- re-run, others


def test_second_migrate_is_a_noop(db_url: str) -> None:
    with connect(db_url) as conn:
        records = yoyo_records(conn)
        defs = definitions(conn)
        assert len(defs) > 30
    result = migrate(db_url)
    assert result["applied_migrations"] == []
    with connect(db_url) as conn:
        assert yoyo_records(conn) == records
        assert definitions(conn) == defs
    smoke(db_url)


def test_migrating_two_databases_of_one_cluster(make_db: Callable[..., str]) -> None:
    """The roles already exist (the template created them): both databases still install fully."""
    first, second = make_db(template=None), make_db(template=None)
    for url in (first, second):
        assert migrate(url)["applied_migrations"] == MIGRATION_IDS
    for url in (first, second):
        with connect(url) as conn:
            for role, function in (
                ("bulk_sync_writer", "bulk_sync.log_action(jsonb)"),
                ("bulk_sync_reader", "bulk_sync.leaderboard(integer, integer)"),
                ("bulk_sync_admin", "bulk_sync.reconcile(jsonb)"),
            ):
                assert scalar(
                    conn, "SELECT has_function_privilege(%s, %s, 'EXECUTE')", (role, function)
                ), (role, function)
            assert scalar(
                conn, "SELECT count(*) FROM pg_roles WHERE rolname = ANY(%s)", (list(ROLES),)
            ) == len(ROLES)
        smoke(url)


def test_concurrent_migrates_of_one_database(empty_db: str) -> None:
    """Two migrate() calls racing on an empty database: both succeed, everything installed once."""
    results: list[dict[str, Any]] = []
    errors: list[BaseException] = []
    start = threading.Barrier(2)

    def run() -> None:
        try:
            start.wait()
            results.append(migrate(empty_db))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    assert errors == []
    assert sorted(len(r["applied_migrations"]) for r in results) == [0, len(MIGRATION_IDS)]
    backend = open_backend(empty_db)
    try:
        assert applied_ids(backend) == MIGRATION_IDS
    finally:
        backend.connection.close()
    smoke(empty_db)


@pytest.fixture
def owner_role(admin_url: str) -> Iterator[str]:
    """A LOGIN role that is neither superuser nor CREATEROLE; dropped with its databases."""
    role = f"bs_owner_{uuid.uuid4().hex[:8]}"
    with connect(admin_url) as admin:
        admin.execute(sql.SQL("CREATE ROLE {} LOGIN").format(sql.Identifier(role)))
    yield role
    with connect(admin_url) as admin:
        owned = admin.execute(
            "SELECT datname FROM pg_database WHERE datdba = (SELECT oid FROM pg_roles"
            " WHERE rolname = %s)",
            (role,),
        ).fetchall()
        for (name,) in owned:
            admin.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )
        admin.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(role)))


def test_migrate_as_database_owner_without_superuser(
    owner_role: str, make_db: Callable[..., str]
) -> None:
    url = make_db(template=None, owner=owner_role)
    params = conninfo_to_dict(url)
    params["user"] = owner_role
    owner_url = make_conninfo(**params)
    with connect(owner_url) as conn:
        assert scalar(conn, "SELECT rolsuper FROM pg_roles WHERE rolname = current_user") is False
    assert migrate(owner_url)["applied_migrations"] == MIGRATION_IDS
    assert migrate(owner_url)["applied_migrations"] == []
    smoke(owner_url)
