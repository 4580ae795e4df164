"""Pytest fixtures: one throwaway PostgreSQL cluster per session, a migrated
template database, and a fresh database per test cloned from that template.

The cluster is pytest-postgresql's own PostgreSQLExecutor (pg_ctl under
mirakuru), pointed at tests/bin/pg_ctl, which runs the real pg_ctl as the
`postgres` OS user when the suite runs as root. Every test gets a real database
(`CREATE DATABASE ... TEMPLATE bulk_sync_template`) rather than a rolled-back
transaction, because NOTIFY only fires on commit.

Fixtures:
    pg_bin        (session)  Path of the PostgreSQL bin directory in use
    cluster       (session)  the running PostgreSQLExecutor (.host, .port, .logfile, ...)
    admin_url     (session)  superuser libpq URL of the `postgres` database
    cron_url      (session)  superuser libpq URL of `bulk_sync_cron` (cron.database_name)
    template_url  (session)  URL of `bulk_sync_template`: migrate() applied, pgtap installed
    make_db       (function) factory: make_db(template=..., owner=...) -> URL of a new database
    db_url        (function) URL of a fresh database cloned from the template
    connect       (function) factory: connect(url, autocommit=True) -> psycopg connection,
                             closed at teardown
    conn          (function) autocommit psycopg connection to db_url

While the cluster runs, PG* variables and DATABASE_URL are removed from the
environment, and BULK_SYNC_TEST_URL_TEMPLATE holds the cluster's URL with a
`{dbname}` placeholder. The server log is attached to every failed test's report.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import Callable, Generator, Iterator
from pathlib import Path
from typing import Any

import port_for
import psycopg
import pytest
from psycopg import sql
from pytest_postgresql.executors import PostgreSQLExecutor

REPO_ROOT = Path(__file__).resolve().parent.parent
PG_CTL_WRAPPER = REPO_ROOT / "tests" / "bin" / "pg_ctl"

HOST = "127.0.0.1"
SUPERUSER = "postgres"
TEMPLATE_DB = "bulk_sync_template"
CRON_DB = "bulk_sync_cron"

# Server settings for the throwaway cluster. pg_cron can only be preloaded at
# start; cron.database_name is the one database where CREATE EXTENSION pg_cron
# works. fsync=off is safe against killed backends and postmasters (fault
# tests), only an OS crash could lose data, and the cluster is disposable.
SERVER_SETTINGS = {
    "shared_preload_libraries": "pg_cron",
    "cron.database_name": CRON_DB,
    "max_connections": "200",
    "fsync": "off",
    "full_page_writes": "off",
}

# `scripts/test --coverage` sets this: plpgsql_check's profiler runs in every backend, and
# make_db hands each database's profile to tests/plpgsql_coverage.py before dropping it.
COVERAGE_DIR = os.environ.get("BULK_SYNC_PLPGSQL_COVERAGE_DIR")
if COVERAGE_DIR:
    SERVER_SETTINGS["shared_preload_libraries"] += ",plpgsql_check"
    SERVER_SETTINGS["plpgsql_check.profiler"] = "on"

# Where the session's server log is, for the failure report hook below.
_SERVER_LOG: dict[str, Path] = {}
_LOG_OFFSET = pytest.StashKey[int]()
_LOG_TAIL_LINES = 200


def connect(url: str, autocommit: bool = True, **kwargs: Any) -> psycopg.Connection:
    """Open a psycopg connection to a libpq URL (autocommit by default)."""
    return psycopg.connect(url, autocommit=autocommit, **kwargs)


def _url(port: int, dbname: str, user: str = SUPERUSER) -> str:
    return f"postgresql://{user}@{HOST}:{port}/{dbname}"


def find_pg_bin() -> Path:
    """$BULK_SYNC_PG_BIN, else the highest /usr/lib/postgresql/N/bin, else PATH."""
    configured = os.environ.get("BULK_SYNC_PG_BIN")
    if configured:
        path = Path(configured)
        if not (path / "pg_ctl").is_file():
            raise pytest.UsageError(f"BULK_SYNC_PG_BIN={configured} has no pg_ctl")
        return path
    versions = [
        p
        for p in Path("/usr/lib/postgresql").glob("*/bin")
        if p.parent.name.isdigit() and (p / "pg_ctl").is_file()
    ]
    if versions:
        return max(versions, key=lambda p: int(p.parent.name))
    for entry in os.environ.get("PATH", "").split(os.pathsep):
        candidate = Path(entry or ".") / "pg_ctl"
        if candidate.is_file() and candidate.resolve() != PG_CTL_WRAPPER.resolve():
            return candidate.resolve().parent
    raise pytest.UsageError(
        "No PostgreSQL server binaries (pg_ctl) found. Run scripts/test, which installs "
        "them on Debian (apt-get install postgresql-15), or set BULK_SYNC_PG_BIN."
    )


def _others_can_traverse(path: Path) -> bool:
    """True when a non-owner (the postgres OS user) can reach path."""
    return all(part.stat().st_mode & 0o001 for part in [path, *path.parents])


def _make_workdir() -> Path:
    """A fresh directory for the data dir, socket and log, usable by the server user."""
    base = Path(tempfile.gettempdir())
    root = os.geteuid() == 0
    if root and not _others_can_traverse(base):
        base = Path("/tmp")
    workdir = Path(tempfile.mkdtemp(prefix="bulk-sync-pg-", dir=base))
    os.chmod(workdir, 0o755)
    if root:
        shutil.chown(workdir, user=SUPERUSER, group=SUPERUSER)
    return workdir


# Stops the cluster and removes its directory if pytest dies without running
# fixture teardown (SIGTERM from `timeout`, SIGKILL, a crash).
_WATCHDOG_SCRIPT = r"""
while kill -0 "$1" 2>/dev/null; do sleep 1; done
"$2" stop -D "$3" -m immediate >/dev/null 2>&1 || true
rm -rf "$4"
"""


def _start_watchdog(datadir: str, workdir: Path) -> subprocess.Popen[bytes]:
    args = [str(os.getpid()), str(PG_CTL_WRAPPER), datadir, str(workdir)]
    return subprocess.Popen(
        ["bash", "-c", _WATCHDOG_SCRIPT, "bulk-sync-pg-watchdog", *args],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
        cwd="/",
    )


def _tail(path: Path, offset: int = 0, lines: int = _LOG_TAIL_LINES) -> str:
    try:
        with path.open("rb") as handle:
            handle.seek(offset)
            text = handle.read().decode("utf-8", "replace")
    except OSError as exc:
        return f"(cannot read {path}: {exc})"
    kept = text.splitlines()[-lines:]
    return "\n".join(kept)


def _log_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    log = _SERVER_LOG.get("path")
    item.stash[_LOG_OFFSET] = _log_size(log) if log else 0


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    log = _SERVER_LOG.get("path")
    if report.failed and log is not None:
        text = _tail(log, item.stash.get(_LOG_OFFSET, 0))
        title = f"PostgreSQL server log ({log}, this test, last {_LOG_TAIL_LINES} lines)"
        report.sections.append((title, text or "(nothing logged during this test)"))
    return report


@pytest.fixture(scope="session")
def pg_bin() -> Path:
    """The PostgreSQL bin directory the cluster runs from."""
    return find_pg_bin()


@pytest.fixture(scope="session")
def _pg_environ(pg_bin: Path) -> Iterator[pytest.MonkeyPatch]:
    """Keep the session away from any other server: drop PG* and DATABASE_URL.

    Every fixture passes explicit URLs; nothing falls back to libpq defaults.
    """
    with pytest.MonkeyPatch.context() as mp:
        for name in list(os.environ):
            if name.startswith("PG") or name == "DATABASE_URL":
                mp.delenv(name)
        # The pg_ctl wrapper picks the same binaries as pg_bin.
        mp.setenv("BULK_SYNC_PG_BIN", str(pg_bin))
        yield mp


@pytest.fixture(scope="session")
def cluster(_pg_environ: pytest.MonkeyPatch) -> Iterator[PostgreSQLExecutor]:
    """A private PostgreSQL cluster on a free port, torn down after the session."""
    if not os.access(PG_CTL_WRAPPER, os.X_OK):
        raise pytest.UsageError(f"{PG_CTL_WRAPPER} must be executable (git keeps mode 755)")
    workdir = _make_workdir()
    logfile = workdir / "postgresql.log"
    executor = PostgreSQLExecutor(
        executable=str(PG_CTL_WRAPPER),
        host=HOST,
        port=port_for.get_port(None),
        datadir=str(workdir / "data"),
        unixsocketdir=str(workdir),
        logfile=str(logfile),
        startparams="-w -t 120",
        dbname="postgres",
        user=SUPERUSER,
        timeout=120,
        postgres_options=" ".join(f"-c {k}={v}" for k, v in SERVER_SETTINGS.items()),
    )
    _SERVER_LOG["path"] = logfile
    watchdog = _start_watchdog(executor.datadir, workdir)
    try:
        try:
            executor.start()
        except Exception as exc:
            raise RuntimeError(
                f"PostgreSQL failed to start (pg_ctl wrapper {PG_CTL_WRAPPER}, "
                f"log {logfile}):\n{_tail(logfile)}"
            ) from exc
        # For subprocesses that need the cluster: str.format(dbname=...). No
        # PGHOST/PGPORT: a postgres started without -p (the runner's embedded
        # cluster) would take PGPORT as its own port.
        _pg_environ.setenv("BULK_SYNC_TEST_URL_TEMPLATE", _url(executor.port, "{dbname}"))
        with connect(_url(executor.port, "postgres")) as admin:
            admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(CRON_DB)))
        yield executor
    finally:
        try:
            if executor.running():
                executor.stop()
        finally:
            _SERVER_LOG.pop("path", None)
            shutil.rmtree(workdir, ignore_errors=True)
            watchdog.kill()
            watchdog.wait()


@pytest.fixture(scope="session")
def admin_url(cluster: PostgreSQLExecutor) -> str:
    """Superuser URL of the cluster's `postgres` database."""
    return _url(cluster.port, "postgres")


@pytest.fixture(scope="session")
def cron_url(cluster: PostgreSQLExecutor) -> str:
    """Superuser URL of the database named by cron.database_name (empty, no pg_cron yet)."""
    return _url(cluster.port, CRON_DB)


def _terminate_connections(admin: psycopg.Connection, dbname: str) -> None:
    admin.execute(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
        " WHERE datname = %s AND pid <> pg_backend_pid()",
        (dbname,),
    )


@pytest.fixture(scope="session")
def template_url(cluster: PostgreSQLExecutor, admin_url: str) -> str:
    """The migrated template database that every test database is cloned from."""
    from bulk_sync.migrate import migrate

    with connect(admin_url) as admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(TEMPLATE_DB)))
    url = _url(cluster.port, TEMPLATE_DB)
    migrate(url)
    with connect(url) as conn:
        conn.execute("CREATE EXTENSION IF NOT EXISTS pgtap")
    with connect(admin_url) as admin:
        # CREATE DATABASE ... TEMPLATE fails while anyone else is connected.
        _terminate_connections(admin, TEMPLATE_DB)
        admin.execute(
            sql.SQL("ALTER DATABASE {} WITH IS_TEMPLATE true").format(sql.Identifier(TEMPLATE_DB))
        )
    return url


def _db_name(node_name: str) -> str:
    stem = re.sub(r"[^a-z0-9]+", "_", node_name.lower()).strip("_")[:40]
    return f"t_{stem}_{uuid.uuid4().hex[:8]}"


@pytest.fixture
def make_db(
    request: pytest.FixtureRequest, cluster: PostgreSQLExecutor, admin_url: str
) -> Iterator[Callable[..., str]]:
    """Factory for extra databases, dropped (WITH FORCE) at teardown.

    make_db() clones bulk_sync_template; make_db(template=None) is an empty
    database (for testing migrate itself); owner= makes another role own it.
    """
    created: list[str] = []

    def factory(template: str | None = TEMPLATE_DB, owner: str | None = None) -> str:
        if template == TEMPLATE_DB:
            request.getfixturevalue("template_url")
        name = _db_name(request.node.name)
        stmt = sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name))
        if template is not None:
            stmt += sql.SQL(" TEMPLATE {}").format(sql.Identifier(template))
        if owner is not None:
            stmt += sql.SQL(" OWNER {}").format(sql.Identifier(owner))
        with connect(admin_url) as admin:
            admin.execute(stmt)
        created.append(name)
        return _url(cluster.port, name)

    yield factory

    if COVERAGE_DIR:
        from plpgsql_coverage import harvest

        harvest([_url(cluster.port, name) for name in created], Path(COVERAGE_DIR))
    with connect(admin_url) as admin:
        for name in reversed(created):
            admin.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )


@pytest.fixture
def db_url(make_db: Callable[..., str]) -> str:
    """A fresh database cloned from bulk_sync_template, dropped after the test."""
    return make_db()


@pytest.fixture(name="connect")
def _connect_fixture() -> Iterator[Callable[..., psycopg.Connection]]:
    """connect(url, autocommit=True, **kw): a connection closed at teardown."""
    opened: list[psycopg.Connection] = []

    def factory(url: str, autocommit: bool = True, **kwargs: Any) -> psycopg.Connection:
        conn = connect(url, autocommit=autocommit, **kwargs)
        opened.append(conn)
        return conn

    yield factory
    for conn in opened:
        conn.close()


@pytest.fixture
def conn(db_url: str, connect: Callable[..., psycopg.Connection]) -> psycopg.Connection:
    """An autocommit connection to the test's own database."""
    return connect(db_url)
