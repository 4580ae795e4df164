"""``bulk-sync listen`` and ``bulk-sync worker``, and the event follower they are built on.

follow
    The one event follower: reads ``bulk_sync.events_since`` page by page and hands each page
    on, then follows live. ``bulk-sync listen`` prints the pages; ``bulk-sync serve`` fans them
    out to its Server-Sent Events clients.

listen
    Prints one JSON line per event, ``{"event_id": N, ...payload}``: first everything after
    ``--after`` (``bulk_sync.events_since``), then live. A notification on
    ``bulk_sync_leaderboard`` (or a safety poll every few seconds) triggers the next read,
    so a lost notification costs latency, never an event. On a lost connection it
    reconnects and resumes from the last printed id: nothing missed, nothing twice.

worker
    Holds the session advisory lock ``(1651862635, 1)``; a second worker that cannot get it
    is a standby and retries. The active worker publishes events (``publish_events``,
    every 0.2 s), reconciles when due (``--reconcile-every``, counted from the latest
    ``reconciliation_runs.started_at``, so a restart does not reconcile twice) and prunes
    old events and ends the loads of killed runners (``_end_abandoned_loads``) every 10
    minutes. When events wait behind a session that holds the publish lock (a reader's
    open transaction), it logs ``publish_blocked`` with that session's pid. It logs one JSON
    object per line on stderr.
"""

from __future__ import annotations

import re
import signal
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any, TextIO

import psycopg
from psycopg import sql

from bulk_sync.db import APP_NAME, connect, to_cli_error
from bulk_sync.errors import EXIT_BAD_INPUT, EXIT_DATABASE, CliError
from bulk_sync.jsonutil import dumps

CHANNEL = "bulk_sync_leaderboard"
LOCK_CLASSID = 1651862635
LOCK_WORKER = 1
LOCK_PUBLISH = 2  # publish_events' transaction-level lock
CATCH_UP_LIMIT = 1000
PAGE_SQL = "SELECT event_id, payload FROM bulk_sync.events_since(%s, %s)"
PAGE_TEXT_SQL = "SELECT event_id, payload::text FROM bulk_sync.events_since(%s, %s)"
SAFETY_POLL_S = 5.0
PUBLISH_EVERY_S = 0.2
STANDBY_RETRY_S = 0.5
PRUNE_EVERY_S = 600.0
BACKOFF_MAX_S = 10.0

BLOCKED_AFTER_S = 5  # a publisher that holds on this long while events wait holds them all back

# Who holds publish_events' lock, and for how long it has sat idle in its transaction (a reader
# that called events_since without committing). That time is NULL where pg_stat_activity hides
# another role's session (without pg_read_all_stats); the worker then times the holder itself.
PUBLISH_LOCK_HOLDER = """
SELECT l.pid, a.application_name, a.state,
       CASE WHEN a.state LIKE 'idle in transaction%%'
            THEN extract(epoch FROM pg_catalog.now() - a.state_change) END
  FROM pg_catalog.pg_locks AS l
  LEFT JOIN pg_catalog.pg_stat_activity AS a ON a.pid = l.pid
 WHERE l.locktype = 'advisory' AND l.granted AND l.pid <> pg_catalog.pg_backend_pid()
   AND l.database = (SELECT oid FROM pg_catalog.pg_database WHERE datname = current_database())
   AND l.classid = %(classid)s AND l.objid = %(objid)s AND l.objsubid = 2
"""

DEFAULT_RECONCILE_EVERY = "1h"
DEFAULT_EVENT_RETENTION = "7 days"

_DURATION = re.compile(r"(?:(\d+)d)?(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?")


def parse_duration(text: str) -> int:
    """``30s``, ``15m``, ``1h``, ``2h30m``, ``1d`` or plain seconds → seconds (> 0)."""
    cleaned = text.strip().lower().replace(" ", "")
    if cleaned.isdigit():
        seconds = int(cleaned)
    else:
        match = _DURATION.fullmatch(cleaned)
        if not cleaned or not match:
            raise ValueError(f"{text!r} is not a duration such as 30s, 15m, 1h or 2h30m")
        days, hours, minutes, secs = (int(part or 0) for part in match.groups())
        seconds = ((days * 24 + hours) * 60 + minutes) * 60 + secs
    if seconds <= 0:
        raise ValueError(f"{text!r} is not a positive duration")
    return seconds


# --------------------------------------------------------------------------- shutdown


class Stopper:
    """SIGINT/SIGTERM set a flag; loops check it and sleep in short slices."""

    def __init__(self) -> None:
        self.stopped = False
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: object) -> None:
        self.stopped = True

    @contextmanager
    def installed(self) -> Iterator[Stopper]:
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handle)
        try:
            yield self
        finally:
            for sig, handler in self._previous.items():
                signal.signal(sig, handler)

    def sleep(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while not self.stopped:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            time.sleep(min(remaining, 0.1))


def _backoff(attempt: int) -> float:
    return min(BACKOFF_MAX_S, 0.5 * (2 ** min(attempt, 5)))


def _utc_now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _is_connection_error(exc: BaseException) -> bool:
    return isinstance(exc, psycopg.OperationalError | psycopg.InterfaceError) and not (
        getattr(exc, "sqlstate", None) or ""
    ).startswith(("BS", "22", "42", "3F"))


# --------------------------------------------------------------------------- listen


Row = tuple[int, Any]
"""One event as ``events_since`` returns it: ``(event_id, payload)``."""


class _Cursor:
    """The last event id handed on; updated page by page, so a reconnect resumes exactly there."""

    def __init__(self, last: int) -> None:
        self.last = last


def follow(
    database_url: str,
    after: int,
    emit: Callable[[list[Row]], None],
    *,
    stopper: Stopper,
    notice: Callable[[str], None],
    poll_every_s: float = SAFETY_POLL_S,
    role: str | None = None,
    retry_first: bool = False,
    payload_text: bool = False,
) -> int:
    """Hand every event after ``after`` to ``emit``, page by page, then follow live until stopped.

    A notification on ``bulk_sync_leaderboard`` triggers the next read, and so does a poll every
    ``poll_every_s`` (``events_since`` publishes pending events itself, so polling alone works
    without a worker). A lost connection is retried with backoff and resumes after the last id
    emitted: nothing missed, nothing twice. The first connection failure raises a ``CliError``
    unless ``retry_first``. ``role`` is set for the session (``SET ROLE``). With ``payload_text``
    each payload is the JSON text PostgreSQL gives, not parsed. Returns the last id.
    """
    seen = _Cursor(after)
    conn: psycopg.Connection | None = None
    if not retry_first:
        conn = _listen_connection(database_url, role)  # first failure: exit 3
    attempt = 0
    while not stopper.stopped:
        try:
            if conn is None:
                conn = _listen_connection(database_url, role)
                if attempt:
                    notice(f"reconnected; resuming after event {seen.last}")
                attempt = 0
            _drain(conn, seen, emit, stopper, payload_text)
            polled = time.monotonic()
            while not stopper.stopped:
                woken = any(True for _ in conn.notifies(timeout=0.5, stop_after=1))
                if woken or time.monotonic() - polled >= poll_every_s:
                    _drain(conn, seen, emit, stopper, payload_text)
                    polled = time.monotonic()
        except CliError as exc:  # a reconnect failed
            _lost(conn, stopper, notice, attempt, exc.message)
            conn = None
            attempt += 1
        except psycopg.Error as exc:
            if not _is_connection_error(exc):
                if conn is not None:
                    conn.close()
                raise
            _lost(conn, stopper, notice, attempt, f"connection lost ({_first_line(exc)})")
            conn = None
            attempt += 1
    if conn is not None:
        conn.close()
    return seen.last


def event_record(event_id: int, payload: Any) -> dict[str, Any]:
    """``{"event_id": N, ...payload}``: one line of ``bulk-sync listen``."""
    record: dict[str, Any] = {"event_id": event_id}
    if isinstance(payload, dict):
        record.update((k, v) for k, v in payload.items() if k != "event_id")
    else:
        record["payload"] = payload
    return record


def listen(
    database_url: str,
    after: int = 0,
    *,
    out: TextIO | None = None,
    stopper: Stopper | None = None,
    notice: Callable[[str], None] | None = None,
) -> int:
    """Print every event after ``after``, then follow live until stopped; return the last id."""
    stream = out or sys.stdout

    def emit(rows: list[Row]) -> None:
        stream.writelines(dumps(event_record(*row)) + "\n" for row in rows)
        stream.flush()

    return follow(
        database_url,
        after,
        emit,
        stopper=stopper or Stopper(),
        notice=notice
        or (lambda message: print(f"bulk-sync: {message}", file=sys.stderr, flush=True)),
    )


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def _lost(
    conn: psycopg.Connection | None,
    stopper: Stopper,
    notice: Callable[[str], None],
    attempt: int,
    why: str,
) -> None:
    if conn is not None:
        conn.close()
    delay = _backoff(attempt)
    notice(f"{why}; reconnecting in {delay:g}s")
    stopper.sleep(delay)


def _listen_connection(database_url: str, role: str | None = None) -> psycopg.Connection:
    conn = connect(database_url, autocommit=True, application_name=f"{APP_NAME} listen")
    try:
        if role is not None:
            conn.execute(sql.SQL("SET ROLE {}").format(sql.Identifier(role)))
        conn.execute(f"LISTEN {CHANNEL}")
    except BaseException:
        conn.close()
        raise
    return conn


def _drain(
    conn: psycopg.Connection,
    seen: _Cursor,
    emit: Callable[[list[Row]], None],
    stopper: Stopper,
    payload_text: bool = False,
) -> None:
    """Hand on every event after ``seen.last``, page by page."""
    query = PAGE_TEXT_SQL if payload_text else PAGE_SQL
    while not stopper.stopped:
        rows = conn.execute(query, (seen.last, CATCH_UP_LIMIT)).fetchall()
        if rows:
            page = [(int(event_id), payload) for event_id, payload in rows]
            emit(page)
            seen.last = max(seen.last, page[-1][0])
        if len(rows) < CATCH_UP_LIMIT:
            return


# --------------------------------------------------------------------------- worker


class Worker:
    """The publish / reconcile / prune loop behind ``bulk-sync worker``."""

    def __init__(
        self,
        database_url: str,
        *,
        reconcile_every_s: int,
        event_retention: str = DEFAULT_EVENT_RETENTION,
        log: TextIO | None = None,
        stopper: Stopper | None = None,
    ) -> None:
        self.database_url = database_url
        self.reconcile_every_s = reconcile_every_s
        self.event_retention = event_retention
        self.log_stream = log or sys.stderr
        self.stopper = stopper or Stopper()
        self.conn: psycopg.Connection | None = None
        self.active = False
        self._announced_standby = False
        self._reconcile_due = 0.0
        self._prune_due = 0.0
        # The session holding the publish lock while events wait: pid, since when (monotonic),
        # whether it was logged.
        self._holder: tuple[int, float, bool] | None = None

    # -- logging

    def log(self, event: str, **fields: Any) -> None:
        record = {"ts": _utc_now(), "event": event, **fields}
        self.log_stream.write(dumps(record) + "\n")
        self.log_stream.flush()

    # -- connection and leadership

    def _connect(self) -> psycopg.Connection:
        conn = connect(self.database_url, autocommit=True, application_name=f"{APP_NAME} worker")
        self.active = False
        self._announced_standby = False
        return conn

    def _try_lead(self) -> bool:
        assert self.conn is not None
        if self.active:  # the session lock is held for as long as this connection lives
            return True
        granted = self.conn.execute(
            "SELECT pg_try_advisory_lock(%s, %s)", (LOCK_CLASSID, LOCK_WORKER)
        ).fetchone()[0]
        if granted:
            self.active = True
            self.log("active")
            self._schedule_reconcile()
            self._prune_due = time.monotonic()
        elif not self._announced_standby:
            self._announced_standby = True
            self.log("standby")
        return bool(granted)

    # -- the three duties

    def _schedule_reconcile(self) -> None:
        """Due ``--reconcile-every`` after the last run that could correct: a dry run (``reconcile
        --dry-run``, auto_correct false) fixes nothing, so however often one runs, it must not
        postpone the worker's own run."""
        assert self.conn is not None
        seconds = self.conn.execute(
            "SELECT coalesce(ceil(extract(epoch FROM"
            " max(started_at) + make_interval(secs => %s) - clock_timestamp())), 0)::bigint"
            " FROM bulk_sync.reconciliation_runs WHERE auto_correct",
            (self.reconcile_every_s,),
        ).fetchone()[0]
        self._reconcile_due = time.monotonic() + max(0, int(seconds))

    def publish(self) -> int:
        assert self.conn is not None
        total = 0
        while not self.stopper.stopped:
            count = self.conn.execute("SELECT bulk_sync.publish_events()").fetchone()[0]
            count = int(count or 0)
            total += count
            if count == 0:
                break
        if total:
            self.log("published", count=total)
        if total or self.stopper.stopped:
            self._holder = None
        elif self.conn.execute("SELECT EXISTS (SELECT FROM bulk_sync._event_outbox)").fetchone()[0]:
            self._name_blocking_publisher()
        else:
            self._holder = None
        return total

    def _name_blocking_publisher(self) -> None:
        """Events wait and none could be published: once the session holding the publish lock has
        held on for BLOCKED_AFTER_S, log it (once for as long as it holds on)."""
        assert self.conn is not None
        row = self.conn.execute(
            PUBLISH_LOCK_HOLDER, {"classid": LOCK_CLASSID, "objid": LOCK_PUBLISH}
        ).fetchone()
        if row is None:
            self._holder = None
            return
        pid, application, state, idle_s = row
        now = time.monotonic()
        if self._holder is None or self._holder[0] != pid:
            self._holder = (pid, now - float(idle_s or 0), False)
        since, logged = self._holder[1:]
        if logged or now - since < BLOCKED_AFTER_S:
            return
        self._holder = (pid, since, True)
        self.log(
            "publish_blocked",
            pid=pid,
            application_name=application,
            state=state,
            held_s=int(now - since),
            hint="a transaction that called events_since is still open: end it (or "
            "pg_terminate_backend(pid)), and call events_since as its own transaction",
        )

    def reconcile_if_due(self) -> dict[str, Any] | None:
        assert self.conn is not None
        if time.monotonic() < self._reconcile_due:
            return None
        self._schedule_reconcile()  # another run (CLI, pg_cron) may have moved the due time
        if time.monotonic() < self._reconcile_due:
            return None
        result = self.conn.execute(
            "SELECT bulk_sync.reconcile(jsonb_build_object('performed_by', 'worker'))"
        ).fetchone()[0]
        keys = ("in_sync", "fixed", "discrepancy", "users_out_of_sync", "run_id")
        self.log("reconciled", **{k: result.get(k) for k in keys if k in result})
        self._schedule_reconcile()
        return result

    def prune_if_due(self) -> None:
        assert self.conn is not None
        if time.monotonic() < self._prune_due:
            return
        count, loads = self.conn.execute(
            "SELECT bulk_sync.prune_events(%s::interval), bulk_sync._end_abandoned_loads()",
            (self.event_retention,),
        ).fetchone()
        self.log("pruned", count=count, retention=self.event_retention, abandoned_loads=loads)
        self._prune_due = time.monotonic() + PRUNE_EVERY_S

    def one_pass(self) -> None:
        self.publish()
        self.reconcile_if_due()
        self.prune_if_due()

    # -- the loop

    def run(self, once: bool = False) -> None:
        """Run until SIGINT/SIGTERM (or one pass with ``once``)."""
        self.conn = self._connect()  # a first failure is an error (exit 3)
        # A bad --event-retention is bad input (exit 2), found before anything runs: not an
        # interval, or one prune_events would refuse on every pass.
        (negative,) = self.conn.execute(
            "SELECT %s::interval < interval '0'", (self.event_retention,)
        ).fetchone()
        if negative:
            raise CliError(
                f"--event-retention must not be negative: {self.event_retention}", EXIT_BAD_INPUT
            )
        self.log(
            "started",
            reconcile_every_s=self.reconcile_every_s,
            event_retention=self.event_retention,
        )
        attempt = 0
        try:
            while not self.stopper.stopped:
                try:
                    if self.conn is None:
                        self.conn = self._connect()
                        self.log("reconnected")
                        attempt = 0
                    if not self._try_lead():
                        if once:
                            return
                        self.stopper.sleep(STANDBY_RETRY_S)
                        continue
                    self.one_pass()
                    if once:
                        return
                    self.stopper.sleep(PUBLISH_EVERY_S)
                except (psycopg.Error, CliError) as exc:
                    if isinstance(exc, psycopg.Error) and not _is_connection_error(exc):
                        error = to_cli_error(exc)
                        if error.exit_code == EXIT_DATABASE and "migrate" in error.message:
                            raise error from exc
                        self.log("error", message=error.message)
                        if once:
                            raise error from exc
                        self.stopper.sleep(1.0)
                        continue
                    delay = _backoff(attempt)
                    self.log("connection_lost", message=_first_line(exc), retry_in=f"{delay:g}s")
                    if self.conn is not None:
                        self.conn.close()
                    self.conn = None
                    self.active = False
                    self.stopper.sleep(delay)
                    attempt += 1
        finally:
            if self.conn is not None:
                self.conn.close()  # also releases the advisory lock
            self.log("stopped")
