"""Events and notifications (contract §3.7): what a reader and a listener can rely on.

- events_since: a reader resuming from its last id misses nothing and sees nothing twice,
  even when writers commit out of order;
- NOTIFY happens in the publisher, never in a writer's transaction; a bulk call wakes
  listeners a bounded number of times;
- with `bulk-sync worker` running, a listener hears about a commit within 1 second; a
  standby worker takes over when the active one is killed;
- `bulk-sync listen --after N` prints each event once across a kill and a restart.
"""

from __future__ import annotations

import json
import os
import queue
import random
import signal
import threading
import time
from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import psycopg
import pytest

from helpers import (
    LEADERBOARD_CHANNEL,
    LineReader,
    action,
    all_events,
    amount,
    bulk_backfill,
    connect,
    decimal_sum,
    drain_notifies,
    log_action,
    logged_at,
    new_id,
    random_amount,
    start_cli,
    stop_process,
    wait_for,
)

NOTIFY_DEADLINE_S = 1.0  # the contract's bound, while the worker runs


def _log(conn: psycopg.Connection, user: str | None = None, lbs: str = "1.000000") -> str:
    """Log one verified action (in conn's current transaction); return its action_id."""
    action_id = new_id()
    log_action(conn, action(action_id, user or new_id(), lbs, logged_at(0)))
    return action_id


def _status(conn: psycopg.Connection) -> dict[str, Any]:
    return conn.execute("SELECT bulk_sync.status()").fetchone()[0]


@pytest.fixture
def listener(db_url: str) -> Iterator[psycopg.Connection]:
    conn = connect(db_url)
    conn.execute(f"LISTEN {LEADERBOARD_CHANNEL}")
    yield conn
    conn.close()


class Workers:
    """`bulk-sync worker` subprocesses, stopped at teardown."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.procs: list[tuple[Any, LineReader]] = []

    def start(self) -> tuple[Any, LineReader]:
        proc = start_cli(self.url, "worker")
        log = LineReader(proc.stderr)
        self.procs.append((proc, log))
        return proc, log

    def stop_all(self) -> None:
        for proc, _ in self.procs:
            stop_process(proc, signal.SIGKILL)
            proc.stdout.close()
            proc.stderr.close()


@pytest.fixture
def workers(db_url: str) -> Iterator[Workers]:
    pool = Workers(db_url)
    yield pool
    pool.stop_all()


def _is(event: str) -> Any:
    return lambda record: record.get("event") == event


# --------------------------------------------------------------------------- events_since


def test_out_of_order_commits_are_read_once_in_commit_order(db_url: str) -> None:
    with (
        connect(db_url, autocommit=False) as a,
        connect(db_url, autocommit=False) as c,
        connect(db_url) as b,
        connect(db_url) as reader,
    ):
        seen: list[tuple[int, str]] = []

        def read() -> list[str]:
            after = seen[-1][0] if seen else 0
            rows = reader.execute(
                "SELECT event_id, payload FROM bulk_sync.events_since(%s)", (after,)
            ).fetchall()
            seen.extend((int(i), p["action_id"]) for i, p in rows)
            return [p["action_id"] for _, p in rows]

        x = _log(a)  # A logs first and stays open
        y = _log(b)  # B logs later and commits first
        assert read() == [y]
        z = _log(c)  # C opens, A commits
        a.commit()
        assert read() == [x]
        w = _log(b)
        assert read() == [w]  # Z is still in flight
        c.commit()
        assert read() == [z]
        assert read() == []

        ids = [i for i, _ in seen]
        assert ids == sorted(ids)
        assert len(set(ids)) == len(ids)
        assert sorted(action_id for _, action_id in seen) == sorted([x, y, z, w])


def test_concurrent_writers_and_readers_see_every_event_once(db_url: str) -> None:
    """6 writers hold their transactions open for random times; 2 readers page through events."""
    writers, per_writer = 6, 40
    logged: list[list[str]] = [[] for _ in range(writers)]
    done = threading.Event()
    errors: list[BaseException] = []
    reads: list[list[tuple[int, str]]] = [[], []]

    def writer(i: int) -> None:
        rng = random.Random(i)
        with connect(db_url, autocommit=False) as conn:
            for _ in range(per_writer):
                action_id = _log(conn)
                time.sleep(rng.random() * 0.01)  # commit order differs from outbox order
                conn.commit()
                logged[i].append(action_id)

    def reader(r: int) -> None:
        with connect(db_url) as conn:
            last = 0
            while True:
                finished = done.is_set()
                rows = conn.execute(
                    "SELECT event_id, payload FROM bulk_sync.events_since(%s, 7)", (last,)
                ).fetchall()
                for event_id, payload in rows:
                    reads[r].append((int(event_id), payload["action_id"]))
                    last = int(event_id)
                if finished and not rows:
                    return

    def guarded(fn: Any, *args: Any) -> threading.Thread:
        def run() -> None:
            try:
                fn(*args)
            except BaseException as exc:
                errors.append(exc)

        return threading.Thread(target=run)

    reader_threads = [guarded(reader, r) for r in range(2)]
    writer_threads = [guarded(writer, i) for i in range(writers)]
    for thread in reader_threads + writer_threads:
        thread.start()
    for thread in writer_threads:
        thread.join(timeout=120)
    done.set()
    for thread in reader_threads:
        thread.join(timeout=120)
    assert errors == []

    expected = sorted(a for batch in logged for a in batch)
    assert len(expected) == writers * per_writer
    for seen in reads:
        ids = [i for i, _ in seen]
        assert ids == sorted(set(ids)), "event ids repeated or out of order"
        assert sorted(a for _, a in seen) == expected
    assert reads[0] == reads[1]


# --------------------------------------------------------------------------- NOTIFY


def test_a_second_publisher_returns_at_once_and_leaves_the_outbox_to_the_first(db_url: str) -> None:
    """Only one publisher numbers events at a time. A second one (the cron job firing while a DBA
    publishes by hand, say) returns 0 at once instead of waiting, and what it left is published
    after the first commits, numbered after the first's events."""
    with connect(db_url) as writer, connect(db_url, autocommit=False) as first:
        earlier = _log(writer)
        # The first publisher moves that event and holds its lock until it commits.
        assert first.execute("SELECT bulk_sync.publish_events()").fetchone()[0] == 1
        later = _log(writer)
        with connect(db_url) as second:
            second.execute("SET statement_timeout = '5s'")  # waiting would be a failure too
            assert second.execute("SELECT bulk_sync.publish_events()").fetchone()[0] == 0
            first.commit()
            assert _status(second)["events_pending"] == 1  # the later one, left as it was
            assert second.execute("SELECT bulk_sync.publish_events()").fetchone()[0] == 1
        assert [payload["action_id"] for _, payload in all_events(writer)] == [earlier, later]


def test_writers_do_not_notify_the_publisher_does(
    db_url: str, listener: psycopg.Connection
) -> None:
    with connect(db_url) as conn:
        user = new_id()
        action_id = _log(conn, user, "2.500000")
        assert drain_notifies(listener, 1.0) == []
        assert _status(conn)["events_pending"] == 1

        assert conn.execute("SELECT bulk_sync.publish_events()").fetchone()[0] == 1
        notes = drain_notifies(listener, 1.0)
        assert len(notes) == 1
        note = notes[0]
        assert note["user_id"] == user
        assert note["user_total_lbs"] == "2.500000"
        assert note["global_total_lbs"] == "2.500000"
        assert note["action_id"] == action_id
        events = all_events(conn)
        assert [e[0] for e in events] == [note["last_event_id"]]


def test_bulk_call_for_5000_users_sends_a_bounded_number_of_notifications(
    db_url: str, listener: psycopg.Connection
) -> None:
    rng = random.Random(3)
    batch = [action(new_id(), new_id(), random_amount(rng), logged_at(i)) for i in range(5_000)]
    total = decimal_sum(Decimal(a["lbs"]) for a in batch)
    with connect(db_url) as conn:
        response = bulk_backfill(conn, batch)
        assert response["affected_users"] == 5_000
        assert drain_notifies(listener, 0.5) == []  # nothing from the writer

        published = 0
        while count := conn.execute("SELECT bulk_sync.publish_events()").fetchone()[0]:
            published += count
        assert published == 5_000
        notes = drain_notifies(listener, 1.0)
        assert 1 <= len(notes) <= 3, f"{len(notes)} notifications"

        events = all_events(conn)
        assert len(events) == 5_000
        assert {p["user_id"] for _, p in events} == {a["user_id"] for a in batch}
        assert {p["action_id"] for _, p in events} == {a["action_id"] for a in batch}
        assert notes[-1]["last_event_id"] == events[-1][0]
        assert notes[-1]["global_total_lbs"] == amount(total)


def test_listener_is_notified_within_a_second_while_the_worker_runs(
    db_url: str, listener: psycopg.Connection, workers: Workers
) -> None:
    proc, log = workers.start()
    log.wait_json(_is("active"), timeout=30, what="the worker to become active")
    with connect(db_url) as conn:
        wait_for(lambda: _status(conn)["worker_alive"], timeout=10, what="worker_alive")
        drain_notifies(listener, 0.3)
        last_event = 0
        for round_ in range(3):
            user = new_id()
            lbs = f"{round_ + 1}.125000"
            action_id = new_id()
            response = log_action(conn, action(action_id, user, lbs, logged_at(round_)))
            committed = time.monotonic()
            note = None
            while note is None:
                remaining = committed + NOTIFY_DEADLINE_S - time.monotonic()
                assert remaining > 0, f"no notification within {NOTIFY_DEADLINE_S}s of the commit"
                for item in listener.notifies(timeout=remaining, stop_after=1):
                    payload = drain_payload(item)
                    if payload.get("user_id") == user:
                        note = payload
            assert note["user_total_lbs"] == lbs
            assert note["global_total_lbs"] == response["global_total_lbs"]
            events = all_events(conn, last_event)
            assert events[-1][0] == note["last_event_id"]
            assert events[-1][1]["action_id"] == action_id
            last_event = events[-1][0]
    assert stop_process(proc, signal.SIGTERM) == 0
    assert any(_is("stopped")(r) for r in map(_json_or_empty, log.rest(5)))


def drain_payload(note: Any) -> dict[str, Any]:
    return json.loads(note.payload, parse_float=Decimal)


def _json_or_empty(line: str) -> dict[str, Any]:
    try:
        value = json.loads(line, parse_float=Decimal)
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def test_standby_worker_takes_over_after_the_active_one_is_killed(
    db_url: str, listener: psycopg.Connection, workers: Workers
) -> None:
    first, first_log = workers.start()
    first_log.wait_json(_is("active"), timeout=30, what="the first worker to become active")
    second, second_log = workers.start()
    second_log.wait_json(_is("standby"), timeout=30, what="the second worker to stand by")
    with connect(db_url) as conn:
        assert _status(conn)["worker_alive"] is True

        os.kill(first.pid, signal.SIGKILL)
        first.wait(timeout=10)
        second_log.wait_json(_is("active"), timeout=10, what="the standby to take over")
        assert _status(conn)["worker_alive"] is True

        drain_notifies(listener, 0.3)
        user = new_id()
        log_action(conn, action(new_id(), user, "4.000000", logged_at(0)))
        committed = time.monotonic()
        notes: list[dict[str, Any]] = []
        while not any(n.get("user_id") == user for n in notes):
            remaining = committed + NOTIFY_DEADLINE_S - time.monotonic()
            assert remaining > 0, "notifications did not resume after the takeover"
            notes += drain_notifies(listener, min(remaining, 0.1))

        assert stop_process(second, signal.SIGTERM) == 0
        wait_for(lambda: not _status(conn)["worker_alive"], timeout=10, what="no worker alive")


# --------------------------------------------------------------------------- bulk-sync listen


def _read_events(out: LineReader, count: int, timeout: float) -> list[dict[str, Any]]:
    records = []
    for _ in range(count):
        try:
            line = out.next(timeout)
        except queue.Empty:
            raise AssertionError(f"listen printed only {out.seen}") from None
        assert line is not None, f"listen ended early; printed {out.seen}"
        record = _json_or_empty(line)
        assert "event_id" in record, line
        records.append(record)
    return records


def test_listen_resumes_after_a_kill_without_gaps_or_repeats(db_url: str) -> None:
    with connect(db_url) as conn:

        def log_and_publish(n: int) -> list[str]:
            ids = [_log(conn) for _ in range(n)]
            conn.execute("SELECT bulk_sync.publish_events()")  # wakes the listener now
            return ids

        before = log_and_publish(3)
        first = start_cli(db_url, "listen", "--after", "0")
        try:
            out = LineReader(first.stdout)
            printed = _read_events(out, 3, timeout=30)  # catch-up
            live = log_and_publish(2)
            printed += _read_events(out, 2, timeout=15)  # live
            os.kill(first.pid, signal.SIGKILL)
            first.wait(timeout=10)
        finally:
            stop_process(first, signal.SIGKILL)
        assert [r["action_id"] for r in printed] == before + live
        last = printed[-1]["event_id"]

        after_restart = log_and_publish(3)
        second = start_cli(db_url, "listen", "--after", str(last))
        try:
            out = LineReader(second.stdout)
            resumed = _read_events(out, 3, timeout=30)
            time.sleep(1.0)  # anything printed twice would show up now
        finally:
            code = stop_process(second, signal.SIGTERM)
        assert code == 0
        assert out.rest(5) == []
        assert [r["action_id"] for r in resumed] == after_restart

        ids = [r["event_id"] for r in printed + resumed]
        assert ids == sorted(set(ids))
        assert ids == [e[0] for e in all_events(conn)]
