"""Crash recovery: `pg_ctl stop -m immediate` in the middle of a mixed load, six times.

The load: log_action writers, bulk_backfill batches, a `bulk-sync backfill` of a file (a
subprocess), verify/revoke, reconcile, and an event reader following events_since. Each
round stops the server at a different moment, without a shutdown checkpoint, so the restart
replays the WAL (crash recovery). After every restart:

- every write a client saw acknowledged is there, exactly;
- a write in flight at the stop is all there or not there at all (a single action, a
  bulk_backfill batch, each user's rows of the file: the file is applied in chunks of whole
  users);
- global total = SUM(user_stats) = SUM(counted actions), and every user's stats match;
- reconcile reports in_sync with nothing to fix;
- events: ids increase, none appears below what the reader already read (no gap a reader
  would skip), and each user's last event carries the user's current total (commit order);
- running the interrupted file backfill again completes it.

The cluster is this test's own (so the session's is never stopped), with fsync=on and
full_page_writes=on: an immediate stop is not an OS crash, so fsync=off would survive it
too, but the cluster is configured as production would be so that the recovery is real.
"""

from __future__ import annotations

import json
import random
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

import port_for
import psycopg
import pytest
from psycopg.types.json import Jsonb

from bulk_sync.migrate import migrate
from conftest import PG_CTL_WRAPPER, _make_workdir, _start_watchdog, _tail
from helpers import (
    action,
    amount,
    assert_exact_totals,
    cli_command,
    cli_env,
    logged_at,
    new_id,
    random_amount,
)

# Seconds of load before each stop: different moments, early to late in the file backfill.
STOP_AFTER = [0.35, 0.8, 1.3, 1.9, 2.6, 3.4]
SERVER_OPTIONS = {
    "listen_addresses": "127.0.0.1",
    "fsync": "on",
    "full_page_writes": "on",
    "synchronous_commit": "on",
    "max_connections": "40",
}
USERS = [new_id() for _ in range(25)]
# The file shares the writers' users and has many of its own, so that it is applied in many
# chunks (of about FILE_BATCH rows, whole users) and the stops land while it runs.
FILE_USERS = USERS + [new_id() for _ in range(375)]
FILE_ACTIONS = 20000
FILE_BATCH = 250


class Cluster:
    """A PostgreSQL cluster of this test's own, driven through tests/bin/pg_ctl."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.data = workdir / "data"
        self.log = workdir / "postgresql.log"
        self.port = port_for.get_port(None)
        self.url = f"postgresql://postgres@127.0.0.1:{self.port}/bulk_crash"

    def pg_ctl(self, *args: str) -> None:
        result = subprocess.run(
            [str(PG_CTL_WRAPPER), *args], capture_output=True, text=True, timeout=120
        )
        assert result.returncode == 0, (
            f"pg_ctl {args[0]} failed: {result.stderr}\n{_tail(self.log, lines=40)}"
        )

    def initdb(self) -> None:
        self.pg_ctl("initdb", "-D", str(self.data), "-o", "-A trust -U postgres")

    def start(self) -> None:
        options = " ".join(f"-c {k}={v}" for k, v in SERVER_OPTIONS.items())
        self.pg_ctl(
            "start", "-D", str(self.data), "-w", "-t", "120", "-l", str(self.log),
            "-o", f"-p {self.port} -k {self.workdir} {options}",
        )  # fmt: skip

    def crash(self) -> None:
        self.pg_ctl("stop", "-D", str(self.data), "-m", "immediate")

    def stop(self) -> None:
        self.pg_ctl("stop", "-D", str(self.data), "-m", "fast")


@pytest.fixture
def crash_cluster() -> Iterator[Cluster]:
    workdir = _make_workdir()
    cluster = Cluster(workdir)
    watchdog = _start_watchdog(str(cluster.data), workdir)
    try:
        cluster.initdb()
        cluster.start()
        with psycopg.connect(cluster.url.replace("/bulk_crash", "/postgres"), autocommit=True) as c:
            c.execute("CREATE DATABASE bulk_crash")
        migrate(cluster.url)
        yield cluster
    finally:
        try:
            if (cluster.data / "postmaster.pid").exists():
                cluster.stop()
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
            watchdog.kill()
            watchdog.wait()


# --------------------------------------------------------------------------- the client's view


@dataclass
class Ledger:
    """What the clients were told: acknowledged state, and what was in flight at the stop."""

    # action_id -> (user_id, lbs, verified, revoked), acknowledged
    acked: dict[str, tuple[str, str, bool, bool]] = field(default_factory=dict)
    # action_id -> the states it may be in (an in-flight verify or revoke: before or after)
    doubtful: dict[str, set[tuple[str, str, bool, bool]]] = field(default_factory=dict)
    # groups that must be all there or all absent: (actions, states if present)
    groups: list[list[tuple[str, tuple[str, str, bool, bool]]]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    in_flight_checked: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)


def _random_action(rng: random.Random, verified_share: float) -> dict[str, Any]:
    at = logged_at(rng.randrange(10**6))
    lbs = random_amount(rng)
    return action(new_id(), rng.choice(USERS), lbs, at, verified=rng.random() < verified_share)


def _state(request: dict[str, Any]) -> tuple[str, str, bool, bool]:
    return (request["user_id"], request["lbs"], bool(request["verified"]), False)


def _connection_lost(exc: BaseException, conn: psycopg.Connection | None) -> bool:
    return isinstance(exc, psycopg.OperationalError) or (conn is not None and conn.closed)


def _worker(url: str, ledger: Ledger, stop: threading.Event, body: Any) -> None:
    conn: psycopg.Connection | None = None
    try:
        conn = psycopg.connect(url, autocommit=True, connect_timeout=5)
        while not stop.is_set():
            body(conn)
    except psycopg.Error as exc:
        if not _connection_lost(exc, conn):
            with ledger.lock:
                ledger.errors.append(f"{body.__name__}: {type(exc).__name__}: {exc}")
    finally:
        if conn is not None:
            conn.close()


def _log_actions(ledger: Ledger, rng: random.Random) -> Any:
    def log_actions(conn: psycopg.Connection) -> None:
        request = _random_action(rng, 0.8)
        with ledger.lock:
            ledger.groups.append([(request["action_id"], _state(request))])
            group = len(ledger.groups) - 1
        response = conn.execute("SELECT bulk_sync.log_action(%s)", (Jsonb(request),)).fetchone()[0]
        assert response["status"] == "inserted", response
        with ledger.lock:
            ledger.acked[request["action_id"]] = _state(request)
            ledger.groups[group] = []

    return log_actions


def _bulk_batches(ledger: Ledger, rng: random.Random) -> Any:
    def bulk_batches(conn: psycopg.Connection) -> None:
        batch = [_random_action(rng, 0.7) for _ in range(rng.randrange(20, 300))]
        with ledger.lock:
            ledger.groups.append([(a["action_id"], _state(a)) for a in batch])
            group = len(ledger.groups) - 1
        response = conn.execute(
            "SELECT bulk_sync.bulk_backfill(%s)",
            (Jsonb({"actions": batch, "idempotency_key": new_id()}),),
        ).fetchone()[0]
        assert response["inserted_count"] == len(batch), response
        with ledger.lock:
            for a in batch:
                ledger.acked[a["action_id"]] = _state(a)
            ledger.groups[group] = []

    return bulk_batches


def _verify_revoke(ledger: Ledger, rng: random.Random) -> Any:
    def verify_revoke(conn: psycopg.Connection) -> None:
        with ledger.lock:
            candidates = [k for k, v in ledger.acked.items() if not v[3]]
        if not candidates:
            time.sleep(0.01)
            return
        action_id = rng.choice(candidates)
        with ledger.lock:
            before = ledger.acked.pop(action_id)
            user, lbs, verified, _revoked = before
            revoke = (verified and rng.random() < 0.5) or rng.random() < 0.1
            after = (user, lbs, verified, True) if revoke else (user, lbs, True, False)
            ledger.doubtful[action_id] = {before, after}
        if revoke:
            response = conn.execute(
                "SELECT bulk_sync.revoke_action(%s, 'crash test', 'crash')", (action_id,)
            ).fetchone()[0]
            assert response["status"] == "revoked", response
        else:
            response = conn.execute(
                "SELECT bulk_sync.verify_action(%s, 'crash')", (action_id,)
            ).fetchone()[0]
            assert response["status"] in ("verified", "already_verified"), response
        with ledger.lock:
            del ledger.doubtful[action_id]
            ledger.acked[action_id] = after

    return verify_revoke


def _reconciles(ledger: Ledger) -> Any:
    def reconciles(conn: psycopg.Connection) -> None:
        result = conn.execute("SELECT bulk_sync.reconcile()").fetchone()[0]
        if not (result["in_sync"] and result["correction_id"] is None):
            with ledger.lock:
                ledger.errors.append(f"reconcile under load found drift: {result}")
        time.sleep(0.1)

    return reconciles


@dataclass
class Reader:
    """Follows events_since like a client: the ids it read, in order."""

    seen: list[int] = field(default_factory=list)

    def follow(self, url: str, ledger: Ledger, stop: threading.Event) -> None:
        def read_events(conn: psycopg.Connection) -> None:
            after = self.seen[-1] if self.seen else 0
            page = conn.execute(
                "SELECT event_id FROM bulk_sync.events_since(%s, 500)", (after,)
            ).fetchall()
            for (event_id,) in page:
                if self.seen and event_id <= self.seen[-1]:
                    with ledger.lock:
                        ledger.errors.append(f"event {event_id} after {self.seen[-1]}")
                self.seen.append(int(event_id))
            if not page:
                time.sleep(0.05)

        _worker(url, ledger, stop, read_events)


# --------------------------------------------------------------------------- the checks


def _rows(conn: psycopg.Connection) -> dict[str, tuple[str, str, bool, bool]]:
    return {
        row[0]: (row[1], row[2], row[3], row[4])
        for row in conn.execute(
            "SELECT action_id::text, user_id::text, emissions_saved_lbs::text, verified, revoked"
            " FROM bulk_sync.user_actions"
        ).fetchall()
    }


def _check_after_restart(
    conn: psycopg.Connection,
    ledger: Ledger,
    file_groups: list[list[tuple[str, tuple[str, str, bool, bool]]]],
    file_acked: bool,
    reader: Reader,
    round_no: int,
) -> None:
    rows = _rows(conn)
    where = f"round {round_no}"
    missing = [k for k, v in ledger.acked.items() if rows.get(k) != v]
    assert missing == [], f"{where}: acknowledged writes lost or changed: {missing[:5]}"
    for action_id, states in ledger.doubtful.items():
        assert rows.get(action_id) in states, f"{where}: {action_id} is {rows.get(action_id)}"
    ledger.in_flight_checked += len(ledger.doubtful) + sum(1 for g in ledger.groups if g)
    for group in [*ledger.groups, *file_groups]:
        present = [rows.get(action_id) == state for action_id, state in group]
        assert all(present) or not any(a in rows for a, _ in group), (
            f"{where}: a transaction is half there: {sum(present)} of {len(group)}"
        )
    if file_acked:
        assert all(rows.get(a) == s for g in file_groups for a, s in g), f"{where}: file"
    known = set(ledger.acked) | set(ledger.doubtful)
    known |= {a for group in [*ledger.groups, *file_groups] for a, _ in group}
    assert set(rows) <= known, f"{where}: rows nobody wrote: {sorted(set(rows) - known)[:5]}"

    assert_exact_totals(conn)
    dry = conn.execute("SELECT bulk_sync.reconcile('{\"auto_correct\": false}')").fetchone()[0]
    assert dry["in_sync"] is True, f"{where}: {dry}"
    assert dry["users_out_of_sync"] == 0
    result = conn.execute("SELECT bulk_sync.reconcile()").fetchone()[0]
    assert (result["in_sync"], result["fixed"], result["correction_id"]) == (True, False, None)
    assert conn.execute("SELECT count(*) FROM bulk_sync.emissions_corrections").fetchone()[0] == 0

    # Events: publish what the outbox holds, then read everything from the start.
    conn.execute("SELECT bulk_sync.publish_events(1000000, true)")
    events = conn.execute(
        "SELECT event_id, payload FROM bulk_sync.events ORDER BY event_id"
    ).fetchall()
    ids = [int(e[0]) for e in events]
    assert ids == sorted(set(ids))
    watermark = reader.seen[-1] if reader.seen else 0
    skipped = sorted({i for i in ids if i <= watermark} - set(reader.seen))
    assert skipped == [], f"{where}: events appeared below the reader's position: {skipped[:5]}"
    last_total: dict[str, str] = {}
    for _event_id, payload in events:
        if payload.get("user_id") and payload.get("user_total_lbs") is not None:
            last_total[payload["user_id"]] = payload["user_total_lbs"]
    stats = dict(
        conn.execute(
            "SELECT user_id::text, total_emissions_lbs::text FROM bulk_sync.user_stats"
        ).fetchall()
    )
    wrong = {u: (t, stats.get(u, amount(Decimal(0)))) for u, t in last_total.items()}
    wrong = {u: pair for u, pair in wrong.items() if pair[0] != pair[1]}
    assert wrong == {}, f"{where}: a user's last event is not the user's total: {wrong}"

    # Resolve what was in flight, so that the next round starts from exact knowledge.
    for action_id in list(ledger.doubtful):
        ledger.acked[action_id] = rows[action_id]
    ledger.doubtful.clear()
    for group in [*ledger.groups, *file_groups]:
        for action_id in (a for a, _ in group):
            if action_id in rows:
                ledger.acked[action_id] = rows[action_id]
    ledger.groups.clear()


def _file(path: Path, rng: random.Random) -> list[list[tuple[str, tuple[str, str, bool, bool]]]]:
    """The file, and its all-or-nothing groups: each user's rows (chunks are whole users)."""
    actions = [
        action(
            new_id(),
            rng.choice(FILE_USERS),
            random_amount(rng),
            logged_at(rng.randrange(10**6)),
            verified=rng.random() < 0.75,
        )
        for _ in range(FILE_ACTIONS)
    ]
    path.write_text("".join(json.dumps(a) + "\n" for a in actions), encoding="utf-8")
    by_user: dict[str, list[tuple[str, tuple[str, str, bool, bool]]]] = {}
    for a in actions:
        by_user.setdefault(a["user_id"], []).append((a["action_id"], _state(a)))
    return list(by_user.values())


def test_immediate_shutdown_under_load_loses_nothing_acknowledged(
    crash_cluster: Cluster, tmp_path: Path
) -> None:
    ledger = Ledger()
    reader = Reader()
    files_interrupted = 0
    rng = random.Random(20261202)
    for round_no, stop_after in enumerate(STOP_AFTER, start=1):
        file = tmp_path / f"round-{round_no}.ndjson"
        file_groups = _file(file, rng)
        command = cli_command(
            crash_cluster.url, "backfill", str(file), "--batch-size", str(FILE_BATCH),
            "--idempotency-key", f"crash-{round_no}",
        )  # fmt: skip
        stop = threading.Event()
        bodies = [
            _log_actions(ledger, random.Random(rng.random())),
            _log_actions(ledger, random.Random(rng.random())),
            _bulk_batches(ledger, random.Random(rng.random())),
            _verify_revoke(ledger, random.Random(rng.random())),
            _reconciles(ledger),
        ]
        threads = [
            threading.Thread(target=_worker, args=(crash_cluster.url, ledger, stop, body))
            for body in bodies
        ]
        threads.append(
            threading.Thread(target=reader.follow, args=(crash_cluster.url, ledger, stop))
        )
        for thread in threads:
            thread.start()
        time.sleep(stop_after / 3)  # the file starts a little later than the others
        cli = subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=cli_env()
        )
        time.sleep(stop_after * 2 / 3)
        crash_cluster.crash()
        stop.set()
        for thread in threads:
            thread.join(timeout=60)
            assert not thread.is_alive()
        _out, err = cli.communicate(timeout=60)
        file_acked = cli.returncode == 0
        files_interrupted += not file_acked
        if not file_acked:
            assert cli.returncode == 3, err  # a lost connection is a database error
        assert ledger.errors == [], ledger.errors

        crash_cluster.start()
        with psycopg.connect(crash_cluster.url, autocommit=True) as conn:
            _check_after_restart(conn, ledger, file_groups, file_acked, reader, round_no)
        # The interrupted file: the same command again completes it (replaying what committed).
        rerun = subprocess.run(command, capture_output=True, text=True, env=cli_env(), timeout=120)
        assert rerun.returncode == 0, rerun.stderr
        with psycopg.connect(crash_cluster.url, autocommit=True) as conn:
            rows = _rows(conn)
            assert all(rows.get(a) == s for g in file_groups for a, s in g)
            for group in file_groups:
                for action_id, state in group:
                    ledger.acked.setdefault(action_id, state)
            assert_exact_totals(conn)
    # The stops did land in the middle of things, or the checks above prove little.
    assert files_interrupted >= 3, files_interrupted
    assert ledger.in_flight_checked >= 5, ledger.in_flight_checked
    assert len(reader.seen) > 100, len(reader.seen)
    assert len(ledger.acked) > 5000, len(ledger.acked)
