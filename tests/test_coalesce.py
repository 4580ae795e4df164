"""Coalescing in ``bulk-sync serve``: concurrent ``POST /api/actions/log`` requests share
``log_actions`` calls, and no client can tell, apart from ``timestamp``.

- 50 parallel clients (duplicates of one action_id in flight at once, bad bodies, conflicts, a
  body PostgreSQL cannot read) get the responses the unbatched server gives to the same requests
  sent one at a time, in the order the batches applied them, to a fresh database;
- batches form: PostgreSQL counts fewer log_actions and log_action calls than requests;
- requests that fill a batch go out while another batch is still in flight;
- a batch whose connection dies answers 503 to each of its requests and commits none of them;
- SIGKILL mid-load: every action answered 200 is in the ledger, and the totals are exact.
"""

from __future__ import annotations

import asyncio
import json
import random
import re
import signal
import time
from collections.abc import Callable, Iterator
from decimal import Decimal
from typing import Any

import httpx
import psycopg
import pytest
from psycopg import sql

from bulk_sync import serve
from helpers import assert_exact_totals, connect, new_id, per_user_stats, wait_for
from test_serve import TOKEN_ENV, TOKENS, Server

WRITER = {"Authorization": f"Bearer {TOKENS['writer']}", "Content-Type": "application/json"}
TIMESTAMP = re.compile(r'"timestamp": "[^"]*"')
PARALLEL = 50


@pytest.fixture
def servers() -> Iterator[Callable[..., Server]]:
    started: list[Server] = []

    def factory(url: str, env: dict[str, str] | None = None) -> Server:
        server = Server(url, {**TOKEN_ENV, **(env or {})})
        started.append(server)
        server.wait_ready()
        return server

    yield factory
    for server in started:
        server.stop()


def body(
    action_id: str, user_id: str, lbs: str, at: str = "2025-11-05T10:00:00Z", **extra: Any
) -> str:
    doc = {"action_id": action_id, "user_id": user_id, "lbs": lbs, "logged_at": at}
    doc["verified"] = True
    doc.update(extra)
    return json.dumps(doc)


def without_timestamp(text: str) -> str:
    return TIMESTAMP.sub('"timestamp": "-"', text)


async def post_all(base: str, bodies: list[str], parallel: int = PARALLEL) -> list[tuple[int, str]]:
    """Every body POSTed at once over ``parallel`` connections: (status, text) in body order."""
    limits = httpx.Limits(max_connections=parallel, max_keepalive_connections=parallel)
    gate = asyncio.Semaphore(parallel)
    async with httpx.AsyncClient(base_url=base, limits=limits, timeout=60) as client:

        async def one(text: str) -> tuple[int, str]:
            async with gate:
                response = await client.post("/api/actions/log", content=text, headers=WRITER)
                return response.status_code, response.text

        return await asyncio.gather(*(one(text) for text in bodies))


async def post_stuck_on_a_lock(
    server: Server, text: str, watcher: psycopg.Connection
) -> asyncio.Task[list[tuple[int, str]]]:
    """POSTs ``text`` in a task and returns once a session of the database waits on a lock."""
    task = asyncio.create_task(post_all(server.base, [text]))
    deadline = time.monotonic() + 10
    while not watcher.execute(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
        " AND wait_event_type = 'Lock'"
    ).fetchone()[0]:
        assert time.monotonic() < deadline, "the first call never waited on the lock"
        await asyncio.sleep(0.05)
    return task


def post_one_by_one(server: Server, bodies: list[str]) -> list[tuple[int, str]]:
    answers = []
    for text in bodies:
        response = server.api.http.post("/api/actions/log", content=text, headers=WRITER)
        answers.append((response.status_code, response.text))
    return answers


# --------------------------------------------------------------------------- the same answers


def wait_for_other_backends(conn: psycopg.Connection, what: str) -> None:
    """Wait until no other session is connected to this database (the server's have ended)."""
    wait_for(
        lambda: (
            not conn.execute(
                "SELECT count(*) FROM pg_stat_activity"
                " WHERE datname = current_database() AND pid <> pg_backend_pid()"
            ).fetchone()[0]
        ),
        10,
        0.1,
        what,
    )


def test_concurrent_requests_get_the_unbatched_answers(
    make_db: Callable[..., str], servers: Callable[..., Server]
) -> None:
    rng = random.Random(11)
    users = [new_id() for _ in range(6)]
    stored = [(new_id(), rng.choice(users), f"{rng.randint(1, 99)}.5") for _ in range(6)]
    seed = [body(a, u, lbs) for a, u, lbs in stored]

    bodies = [
        body(new_id(), rng.choice(users), f"{rng.randint(1, 9999)}.{i:02d}") for i in range(150)
    ]
    for _ in range(5):  # the same action_id four times at once, same facts
        bodies += [body(new_id(), rng.choice(users), "3.333333")] * 4
    bodies += [body(a, u, lbs) for a, u, lbs in stored[:3]]  # duplicates of stored actions
    bodies += [body(a, u, "1.000001") for a, u, _ in stored[3:]]  # BS002: other lbs
    bodies += [body(stored[0][0], users[0] if stored[0][1] != users[0] else users[1], "7")]
    bodies += [  # BS001, one problem each
        body(new_id(), users[0], "-1"),
        body(new_id(), users[0], "abc"),
        body(new_id(), users[0], "1.5", verifed=True),
        json.dumps({"action_id": new_id(), "lbs": "2", "logged_at": "2025-11-05T10:00:00Z"}),
        body("not-a-uuid", users[0], "2"),
        body(new_id(), users[0], "2", at="yesterday"),
        # Valid JSON that PostgreSQL's jsonb refuses: its whole batch goes out one by one.
        body(new_id(), users[0], "2", metadata={"note": "\u0000"}),
    ]
    rng.shuffle(bodies)

    batched_url, reference_url = make_db(), make_db()
    batched = servers(batched_url)
    post_one_by_one(batched, seed)
    answers = asyncio.run(post_all(batched.base, bodies))
    assert all(status < 500 for status, _ in answers), [a for a in answers if a[0] >= 500][:3]

    # The order the batches applied the actions in: the global total only grows with each
    # counted action, and a duplicate came after the action that produced its total.
    def applied_at(i: int) -> tuple[Decimal, bool]:
        doc = json.loads(answers[i][1])
        return Decimal(doc["global_total_lbs"]), doc["status"] != "inserted"

    ok = sorted((i for i, (s, _) in enumerate(answers) if s == 200), key=applied_at)
    failed = [i for i, (s, _) in enumerate(answers) if s != 200]
    assert len(ok) == len(bodies) - 11, answers
    assert len(failed) == 11
    order = ok + failed

    reference = servers(reference_url, {"BULK_SYNC_BATCH_MAX": "1"})
    post_one_by_one(reference, seed)
    expected = post_one_by_one(reference, [bodies[i] for i in order])
    for i, (status, text) in zip(order, expected, strict=True):
        assert (answers[i][0], without_timestamp(answers[i][1])) == (
            status,
            without_timestamp(text),
        ), bodies[i]

    hints = [json.loads(answers[i][1])["error"]["hint"] for i in failed]
    assert sum(1 for h in hints if h and "action_id identifies one action" in h) == 4
    with connect(batched_url) as one, connect(reference_url) as other:
        assert assert_exact_totals(one) == assert_exact_totals(other)
        assert per_user_stats(one) == per_user_stats(other)


# --------------------------------------------------------------------------- batches form


def test_concurrent_requests_share_log_actions_calls(
    admin_url: str, make_db: Callable[..., str], servers: Callable[..., Server]
) -> None:
    """While one call waits on a lock, the requests behind it pile up and go as one batch:
    PostgreSQL counts the calls (track_functions), and the actions of a batch share a
    transaction id (xmin)."""
    url = make_db()
    name = url.rsplit("/", 1)[1]
    with connect(admin_url) as admin:
        admin.execute(
            sql.SQL("ALTER DATABASE {} SET track_functions = 'pl'").format(sql.Identifier(name))
        )
    server = servers(url)
    users = [new_id() for _ in range(8)]
    stalled = body(new_id(), users[0], "1.25")
    bodies = [body(new_id(), users[i % 8], "1.25") for i in range(300)]
    with connect(url) as seed:
        seed.execute("INSERT INTO bulk_sync.user_stats (user_id) VALUES (%s)", [users[0]])

    with connect(url, autocommit=False) as blocker, connect(url) as watcher:
        blocker.execute(
            "SELECT 1 FROM bulk_sync.user_stats WHERE user_id = %s FOR UPDATE", [users[0]]
        )

        async def load() -> list[tuple[int, str]]:
            first = await post_stuck_on_a_lock(server, stalled, watcher)
            rest = asyncio.create_task(post_all(server.base, bodies))
            await asyncio.sleep(1.0)  # all PARALLEL requests are waiting behind the first
            blocker.rollback()
            return [*(await first), *(await rest)]

        answers = asyncio.run(load())
    assert [status for status, _ in answers] == [200] * 301
    server.stop()  # the backends report their function counts as they exit

    with connect(url) as conn:
        wait_for_other_backends(conn, "the server's backends to exit")
        calls = dict(
            conn.execute(
                "SELECT p.oid::regprocedure::text, coalesce(s.calls, 0)"
                " FROM pg_proc AS p LEFT JOIN pg_stat_user_functions AS s ON s.funcid = p.oid"
                " WHERE p.oid IN ('bulk_sync.log_actions(jsonb)'::regprocedure,"
                " 'bulk_sync.log_action(jsonb)'::regprocedure)"
            ).fetchall()
        )
        per_transaction = [
            n
            for (n,) in conn.execute(
                "SELECT count(*) FROM bulk_sync.user_actions GROUP BY xmin::text ORDER BY 1 DESC"
            ).fetchall()
        ]
        assert sum(per_transaction) == 301
        assert_exact_totals(conn, Decimal("1.25") * 301)
    batches, alone = calls["bulk_sync.log_actions(jsonb)"], calls["bulk_sync.log_action(jsonb)"]
    assert batches >= 1, calls
    assert batches + alone == len(per_transaction), (calls, per_transaction)
    assert per_transaction[0] >= PARALLEL, per_transaction  # the pile behind the lock


def test_a_full_batch_goes_out_beside_the_one_in_flight(
    db_url: str, servers: Callable[..., Server]
) -> None:
    """With BULK_SYNC_BATCH_MAX=10, requests that fill a batch do not wait for the batch in
    flight (stuck on a lock here): they are answered, in batches of at most 10, before it
    returns."""
    server = servers(db_url, {"BULK_SYNC_BATCH_MAX": "10"})
    stuck_user = new_id()
    stuck = body(new_id(), stuck_user, "1")
    others = [body(new_id(), new_id(), "0.5") for _ in range(40)]
    with connect(db_url) as seed:
        seed.execute("INSERT INTO bulk_sync.user_stats (user_id) VALUES (%s)", [stuck_user])

    with connect(db_url, autocommit=False) as blocker, connect(db_url) as watcher:
        blocker.execute(
            "SELECT 1 FROM bulk_sync.user_stats WHERE user_id = %s FOR UPDATE", [stuck_user]
        )

        async def load() -> tuple[list[tuple[int, str]], list[tuple[int, str]]]:
            first = await post_stuck_on_a_lock(server, stuck, watcher)
            # All 40 answered while the first call still waits: none of them queued behind it.
            rest = await asyncio.wait_for(post_all(server.base, others, parallel=40), 30)
            assert not first.done()
            blocker.rollback()
            return await first, rest

        first, rest = asyncio.run(load())
    assert [status for status, _ in first] == [200]
    assert [status for status, _ in rest] == [200] * 40
    assert all(json.loads(text)["status"] == "inserted" for _, text in rest)
    with connect(db_url) as conn:
        per_transaction = [
            n
            for (n,) in conn.execute(
                "SELECT count(*) FROM bulk_sync.user_actions GROUP BY xmin::text ORDER BY 1 DESC"
            ).fetchall()
        ]
        assert sum(per_transaction) == 41
        assert max(per_transaction) <= 10, per_transaction
        assert len(per_transaction) < 41, per_transaction  # batched, not one by one
        assert_exact_totals(conn, Decimal(1) + Decimal("0.5") * 40)


# --------------------------------------------------------------------------- faults


def test_a_batch_whose_connection_dies_answers_503_and_commits_nothing(
    db_url: str, servers: Callable[..., Server]
) -> None:
    server = servers(db_url)
    user = new_id()
    first = server.api.http.post(
        "/api/actions/log", content=body(new_id(), user, "1"), headers=WRITER
    )
    assert first.status_code == 200, first.text
    ids = [new_id() for _ in range(10)]

    with connect(db_url, autocommit=False) as blocker, connect(db_url) as watcher:
        # The user's row is locked: every log call for the user waits on it, and is killed there.
        blocker.execute("SELECT 1 FROM bulk_sync.user_stats WHERE user_id = %s FOR UPDATE", [user])

        async def load() -> list[tuple[int, str]]:
            task = asyncio.create_task(post_all(server.base, [body(a, user, "2") for a in ids]))
            killed = 0
            while not task.done():
                killed += watcher.execute(
                    "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
                    " WHERE datname = current_database() AND wait_event_type = 'Lock'"
                    " AND query LIKE '%%bulk_sync.log_action%%'"
                ).fetchone()[0]
                await asyncio.sleep(0.05)
            assert killed >= 1
            return task.result()

        answers = asyncio.run(load())
        blocker.rollback()
        assert [status for status, _ in answers] == [503] * 10, answers
        assert all(json.loads(text)["error"]["code"] == "unavailable" for _, text in answers)
        stored = watcher.execute(
            "SELECT count(*) FROM bulk_sync.user_actions WHERE action_id = ANY (%s::uuid[])", [ids]
        ).fetchone()[0]
        assert stored == 0
        assert_exact_totals(watcher, Decimal(1))
    again = server.api.http.post(
        "/api/actions/log", content=body(ids[0], user, "2"), headers=WRITER
    )
    assert again.status_code == 200, again.text
    assert json.loads(again.text)["status"] == "inserted"


def test_sigkill_mid_load_leaves_every_acknowledged_action_counted(
    db_url: str, servers: Callable[..., Server]
) -> None:
    server = servers(db_url)
    users = [new_id() for _ in range(8)]
    sent: dict[str, Decimal] = {}
    acknowledged: list[str] = []
    refused: list[str] = []

    async def client(http: httpx.AsyncClient, rng: random.Random, stop: asyncio.Event) -> None:
        while not stop.is_set():
            action_id, lbs = new_id(), f"{rng.randint(1, 500)}.{rng.randint(0, 999999):06d}"
            sent[action_id] = Decimal(lbs)
            try:
                response = await http.post(
                    "/api/actions/log",
                    content=body(action_id, rng.choice(users), lbs),
                    headers=WRITER,
                )
            except httpx.HTTPError:
                refused.append(action_id)
                await asyncio.sleep(0.01)
                continue
            if response.status_code == 200:
                assert json.loads(response.text)["action_id"] == action_id
                acknowledged.append(action_id)
            else:
                refused.append(action_id)

    async def load() -> None:
        stop = asyncio.Event()
        limits = httpx.Limits(max_connections=32, max_keepalive_connections=32)
        async with httpx.AsyncClient(base_url=server.base, limits=limits, timeout=10) as http:
            tasks = [asyncio.create_task(client(http, random.Random(n), stop)) for n in range(32)]
            deadline = time.monotonic() + 30
            while len(acknowledged) < 300 and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
            server.proc.send_signal(signal.SIGKILL)
            await asyncio.sleep(0.5)
            stop.set()
            await asyncio.gather(*tasks)

    asyncio.run(load())
    server.proc.wait(10)
    assert server.proc.returncode == -signal.SIGKILL
    assert len(acknowledged) >= 300
    assert refused  # the kill came mid-load

    with connect(db_url) as conn:
        wait_for_other_backends(conn, "the killed server's backends to end")
        rows = dict(
            conn.execute(
                "SELECT action_id::text, emissions_saved_lbs FROM bulk_sync.user_actions"
                " WHERE verified AND NOT revoked"
            ).fetchall()
        )
        missing = [a for a in acknowledged if a not in rows]
        assert not missing, f"{len(missing)} actions answered 200 are not in the ledger"
        assert all(rows[a] == sent[a] for a in rows)
        total = assert_exact_totals(conn)
        assert Decimal(total) == sum(rows.values(), Decimal(0))
        assert sum((sent[a] for a in acknowledged), Decimal(0)) <= Decimal(total)


def test_a_batch_runs_under_the_role_of_each_of_its_requests(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Requests of an admin token and of a writer token, waiting together, go out in batches
    of one level each (``SET LOCAL ROLE`` holds for a whole transaction)."""
    sent: list[tuple[int, int]] = []

    async def execute(
        pool: object, level: int, statement: str, params: dict[str, str]
    ) -> list[tuple[Any, ...]]:
        if statement == serve.BATCH_SQL:
            count = len(json.loads(params["body"])["actions"])
            sent.append((level, count))
            return [(False, f'"{level}"')] * count
        sent.append((level, 1))
        return [(f'"{level}"',)]

    monkeypatch.setattr(serve, "_execute", execute)
    levels = [serve.WRITER] * 3 + [serve.ADMIN] * 2 + [serve.WRITER] * 2

    async def log_all() -> list[str]:
        coalescer = serve.Coalescer(pool=None, max_actions=100)  # type: ignore[arg-type]
        return await asyncio.gather(*(coalescer.log(level, "{}") for level in levels))

    answers = asyncio.run(log_all())
    assert answers == [f'"{level}"' for level in levels]
    assert sent == [(serve.WRITER, 3), (serve.ADMIN, 2), (serve.WRITER, 2)]
