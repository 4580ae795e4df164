"""Runs every pgTAP file in tests/pgtap with pg_prove, one test per file.

Each file gets its own database cloned from the migrated template (which has
the pgtap extension), so a file may COMMIT, LISTEN or leave state behind
without affecting the others.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
from pytest_postgresql.executors import PostgreSQLExecutor

PGTAP_DIR = Path(__file__).resolve().parent / "pgtap"
PGTAP_FILES = sorted(PGTAP_DIR.glob("*.sql"))
PG_PROVE_TIMEOUT = 900  # seconds; a hung file fails instead of stalling CI


@pytest.mark.parametrize(
    "sql_file",
    # An empty parametrize would be a silent skip: a missing suite must fail.
    PGTAP_FILES or [None],
    ids=[f.name for f in PGTAP_FILES] or ["no-pgtap-files"],
)
def test_pgtap(
    sql_file: Path | None, db_url: str, cluster: PostgreSQLExecutor, pg_bin: Path
) -> None:
    if sql_file is None:
        pytest.fail(f"no pgTAP files in {PGTAP_DIR}")
    pg_prove = shutil.which("pg_prove")
    if pg_prove is None:
        pytest.fail(
            "pg_prove not found (Debian: libtap-parser-sourcehandler-pgtap-perl); run scripts/test"
        )
    dbname = db_url.rsplit("/", 1)[1]
    command = [
        pg_prove,
        "--verbose",
        "--failures",
        "--psql-bin", str(pg_bin / "psql"),
        "-d", dbname,
        "-h", cluster.host,
        "-p", str(cluster.port),
        "-U", "postgres",
        str(sql_file),
    ]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    result = subprocess.run(
        command,
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=PG_PROVE_TIMEOUT,
    )
    assert result.returncode == 0, (
        f"pg_prove exited {result.returncode} for {sql_file.name}\n"
        f"$ {' '.join(command)}\n"
        f"--- stdout ---\n{result.stdout}\n--- stderr ---\n{result.stderr}"
    )
