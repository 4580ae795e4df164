"""Faults: a backend terminated mid-batch, a runner SIGKILLed mid-file.

Both kill a real process in the middle of a write and prove that what is
visible afterwards is all-or-nothing per transaction, that the totals stay
exact, and that simply running the same thing again completes the job.
"""

from __future__ import annotations

import csv
import json
import os
import random
import signal
import subprocess
import threading
import time
from collections import Counter
from decimal import Decimal
from pathlib import Path
from typing import Any

import psycopg

from helpers import (
    action,
    amount,
    assert_exact_totals,
    bulk_backfill,
    cli_command,
    cli_env,
    connect,
    decimal_sum,
    logged_at,
    new_id,
    random_amount,
    reconcile,
    wait_for,
)

BIG_BATCH = 40_000
VICTIM_APP = "bulk-sync-fault-victim"


def _batch_count(conn: psycopg.Connection, action_ids: list[str]) -> int:
    return conn.execute(
        "SELECT count(*) FROM bulk_sync.user_actions WHERE action_id = ANY(%s::uuid[])",
        (action_ids,),
    ).fetchone()[0]


def test_backend_terminated_during_bulk_backfill(db_url: str) -> None:
    """pg_terminate_backend on a 40,000-action bulk_backfill: all or nothing; a rerun completes."""
    rng = random.Random(11)
    users = [new_id() for _ in range(2_000)]
    batch = [
        action(new_id(), rng.choice(users), random_amount(rng), logged_at(i), rng.random() < 0.9)
        for i in range(BIG_BATCH)
    ]
    ids = [a["action_id"] for a in batch]
    expected = decimal_sum(Decimal(a["lbs"]) for a in batch if a["verified"])
    key = "fault-terminate-1"

    with connect(db_url) as admin:
        # Something already counted, so that "nothing" is not the trivial zero.
        before = [action(new_id(), users[0], Decimal("12.345678"), logged_at(0))]
        bulk_backfill(admin, before)
        base = Decimal("12.345678")

        outcome: dict[str, Any] = {}

        def victim() -> None:
            try:
                with connect(db_url, application_name=VICTIM_APP) as conn:
                    outcome["pid"] = conn.info.backend_pid
                    outcome["response"] = bulk_backfill(conn, batch, key)
            except psycopg.Error as exc:
                outcome["error"] = exc

        thread = threading.Thread(target=victim)
        thread.start()
        pid = wait_for(
            lambda: admin.execute(
                "SELECT pid FROM pg_stat_activity WHERE application_name = %s"
                " AND state = 'active' AND query LIKE '%%bulk_backfill%%'",
                (VICTIM_APP,),
            ).fetchone(),
            timeout=30,
            interval=0.005,
            what="the bulk_backfill to be running",
        )[0]
        time.sleep(0.05)  # well inside a call that takes far longer than this
        assert admin.execute("SELECT pg_terminate_backend(%s)", (pid,)).fetchone()[0] is True
        thread.join(timeout=60)
        assert not thread.is_alive()
        wait_for(
            lambda: (
                not admin.execute(
                    "SELECT 1 FROM pg_stat_activity WHERE pid = %s", (pid,)
                ).fetchone()
            ),
            timeout=30,
            what="the terminated backend to exit",
        )

        visible = _batch_count(admin, ids)
        assert visible in (0, BIG_BATCH), f"{visible} of {BIG_BATCH} actions visible"
        if "error" in outcome:
            # The client saw the termination: nothing of the batch may be visible.
            assert visible == 0
            assert isinstance(outcome["error"], psycopg.OperationalError), outcome["error"]
            assert_exact_totals(admin, base)
        else:
            assert_exact_totals(admin, base + expected)
        print(f"terminated: {'error' in outcome}, visible after termination: {visible}")

        # Rerun the same batch with the same key: it completes (or replays) with exact totals.
        rerun = bulk_backfill(admin, batch, key)
        assert rerun["success"] is True
        assert _batch_count(admin, ids) == BIG_BATCH
        assert rerun["global_total_lbs"] == amount(base + expected)
        if "error" in outcome:
            assert rerun["replayed"] is False
            assert rerun["inserted_count"] == BIG_BATCH
        assert_exact_totals(admin, base + expected)
        assert reconcile(admin)["in_sync"] is True


CSV_ROWS = 100_000
CSV_BATCH = 5_000


def _write_csv(path: Path, rng: random.Random) -> Decimal:
    """~100,000 rows for 5,000 users; returns the Decimal sum of the verified rows."""
    users = [new_id() for _ in range(5_000)]
    total = Decimal(0)
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["action_id", "user_id", "lbs", "logged_at", "verified"])
        for i in range(CSV_ROWS):
            lbs = random_amount(rng)
            verified = rng.random() < 0.8
            if verified:
                total += lbs
            writer.writerow(
                [new_id(), rng.choice(users), amount(lbs), logged_at(i), str(verified).lower()]
            )
    return total


def test_runner_sigkilled_mid_file_then_rerun(db_url: str, tmp_path: Path) -> None:
    """`bulk-sync backfill` SIGKILLed between batches; the rerun completes with exact totals."""
    path = tmp_path / "actions.csv"
    expected = _write_csv(path, random.Random(5))
    command = cli_command(
        db_url, "backfill", str(path), "--batch-size", str(CSV_BATCH), "--format", "csv"
    )

    with connect(db_url) as conn:

        def loaded() -> int:
            return conn.execute("SELECT count(*) FROM bulk_sync.user_actions").fetchone()[0]

        proc = subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=cli_env()
        )
        try:
            # Kill once a few batches are in: well before the end of a 20-batch file.
            in_before_kill = wait_for(
                lambda: (n := loaded()) >= 2 * CSV_BATCH and n,
                timeout=120,
                interval=0.01,
                what="some batches to be committed",
            )
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        assert proc.returncode == -signal.SIGKILL
        # Its backend goes away on its own (the socket closed): wait, then count what stayed.
        wait_for(
            lambda: (
                not conn.execute(
                    "SELECT 1 FROM pg_stat_activity WHERE datname = current_database()"
                    " AND pid <> pg_backend_pid() AND backend_type = 'client backend'"
                ).fetchone()
            ),
            timeout=30,
            what="the killed runner's backend to exit",
        )
        committed = loaded()
        assert in_before_kill <= committed < CSV_ROWS
        # Chunks are whole users: each user of the file is either all there or not at all.
        with path.open(newline="") as handle:
            in_file = Counter(row["user_id"] for row in csv.DictReader(handle))
        stored = dict(
            conn.execute(
                "SELECT user_id::text, count(*) FROM bulk_sync.user_actions GROUP BY 1"
            ).fetchall()
        )
        half = {u: (n, in_file[u]) for u, n in stored.items() if n != in_file[u]}
        assert not half, f"users half-applied (stored, in file): {half}"
        assert_exact_totals(conn)

        rerun = subprocess.run(
            command, capture_output=True, text=True, env=cli_env(), timeout=300, check=False
        )
        assert rerun.returncode == 0, rerun.stderr
        summary: dict[str, Any] = json.loads(rerun.stdout, parse_float=Decimal)
        assert summary["rows"] == CSV_ROWS
        assert summary["inserted_count"] == CSV_ROWS - committed
        assert summary["skipped_count"] == committed
        assert summary["global_total_lbs"] == amount(expected)

        assert loaded() == CSV_ROWS
        assert_exact_totals(conn, expected)
        assert reconcile(conn)["in_sync"] is True
