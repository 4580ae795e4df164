"""The embedded default database: a private PostgreSQL cluster the runner manages itself.

Used when neither ``--database-url`` nor ``DATABASE_URL`` is given. Layout under the base
directory (``BULK_SYNC_HOME``; else ``/var/lib/bulk-sync`` for root; else
``${XDG_DATA_HOME:-~/.local/share}/bulk-sync``)::

    data/           PGDATA
    run/            the unix socket directory (mode 0700: only its owner and root connect)
    postgres.log    the server log

The server listens on no TCP address, only on the socket in ``run/``. PostgreSQL refuses
to run as root, so when the runner is root the cluster belongs to the ``postgres`` OS user
and ``initdb``/``pg_ctl`` run through ``runuser -u postgres --``.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import pwd
import shutil
import subprocess
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from urllib.parse import quote

import psycopg

from bulk_sync.errors import CliError

DATABASE = "bulk_sync"
SUPERUSER = "postgres"
PORT = 5432
OS_USER_WHEN_ROOT = "postgres"
MIN_MAJOR = 15
_SOCKET_PATH_MAX = 103  # sun_path is 108 bytes on Linux, 104 on the BSDs

_NO_BINARIES = (
    "no PostgreSQL server binaries (initdb, pg_ctl) found for the embedded default "
    "database; install them (Debian/Ubuntu: `apt-get install postgresql-15`), or set "
    "BULK_SYNC_PG_BIN to their directory, or pass --database-url / set DATABASE_URL"
)


class EmbeddedError(CliError):
    """The embedded cluster could not be found, created or started (exit code 3)."""

    def __init__(self, message: str) -> None:
        super().__init__(message, exit_code=3)


# --------------------------------------------------------------------------- locations


def home() -> Path:
    """The base directory of the embedded cluster."""
    configured = os.environ.get("BULK_SYNC_HOME")
    if configured:
        return Path(configured).expanduser().absolute()
    if os.geteuid() == 0:
        return Path("/var/lib/bulk-sync")
    data_home = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(data_home).expanduser().absolute() / "bulk-sync"


def data_dir() -> Path:
    return home() / "data"


def run_dir() -> Path:
    return home() / "run"


def log_file() -> Path:
    return home() / "postgres.log"


def url() -> str:
    """The connection URL of the embedded cluster (whether or not it is running)."""
    host = quote(str(run_dir()), safe="/")
    return f"postgresql://{SUPERUSER}@/{DATABASE}?host={host}&port={PORT}"


def _admin_conninfo() -> dict[str, str | int]:
    return {"host": str(run_dir()), "port": PORT, "user": SUPERUSER, "dbname": "postgres"}


# --------------------------------------------------------------------------- binaries


def _has_tools(directory: Path) -> bool:
    return (directory / "initdb").is_file() and (directory / "pg_ctl").is_file()


def _debian_bindirs() -> list[tuple[int, Path]]:
    found = []
    root = Path("/usr/lib/postgresql")
    if root.is_dir():
        for entry in root.iterdir():
            if entry.name.isdigit() and int(entry.name) >= MIN_MAJOR:
                found.append((int(entry.name), entry / "bin"))
    return sorted(found, reverse=True)


def bin_dir() -> Path:
    """The directory holding initdb and pg_ctl.

    ``BULK_SYNC_PG_BIN``; else the binaries matching an existing cluster's version; else
    the highest ``/usr/lib/postgresql/<N>/bin`` (N >= 15); else ``pg_config --bindir``;
    else the directory of ``initdb`` on ``PATH``.
    """
    configured = os.environ.get("BULK_SYNC_PG_BIN")
    if configured:
        directory = Path(configured).expanduser()
        if not _has_tools(directory):
            raise EmbeddedError(f"BULK_SYNC_PG_BIN={configured} does not contain initdb and pg_ctl")
        return directory

    debian = [(major, d) for major, d in _debian_bindirs() if _has_tools(d)]
    version_file = data_dir() / "PG_VERSION"
    with contextlib.suppress(OSError, ValueError):
        existing = int(version_file.read_text().strip())
        for major, directory in debian:
            if major == existing:
                return directory
    if debian:
        return debian[0][1]

    pg_config = shutil.which("pg_config")
    if pg_config:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            out = subprocess.run(
                [pg_config, "--bindir"], capture_output=True, text=True, check=True
            ).stdout.strip()
            if out and _has_tools(Path(out)):
                return Path(out)

    initdb = shutil.which("initdb")
    if initdb and _has_tools(Path(initdb).parent):
        return Path(initdb).parent
    raise EmbeddedError(_NO_BINARIES)


# --------------------------------------------------------------------------- running tools


def _as_root() -> bool:
    return os.geteuid() == 0


def _os_user() -> pwd.struct_passwd | None:
    """The OS user owning the cluster when we are root (None when we are not root)."""
    if not _as_root():
        return None
    try:
        return pwd.getpwnam(OS_USER_WHEN_ROOT)
    except KeyError:
        raise EmbeddedError(
            "PostgreSQL cannot run as root and there is no `postgres` OS user to run the "
            "embedded database; create one (it comes with the postgresql package), run "
            "bulk-sync as an ordinary user, or pass --database-url"
        ) from None


def _command(args: Sequence[str]) -> list[str]:
    if _as_root():
        runuser = shutil.which("runuser") or "/sbin/runuser"
        return [runuser, "-u", OS_USER_WHEN_ROOT, "--", *args]
    return list(args)


def _run(args: Sequence[str], *, check: bool = True) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env["LC_ALL"] = "C"
    try:
        done = subprocess.run(
            _command(args),
            capture_output=True,
            text=True,
            env=env,
            cwd=str(home()),
            stdin=subprocess.DEVNULL,
            check=False,
        )
    except OSError as exc:
        raise EmbeddedError(f"cannot run {args[0]}: {exc}") from exc
    if check and done.returncode != 0:
        output = (done.stderr or done.stdout).strip().splitlines()
        tail = output[-1] if output else f"exit code {done.returncode}"
        raise EmbeddedError(f"{Path(args[0]).name} failed: {tail}{_log_hint()}")
    return done


def _log_hint() -> str:
    with contextlib.suppress(OSError):
        lines = [line for line in log_file().read_text().splitlines() if line.strip()]
        if lines:
            return f" (last line of {log_file()}: {lines[-1].strip()})"
    return ""


# --------------------------------------------------------------------------- lifecycle


@contextlib.contextmanager
def _lock() -> Iterator[None]:
    """Serialise concurrent runners creating or starting the same cluster."""
    with open(home() / ".lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _ensure_base() -> None:
    base = home()
    if base.is_dir():
        return
    owner = _os_user()
    try:
        base.mkdir(parents=True, exist_ok=True, mode=0o755)
        if owner is not None:
            os.chown(base, owner.pw_uid, owner.pw_gid)
    except OSError as exc:
        raise EmbeddedError(
            f"cannot create the embedded database directory {base}: {exc}; "
            "set BULK_SYNC_HOME to a writable directory or pass --database-url"
        ) from exc


def _prepare_dirs() -> None:
    """Create data/, run/ and postgres.log, owned by the server's OS user."""
    base = home()
    owner = _os_user()
    try:
        for directory in (data_dir(), run_dir()):
            directory.mkdir(exist_ok=True, mode=0o700)
            directory.chmod(0o700)
        log_file().touch(exist_ok=True)
        if owner is not None:
            for path in (data_dir(), run_dir(), log_file()):
                os.chown(path, owner.pw_uid, owner.pw_gid)
    except OSError as exc:
        raise EmbeddedError(
            f"cannot prepare the embedded database directory {base}: {exc}; "
            "set BULK_SYNC_HOME to a writable directory or pass --database-url"
        ) from exc
    if owner is not None:
        reach = _run(["test", "-w", str(data_dir()), "-a", "-w", str(run_dir())], check=False)
        if reach.returncode != 0:
            raise EmbeddedError(
                f"the `postgres` OS user cannot reach {base} (a parent directory is not "
                "searchable by it); set BULK_SYNC_HOME to a directory it can reach, "
                "e.g. under /var/lib or /tmp"
            )
    socket = run_dir() / f".s.PGSQL.{PORT}"
    if len(str(socket)) > _SOCKET_PATH_MAX:
        raise EmbeddedError(
            f"the socket path {socket} is too long for a unix socket; "
            "set BULK_SYNC_HOME to a shorter directory"
        )


def _initialised() -> bool:
    return (data_dir() / "PG_VERSION").is_file()


def _initdb(bindir: Path) -> None:
    _run(
        [
            str(bindir / "initdb"),
            "-D",
            str(data_dir()),
            "-U",
            SUPERUSER,
            "--auth-local=trust",
            "--auth-host=reject",
            "-E",
            "UTF8",
            "--locale=C",
        ]
    )
    settings = (
        "\n# bulk-sync embedded default: unix socket only, reachable by its owner and root\n"
        "listen_addresses = ''\n"
        f"port = {PORT}\n"
        f"unix_socket_directories = '{_conf_quote(str(run_dir()))}'\n"
        "unix_socket_permissions = 0700\n"
    )
    with open(data_dir() / "postgresql.conf", "a", encoding="utf-8") as conf:
        conf.write(settings)


def _conf_quote(value: str) -> str:
    return value.replace("\\", "\\\\").replace("'", "''")


def is_running() -> bool:
    """Whether the embedded cluster's postmaster is running (``pg_ctl status``)."""
    if not _initialised():
        return False
    done = _run([str(bin_dir() / "pg_ctl"), "status", "-D", str(data_dir())], check=False)
    return done.returncode == 0


def _start(bindir: Path) -> None:
    _run(
        [
            str(bindir / "pg_ctl"),
            "start",
            "-w",
            "-t",
            "60",
            "-D",
            str(data_dir()),
            "-l",
            str(log_file()),
        ]
    )


def _create_database() -> None:
    try:
        with psycopg.connect(**_admin_conninfo(), autocommit=True) as conn:
            exists = conn.execute(
                "SELECT 1 FROM pg_catalog.pg_database WHERE datname = %s", (DATABASE,)
            ).fetchone()
            if not exists:
                with contextlib.suppress(psycopg.errors.DuplicateDatabase):
                    conn.execute(f'CREATE DATABASE "{DATABASE}"')
    except psycopg.Error as exc:
        raise EmbeddedError(
            f"the embedded database started but cannot be reached: {exc}{_log_hint()}"
        ) from exc


def _note(message: str) -> None:
    print(f"bulk-sync: {message}", file=sys.stderr, flush=True)


def ensure_running() -> str:
    """Create the cluster if needed, start it if stopped, and return its URL."""
    base = home()
    bindir = bin_dir()
    _ensure_base()
    with _lock():
        if not _initialised():
            _prepare_dirs()
            _note(f"creating the embedded PostgreSQL database in {base}")
            _initdb(bindir)
        if not is_running():
            _prepare_dirs()  # the socket directory may have been removed (tmpfs, cleanup)
            _note(f"starting the embedded PostgreSQL server in {base} (`bulk-sync db stop`)")
            _start(bindir)
        _create_database()
    return url()


def stop() -> bool:
    """Stop the embedded cluster; return whether it was running."""
    if not home().exists() or not _initialised():
        return False
    with _lock():
        if not is_running():
            return False
        _run([str(bin_dir() / "pg_ctl"), "stop", "-w", "-m", "fast", "-D", str(data_dir())])
    return True
