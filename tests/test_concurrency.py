"""Exact totals under real parallel connections (contract §2 invariant, §3.2, §3.3).

Every test here opens one connection per thread against a real database and
checks, afterwards, that the global total, SUM(user_stats) and SUM(counted
actions) are exactly equal, and equal to what Python computed with Decimal.
"""

from __future__ import annotations

import random
import threading
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any, TypeVar

import psycopg
import pytest
from psycopg.types.json import Jsonb

from helpers import (
    action,
    amount,
    assert_exact_totals,
    bulk_backfill,
    connect,
    decimal_sum,
    is_retryable,
    log_action,
    logged_at,
    new_id,
    per_user_stats,
    random_amount,
    reconcile,
    sqlstate,
    wait_for,
)

R = TypeVar("R")  # one round of a lockstep test

THREADS = 16
ACTIONS_PER_THREAD = 150
SHARED_USERS = 8
OWN_USERS_PER_THREAD = 3


def _run_threads(count: int, target: Callable[[int], None]) -> None:
    """Run target(i) on `count` threads; re-raise the first failure."""
    errors: list[BaseException] = []

    def guarded(index: int) -> None:
        try:
            target(index)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=guarded, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
        assert not thread.is_alive(), "a worker thread hung"
    if errors:
        raise errors[0]


def test_concurrent_inserts_keep_exact_totals(db_url: str) -> None:
    """The seed's test: 16 connections log verified actions for shared and own users at once."""
    shared_users = [new_id() for _ in range(SHARED_USERS)]
    own_users = [[new_id() for _ in range(OWN_USERS_PER_THREAD)] for _ in range(THREADS)]
    plans: list[list[dict[str, Any]]] = []
    for t in range(THREADS):
        rng = random.Random(1000 + t)
        plan = []
        for i in range(ACTIONS_PER_THREAD):
            user = rng.choice(shared_users) if rng.random() < 0.6 else rng.choice(own_users[t])
            plan.append(action(new_id(), user, random_amount(rng), logged_at(t * 1000 + i)))
        plans.append(plan)

    start = threading.Barrier(THREADS)
    statuses: list[Counter[str]] = [Counter() for _ in range(THREADS)]

    def writer(t: int) -> None:
        with connect(db_url) as conn:
            start.wait()
            for request in plans[t]:
                response = log_action(conn, request)
                statuses[t][response["status"]] += 1
                assert response["emissions_lbs"] == request["lbs"]

    _run_threads(THREADS, writer)

    sent = [request for plan in plans for request in plan]
    expected_total = decimal_sum(Decimal(r["lbs"]) for r in sent)
    expected_users: dict[str, Decimal] = defaultdict(Decimal)
    expected_counts: Counter[str] = Counter()
    for r in sent:
        expected_users[r["user_id"]] += Decimal(r["lbs"])
        expected_counts[r["user_id"]] += 1

    assert sum(statuses, Counter()) == Counter({"inserted": THREADS * ACTIONS_PER_THREAD})
    with connect(db_url) as conn:
        assert_exact_totals(conn, expected_total)
        stats = per_user_stats(conn)
        assert stats == {
            user: (amount(total), expected_counts[user]) for user, total in expected_users.items()
        }
        assert conn.execute("SELECT count(*) FROM bulk_sync.user_actions").fetchone()[0] == len(
            sent
        )
        result = reconcile(conn)
        assert result["in_sync"] is True
        assert result["user_stats_sum"] == amount(expected_total)


# --------------------------------------------------------------------------- mixed load


@dataclass
class Tally:
    """What one writer thread saw."""

    statuses: Counter[str] = field(default_factory=Counter)
    inserted: int = 0  # log_action "inserted" + bulk inserted_count
    verified: int = 0  # log_action "verified" + verify_action "verified" + bulk verified_count
    revoked: Counter[str] = field(default_factory=Counter)  # action_id -> "revoked" responses
    retries: int = 0


MIXED_WRITERS = 8
MIXED_OPS = 400
POOL_SIZE = 400
POOL_USERS = 24


def test_mixed_writers_with_concurrent_reconcile(db_url: str) -> None:
    """8 writers log, resubmit, verify, revoke and bulk-load shared actions; reconcile loops.

    Every reconcile must report in_sync (no false discrepancy) and correct nothing; afterwards
    the totals are exact and every action was inserted once, verified at most once, revoked at
    most once.
    """
    rng = random.Random(42)
    users = [new_id() for _ in range(POOL_USERS)]
    # Every thread sends the same facts for an action_id: overlap, never a BS002 conflict.
    pool = [
        {
            "action_id": new_id(),
            "user_id": rng.choice(users),
            "lbs": amount(random_amount(rng)),
            "logged_at": logged_at(i),
        }
        for i in range(POOL_SIZE)
    ]
    facts = {a["action_id"]: a for a in pool}

    start = threading.Barrier(MIXED_WRITERS + 1)
    done = threading.Event()
    tallies = [Tally() for _ in range(MIXED_WRITERS)]
    reconciles: list[dict[str, Any]] = []
    reconcile_retries = [0]

    def call_with_retry(tally: Tally, fn: Callable[[], Any]) -> Any:
        while True:
            try:
                return fn()
            except psycopg.Error as exc:
                if is_retryable(exc):
                    tally.retries += 1
                    continue
                raise

    def writer(t: int) -> None:
        wrng = random.Random(t)
        tally = tallies[t]
        with connect(db_url) as conn:
            start.wait()
            for _ in range(MIXED_OPS):
                op = wrng.choices(
                    ["log", "resubmit", "verify", "revoke", "bulk"], weights=[4, 2, 2, 1, 1]
                )[0]
                chosen = wrng.choice(pool)
                action_id = chosen["action_id"]
                try:
                    if op in ("log", "resubmit"):
                        request = dict(chosen, verified=wrng.random() < 0.5)
                        response = call_with_retry(tally, lambda r=request: log_action(conn, r))
                        tally.statuses[f"log:{response['status']}"] += 1
                        if response["status"] == "inserted":
                            tally.inserted += 1
                        elif response["status"] == "verified":
                            tally.verified += 1
                    elif op == "verify":
                        response = call_with_retry(
                            tally,
                            lambda a=action_id: conn.execute(
                                "SELECT bulk_sync.verify_action(%s, 'tester')", (a,)
                            ).fetchone()[0],
                        )
                        tally.statuses[f"verify:{response['status']}"] += 1
                        if response["status"] == "verified":
                            tally.verified += 1
                    elif op == "revoke":
                        response = call_with_retry(
                            tally,
                            lambda a=action_id: conn.execute(
                                "SELECT bulk_sync.revoke_action(%s, 'test revocation', 'tester')",
                                (a,),
                            ).fetchone()[0],
                        )
                        tally.statuses[f"revoke:{response['status']}"] += 1
                        if response["status"] == "revoked":
                            tally.revoked[action_id] += 1
                    else:
                        members = wrng.sample(pool, wrng.randint(3, 12))
                        batch = [dict(a, verified=wrng.random() < 0.6) for a in members]
                        batch += [dict(b) for b in wrng.sample(batch, 2)]  # in-batch duplicates
                        wrng.shuffle(batch)
                        response = call_with_retry(tally, lambda b=batch: bulk_backfill(conn, b))
                        tally.statuses["bulk"] += 1
                        tally.inserted += response["inserted_count"]
                        tally.verified += response["verified_count"]
                except psycopg.Error as exc:
                    # An action not logged yet (BS004) or already revoked (BS006) is a legitimate
                    # outcome of the race; anything else is a failure.
                    if sqlstate(exc) not in ("BS004", "BS006"):
                        raise
                    tally.statuses[f"{op}:{sqlstate(exc)}"] += 1

    def reconciler() -> None:
        with connect(db_url) as conn:
            start.wait()
            while not done.is_set() or len(reconciles) < 3:
                try:
                    reconciles.append(reconcile(conn, {"performed_by": "concurrency-test"}))
                except psycopg.Error as exc:
                    if not is_retryable(exc):
                        raise
                    reconcile_retries[0] += 1

    errors: list[BaseException] = []

    def guarded(fn: Callable[[], None]) -> Callable[[], None]:
        def run() -> None:
            try:
                fn()
            except BaseException as exc:
                errors.append(exc)
                done.set()

        return run

    reconcile_thread = threading.Thread(target=guarded(reconciler))
    reconcile_thread.start()
    try:
        _run_threads(MIXED_WRITERS, writer)
    finally:
        done.set()
        reconcile_thread.join(timeout=120)
    assert not reconcile_thread.is_alive()
    if errors:
        raise errors[0]

    statuses = sum((t.statuses for t in tallies), Counter())
    assert len(reconciles) >= 3, statuses
    out_of_sync = [r for r in reconciles if r["in_sync"] is not True]
    assert out_of_sync == [], f"reconcile saw a false discrepancy: {out_of_sync[:3]}"

    with connect(db_url) as conn:
        assert (
            conn.execute("SELECT count(*) FROM bulk_sync.emissions_corrections").fetchone()[0] == 0
        )
        rows = conn.execute(
            "SELECT action_id::text, user_id::text, emissions_saved_lbs::text, logged_at,"
            " verified, revoked FROM bulk_sync.user_actions"
        ).fetchall()
        # Facts stored exactly as sent, once per action_id.
        for action_id, user_id, lbs, _at, _verified, _revoked in rows:
            assert (user_id, lbs) == (facts[action_id]["user_id"], facts[action_id]["lbs"])
        counted = [r for r in rows if r[4] and not r[5]]
        expected_total = decimal_sum(Decimal(facts[r[0]]["lbs"]) for r in counted)
        assert_exact_totals(conn, expected_total)

        expected_users: dict[str, Decimal] = defaultdict(Decimal)
        expected_counts: Counter[str] = Counter()
        for r in counted:
            expected_users[r[1]] += Decimal(r[2])
            expected_counts[r[1]] += 1
        stats = per_user_stats(conn)
        for user in set(stats) | set(expected_users):
            want = (amount(expected_users.get(user, Decimal(0))), expected_counts.get(user, 0))
            assert stats.get(user, ("0.000000", 0)) == want, user

        # Exactly-once transitions, as the writers were told.
        assert sum(t.inserted for t in tallies) == len(rows)
        verified_transitions = conn.execute(
            "SELECT count(*) FROM bulk_sync.action_transitions WHERE to_status = 'verified'"
        ).fetchone()[0]
        assert sum(t.verified for t in tallies) == verified_transitions
        revoked_responses = sum((t.revoked for t in tallies), Counter())
        revoked_rows = {r[0] for r in rows if r[5]}
        assert set(revoked_responses) == revoked_rows
        assert set(revoked_responses.values()) <= {1}
        per_action = conn.execute(
            "SELECT action_id, to_status, count(*) FROM bulk_sync.action_transitions"
            " GROUP BY 1, 2 HAVING count(*) > 1"
        ).fetchall()
        assert per_action == []
        final = reconcile(conn)
        assert final["in_sync"] is True

    # The load really mixed every operation (otherwise the test proves less than it claims).
    for kind in ("log:inserted", "log:duplicate", "verify:verified", "revoke:revoked", "bulk"):
        assert statuses[kind] > 0, statuses
    retries = sum(t.retries for t in tallies) + reconcile_retries[0]
    print(f"statuses={dict(statuses)} reconciles={len(reconciles)} retries={retries}")


def test_reconcile_fixes_drift_under_load_without_losing_writes(db_url: str) -> None:
    """Drift is injected, then reconcile runs in a loop while 6 writers log for the drifted users.

    The fix must be exactly the injected drift (one global correction, one per drifted user),
    no write may be lost, and no later run may find anything to correct.
    """
    rng = random.Random(99)
    users = [new_id() for _ in range(12)]
    drifted = sorted(users[:5])
    global_drift = Decimal("123.456789")
    user_drift = {u: Decimal(f"{i + 1}.000001") for i, u in enumerate(drifted)}
    with connect(db_url) as conn:
        seed = [action(new_id(), u, random_amount(rng), logged_at(0)) for u in users]
        bulk_backfill(conn, seed)
        conn.execute(
            "UPDATE bulk_sync.global_emissions SET total_lbs_saved = total_lbs_saved + %s"
            " WHERE id = 1",
            (global_drift,),
        )
        for user, drift in user_drift.items():
            conn.execute(
                "UPDATE bulk_sync.user_stats SET total_emissions_lbs = total_emissions_lbs + %s"
                " WHERE user_id = %s",
                (drift, user),
            )
    sent: list[list[dict[str, Any]]] = [[] for _ in range(6)]
    start = threading.Barrier(7)
    results: list[dict[str, Any]] = []
    done = threading.Event()

    def writer(t: int) -> None:
        wrng = random.Random(t)
        with connect(db_url) as conn:
            start.wait()
            for i in range(150):
                request = action(new_id(), wrng.choice(users), random_amount(wrng), logged_at(i))
                log_action(conn, request)
                sent[t].append(request)

    def reconciler() -> None:
        with connect(db_url) as conn:
            start.wait()
            while not done.is_set() or len(results) < 3:
                results.append(reconcile(conn, {"performed_by": "drift-test"}))

    rec = threading.Thread(target=reconciler)
    rec.start()
    try:
        _run_threads(6, writer)
    finally:
        done.set()
        rec.join(timeout=120)
    assert not rec.is_alive()

    fixing = [r for r in results if not r["in_sync"]]
    assert len(fixing) == 1, f"{len(fixing)} runs found drift"
    assert results[0] is fixing[0], "the first run must find (and fix) the injected drift"
    assert fixing[0]["fixed"] is True
    assert fixing[0]["discrepancy"] == amount(global_drift)
    assert fixing[0]["users_out_of_sync"] == len(drifted)

    expected = decimal_sum(Decimal(a["lbs"]) for a in seed)
    expected += decimal_sum(Decimal(r["lbs"]) for batch in sent for r in batch)
    with connect(db_url) as conn:
        assert_exact_totals(conn, expected)
        corrections = conn.execute(
            "SELECT metadata->>'scope', metadata->>'user_id', discrepancy::text,"
            " reconciliation_run_id::text FROM bulk_sync.emissions_corrections ORDER BY 1, 2"
        ).fetchall()
        run_id = fixing[0]["run_id"]
        assert corrections == [
            ("global", None, amount(global_drift), run_id),
            *(("user", u, amount(user_drift[u]), run_id) for u in drifted),
        ]
        assert reconcile(conn)["in_sync"] is True


# --------------------------------------------------------------------------- idempotency keys


def test_concurrent_identical_backfills_apply_once(db_url: str) -> None:
    """8 connections send the same batch with the same idempotency key at the same moment."""
    rng = random.Random(7)
    users = [new_id() for _ in range(20)]
    batch = [
        action(new_id(), rng.choice(users), random_amount(rng), logged_at(i), rng.random() < 0.8)
        for i in range(300)
    ]
    request = Jsonb({"actions": batch, "idempotency_key": "concurrent-key-1"})
    callers = 8
    start = threading.Barrier(callers)
    responses: list[dict[str, Any]] = [{} for _ in range(callers)]

    def caller(i: int) -> None:
        with connect(db_url) as conn:
            start.wait()
            responses[i] = conn.execute(
                "SELECT bulk_sync.bulk_backfill(%s)", (request,)
            ).fetchone()[0]

    _run_threads(callers, caller)

    applied = [r for r in responses if r["replayed"] is False]
    replayed = [r for r in responses if r["replayed"] is True]
    assert len(applied) == 1
    assert len(replayed) == callers - 1
    first = applied[0]
    assert first["inserted_count"] == len(batch)
    for r in replayed:
        assert {k: v for k, v in r.items() if k != "replayed"} == {
            k: v for k, v in first.items() if k != "replayed"
        }

    expected = decimal_sum(Decimal(a["lbs"]) for a in batch if a["verified"])
    assert first["global_total_lbs"] == amount(expected)
    with connect(db_url) as conn:
        assert_exact_totals(conn, expected)
        assert conn.execute("SELECT count(*) FROM bulk_sync.user_actions").fetchone()[0] == len(
            batch
        )


# --------------------------------------------------------------------------- lock order


def _in_lockstep(
    db_url: str, rounds: Sequence[R], write: Callable[[psycopg.Connection, int, R], Any]
) -> list[str]:
    """Run ``write(conn, side, round)`` for each round on two connections (sides 0 and 1), both
    sides starting each round together. A deadlock victim retries its write until it is in;
    the deadlocks seen are returned."""
    step = threading.Barrier(2)
    deadlocks: list[str] = []

    def side(index: int) -> None:
        try:
            with connect(db_url) as conn:
                conn.execute("SET deadlock_timeout = '20ms'")  # detect quickly, keep it short
                for item in rounds:
                    step.wait(timeout=60)
                    while True:
                        try:
                            write(conn, index, item)
                            break
                        except psycopg.Error as exc:
                            if not is_retryable(exc):
                                raise
                            deadlocks.append(f"{exc.sqlstate}: {exc.diag.message_detail}")
        except BaseException:
            step.abort()  # do not leave the other side waiting at the barrier
            raise

    _run_threads(2, side)
    return deadlocks


def test_overlapping_bulk_backfills_do_not_deadlock(db_url: str) -> None:
    """Two bulk calls that each add to some users and verify others' pending actions, crosswise.

    docs/DESIGN.md promises one lock order everywhere (user_stats rows by user_id, then action
    rows, then a slot), which makes deadlocks impossible. Each call here touches the two
    groups of users in different statements (the INSERT of new actions, then the UPDATE that
    verifies known ones), so the order has to hold across both statements for this to pass.
    """
    rounds, pairs = 30, 20
    plans: list[tuple[list[dict[str, Any]], list[dict[str, Any]]]] = []
    with connect(db_url) as conn:
        for r in range(rounds):
            lows, highs = [], []
            pending_lows, pending_highs = [], []
            for _ in range(pairs):
                low, high = sorted([new_id(), new_id()])
                lows.append(low)
                highs.append(high)
                pending_lows.append(action(new_id(), low, "1.000000", logged_at(r), False))
                pending_highs.append(action(new_id(), high, "1.000000", logged_at(r), False))
            bulk_backfill(conn, pending_lows + pending_highs)
            plans.append(
                (
                    [action(new_id(), h, "2.000000", logged_at(r)) for h in highs]
                    + [dict(p, verified=True) for p in pending_lows],
                    [action(new_id(), lo, "2.000000", logged_at(r)) for lo in lows]
                    + [dict(p, verified=True) for p in pending_highs],
                )
            )
    deadlocks = _in_lockstep(db_url, plans, lambda conn, i, plan: bulk_backfill(conn, plan[i]))
    expected = Decimal(rounds * pairs * (2 + 2 + 1 + 1))
    with connect(db_url) as conn:
        assert_exact_totals(conn, expected)
    assert deadlocks == [], f"{len(deadlocks)} deadlocks in {rounds} rounds: {deadlocks[0]}"


SINGLE_WRITERS: dict[str, Callable[[psycopg.Connection, dict[str, Any]], Any]] = {
    "log_action": lambda conn, pending: log_action(conn, dict(pending, verified=True)),
    "verify_action": lambda conn, pending: conn.execute(
        "SELECT bulk_sync.verify_action(%s)", (pending["action_id"],)
    ),
}


@pytest.mark.parametrize("single", sorted(SINGLE_WRITERS))
def test_bulk_and_single_action_writers_do_not_deadlock(db_url: str, single: str) -> None:
    """A bulk call and a single-action call verify the same pending action at the same moment.

    Both must take their locks in the one documented order (docs/DESIGN.md: user_stats rows,
    then action rows, then a slot); a bulk call that locked the action rows before the users
    would deadlock against log_action / verify_action, which lock the user first.
    """
    rounds, padding = 120, 30
    plans: list[tuple[dict[str, Any], list[dict[str, Any]]]] = []
    with connect(db_url) as conn:
        for r in range(rounds):
            pending = action(new_id(), new_id(), "1.000000", logged_at(r), verified=False)
            # Other pending actions in the same bulk call widen the window between its locks.
            others = [
                action(new_id(), new_id(), "1.000000", logged_at(r), verified=False)
                for _ in range(padding)
            ]
            bulk_backfill(conn, [pending, *others])
            plans.append((pending, others))
    write_one = SINGLE_WRITERS[single]

    def write(
        conn: psycopg.Connection, index: int, plan: tuple[dict[str, Any], list[dict[str, Any]]]
    ) -> None:
        pending, others = plan
        if index == 0:
            bulk_backfill(conn, [dict(a, verified=True) for a in [*others, pending]])
        else:
            write_one(conn, pending)

    deadlocks = _in_lockstep(db_url, plans, write)
    with connect(db_url) as conn:
        assert_exact_totals(conn, Decimal(rounds * (padding + 1)))
    assert deadlocks == [], f"{len(deadlocks)} deadlocks in {rounds} rounds: {deadlocks[0]}"


def test_log_actions_one_by_one_take_their_users_in_order(db_url: str) -> None:
    """Two log_actions calls fall back to one action at a time, over the same users crosswise.

    Each batch holds an action that would carry its user's total past NUMERIC(30,6), so its
    set-based attempt fails and every action is logged on its own, in array order: one batch
    goes through the users upwards, the other downwards. Each log_action keeps its user until
    the transaction ends, so the fallback must take all of the batch's users first, in user_id
    order, as one call does (db/222); taken action by action, the two batches would each hold
    a user the other waits for.
    """
    rounds = 20
    users = sorted(new_id() for _ in range(20))
    big_user = new_id()
    limit = Decimal("999999999999999999999000.000000")
    with connect(db_url) as conn:
        before = Decimal(assert_exact_totals(conn))
        log_action(conn, action(new_id(), big_user, amount(limit), logged_at(0)))
    batches = [
        [
            [action(new_id(), big_user, "1000.000000", logged_at(r))]
            + [action(new_id(), u, "0.000001", logged_at(r)) for u in order]
            for order in (users, users[::-1])
        ]
        for r in range(rounds)
    ]
    answers: list[list[tuple[str, str]]] = []

    def write(conn: psycopg.Connection, index: int, pair: list[list[dict[str, Any]]]) -> None:
        request = Jsonb({"actions": pair[index]})
        response = conn.execute("SELECT bulk_sync.log_actions(%s)", (request,)).fetchone()[0]
        answers.append(
            [(r.get("status") or r["error"]["code"], r["action_id"]) for r in response["results"]]
        )

    deadlocks = _in_lockstep(db_url, batches, write)
    assert deadlocks == [], f"{len(deadlocks)} deadlocks in {rounds} rounds: {deadlocks[0]}"
    expected = sorted(
        [("22003", batch[0]["action_id"])] + [("inserted", a["action_id"]) for a in batch[1:]]
        for pair in batches
        for batch in pair
    )
    assert sorted(answers) == expected
    with connect(db_url) as conn:
        assert_exact_totals(conn, before + limit + Decimal("0.000001") * 2 * rounds * len(users))
        stats = per_user_stats(conn)
        assert stats[big_user] == (amount(limit), 1)
        each = (amount(Decimal("0.000001") * 2 * rounds), 2 * rounds)  # one action a batch
        assert {u: stats[u] for u in users} == dict.fromkeys(users, each)


def _wait_on_lock(db_url: str, pid: int, what: str) -> None:
    """Wait until backend ``pid`` waits for a lock."""
    with connect(db_url) as watcher:
        wait_for(
            lambda: watcher.execute(
                "SELECT wait_event_type = 'Lock' FROM pg_stat_activity WHERE pid = %s", (pid,)
            ).fetchone()[0],
            timeout=30,
            what=what,
        )


def _commit_under(db_url: str, writer: psycopg.Connection, pid: int, call: Any, name: str) -> None:
    """Run ``call`` in a thread until its backend ``pid`` waits for a lock that ``writer``'s open
    transaction holds, then commit ``writer`` and let ``call`` finish."""
    thread = threading.Thread(target=call)
    thread.start()
    _wait_on_lock(db_url, pid, f"{name} to wait on the uncommitted action")
    writer.commit()
    thread.join(timeout=60)
    assert not thread.is_alive(), f"{name} hung"


def test_log_actions_answers_an_action_another_writer_stores_meanwhile(db_url: str) -> None:
    """log_actions' one statement meets a new action that another transaction is inserting.

    The batch cannot see the other writer's uncommitted action, so it takes it for new and its
    INSERT waits on it. Once the other writer commits, the set-based attempt must leave nothing
    behind, and each action is answered as a separate log_action would answer it then.
    """
    user, other_user = new_id(), new_id()
    raced = action(new_id(), user, "2.500000", logged_at(1), verified=False)
    fresh = action(new_id(), other_user, "1.250000", logged_at(2))
    with connect(db_url) as conn:
        before = Decimal(assert_exact_totals(conn))
    results: list[dict[str, Any]] = []
    errors: list[BaseException] = []

    with connect(db_url, autocommit=False) as writer, connect(db_url) as batcher:
        assert log_action(writer, raced)["status"] == "inserted"  # uncommitted, holds the action_id
        batch_pid = batcher.info.backend_pid

        def call_batch() -> None:
            request = {"actions": [fresh, dict(raced, verified=True)]}
            try:
                row = batcher.execute("SELECT bulk_sync.log_actions(%s)", (Jsonb(request),))
                results.extend(row.fetchone()[0]["results"])
            except BaseException as exc:
                errors.append(exc)

        _commit_under(db_url, writer, batch_pid, call_batch, "log_actions")
    if errors:
        raise errors[0]

    # What log_action would have answered for each, in array order, after the writer committed.
    assert [(r["success"], r["status"], r["action_id"]) for r in results] == [
        (True, "inserted", fresh["action_id"]),
        (True, "verified", raced["action_id"]),
    ]
    assert results[0]["user_total_lbs"] == "1.250000"
    assert results[1]["user_total_lbs"] == "2.500000"
    assert results[1]["global_total_lbs"] == amount(before + Decimal("3.750000"))
    with connect(db_url) as conn:
        assert_exact_totals(conn, before + Decimal("3.750000"))
        assert per_user_stats(conn)[user] == ("2.500000", 1)
        assert (
            conn.execute(
                "SELECT count(*) FROM bulk_sync.action_transitions WHERE action_id = %s",
                (raced["action_id"],),
            ).fetchone()[0]
            == 1
        )


@pytest.mark.parametrize("stored_as", ["pending, same facts", "other facts"])
def test_bulk_backfill_finds_an_action_another_writer_stores_meanwhile(
    db_url: str, stored_as: str
) -> None:
    """A batch of new actions is applied straight from the request (no staging) unless one is
    stored. Here one is being stored by another transaction, which the batch cannot see: its
    INSERT waits on it. Once the writer commits, the direct attempt must leave nothing behind and
    the batch must come out as if the action had been stored before the call: the pending action
    verified by the batch, or BS002 with nothing applied.
    """
    user, other_user = new_id(), new_id()
    fresh = action(new_id(), other_user, "1.250000", logged_at(2))
    raced = action(new_id(), user, "2.500000", logged_at(1))
    if stored_as == "other facts":
        stored = dict(raced, lbs="9.000000")
    else:
        stored = dict(raced, verified=False)
    with connect(db_url) as conn:
        before = Decimal(assert_exact_totals(conn))
    outcome: list[Any] = []

    with connect(db_url, autocommit=False) as writer, connect(db_url) as batcher:
        assert log_action(writer, stored)["status"] == "inserted"  # uncommitted: holds the id
        batch_pid = batcher.info.backend_pid

        def call_batch() -> None:
            try:
                outcome.append(bulk_backfill(batcher, [fresh, raced]))
            except psycopg.Error as exc:
                outcome.append(exc)

        _commit_under(db_url, writer, batch_pid, call_batch, "bulk_backfill")

    (result,) = outcome
    with connect(db_url) as conn:
        if stored_as == "other facts":
            assert isinstance(result, psycopg.Error), result
            assert sqlstate(result) == "BS002"
            assert "actions[1]" in str(result)
            assert_exact_totals(conn, before + Decimal("9.000000"))
            assert other_user not in per_user_stats(conn)
        else:
            counts = (result["inserted_count"], result["verified_count"], result["skipped_count"])
            assert counts == (1, 1, 0)
            assert result["affected_users"] == 2
            assert result["global_total_lbs"] == amount(before + Decimal("3.750000"))
            assert_exact_totals(conn, before + Decimal("3.750000"))
            assert per_user_stats(conn)[user] == ("2.500000", 1)
            assert per_user_stats(conn)[other_user] == ("1.250000", 1)
        assert conn.execute("SELECT count(*) FROM bulk_sync._precount_claims").fetchone()[0] == 0


def test_bulk_backfill_does_not_wait_for_a_stored_action_being_revoked(db_url: str) -> None:
    """A batch that holds a stored action must not wait for a transaction that is revoking it:
    the stored action is found (a plain read) and skipped, as it would be at any other moment.
    Inserting the batch without looking first would wait on that action's key while holding the
    batch's users and slot, until the revoking transaction ends (a deadlock, if it then needs
    them)."""
    user, other = new_id(), new_id()  # the revoker holds its user's row, as any writer would
    stored = action(new_id(), user, "5.000000", logged_at(1))
    batch = [
        action(new_id(), other, "1.000000", logged_at(2)),
        stored,
        action(new_id(), other, "2.000000", logged_at(3)),
    ]
    with connect(db_url) as conn:
        assert log_action(conn, stored)["status"] == "inserted"
        before = Decimal(assert_exact_totals(conn))

    # The revoker holds its slot too; the loader claims another if both have the same (_take_slot).
    with connect(db_url, autocommit=False) as revoker, connect(db_url) as loader:
        revoked = revoker.execute(
            "SELECT bulk_sync.revoke_action(%s, 'test')", (stored["action_id"],)
        ).fetchone()[0]
        assert revoked["status"] == "revoked"  # uncommitted
        loader.execute("SET lock_timeout = '2s'")  # a wait fails the call, and the test
        result = bulk_backfill(loader, batch)
        revoker.commit()

    assert (result["inserted_count"], result["skipped_count"]) == (2, 1)
    with connect(db_url) as conn:
        assert_exact_totals(conn, before - Decimal("5.000000") + Decimal("3.000000"))
        assert per_user_stats(conn)[other] == ("3.000000", 2)


def _backend(
    db_url: str, wanted: Callable[[int], bool], autocommit: bool = True
) -> psycopg.Connection:
    """A connection whose backend's slot (pid % 64) is wanted: backends are opened until one is."""
    opened = [connect(db_url, autocommit=autocommit)]
    while not wanted(opened[-1].info.backend_pid % 64):
        opened.append(connect(db_url, autocommit=autocommit))
    for conn in opened[:-1]:
        conn.close()
    return opened[-1]


def _slot_claimed(watcher: psycopg.Connection, conn: psycopg.Connection, slot: int) -> bool:
    """Whether ``conn``'s transaction holds the claim on global slot ``slot`` (db/113)."""
    return bool(
        watcher.execute(
            "SELECT EXISTS (SELECT FROM pg_locks WHERE locktype = 'advisory' AND granted"
            " AND pid = %s AND classid = 1651862635 AND objid = 100 + %s AND objsubid = 2)",
            (conn.info.backend_pid, slot),
        ).fetchone()[0]
    )


def test_a_transaction_of_several_calls_never_makes_a_lone_call_wait_for_its_slot(
    db_url: str,
) -> None:
    """A transaction that logs two actions holds its slot from the first on, and then takes the
    second's user. A lone call on a backend with the same home slot (pid % 64) holds that user
    and then wants a slot: had it waited for this one, each would wait for the other (40P01),
    with users that have nothing in common. It claims a free slot instead and commits at once."""
    user, other = new_id(), new_id()
    with connect(db_url) as conn:
        before = Decimal(assert_exact_totals(conn))
    with connect(db_url, autocommit=False) as several, connect(db_url) as watcher:
        slot = several.info.backend_pid % 64
        with _backend(db_url, lambda s: s == slot) as lone:
            lone.execute("SET lock_timeout = '10s'")  # a wait for the slot fails the test
            results = [log_action(several, action(new_id(), user, "1.000000", logged_at(1)))]
            assert _slot_claimed(watcher, several, slot)
            results.append(log_action(lone, action(new_id(), other, "2.000000", logged_at(2))))
            results.append(log_action(several, action(new_id(), other, "4.000000", logged_at(3))))
            several.commit()
            assert [r["status"] for r in results] == ["inserted"] * 3

    with connect(db_url) as conn:
        assert_exact_totals(conn, before + Decimal("7.000000"))
        assert per_user_stats(conn)[other] == ("6.000000", 2)


def test_a_writer_waits_for_its_own_slot_only_when_every_slot_is_claimed(db_url: str) -> None:
    """More than 64 transactions writing at once: a session claims all 64 slots, and a writer
    then waits for its own (pid % 64), not for any other, and goes on when the claims end."""
    user = new_id()
    with connect(db_url) as conn:
        before = Decimal(assert_exact_totals(conn))
    with connect(db_url, autocommit=False) as claimer, connect(db_url) as writer:
        claimer.execute(
            "SELECT pg_advisory_xact_lock(1651862635, 100 + s) FROM generate_series(0, 63) AS s"
        )
        outcome: list[Any] = []
        thread = threading.Thread(
            target=lambda: outcome.append(
                log_action(writer, action(new_id(), user, "3.000000", logged_at(1)))
            )
        )
        thread.start()
        wait_for(
            lambda: bool(
                claimer.execute(
                    "SELECT EXISTS (SELECT FROM pg_locks WHERE locktype = 'advisory'"
                    " AND NOT granted AND pid = %s AND objid = 100 + %s)",
                    (writer.info.backend_pid, writer.info.backend_pid % 64),
                ).fetchone()[0]
            ),
            30,
            what="the writer to wait for its own slot",
        )
        assert not outcome
        claimer.rollback()
        thread.join(timeout=60)
        assert not thread.is_alive(), "the writer hung"

    assert outcome[0]["status"] == "inserted"
    with connect(db_url) as conn:
        assert_exact_totals(conn, before + Decimal("3.000000"))


def test_a_writer_on_a_waiting_chunks_slot_claims_another(db_url: str) -> None:
    """A bulk chunk that only adds actions claims its slot with its users, before its action rows
    (docs/DESIGN.md). While it waits for a session that holds its first action, a writer with the
    same home slot (pid % 64) stores the chunk's second action_id for another user. Had the writer
    waited for the slot, it would hold an action the chunk was to wait for: a cycle. It claims a
    free slot and commits at once; the chunk, once it goes on, fails with BS002 as after any race.
    """
    owner, writer_user, holder_user = new_id(), new_id(), new_id()
    first, second = sorted((new_id(), new_id()))  # the chunk inserts in action_id order
    with connect(db_url) as conn:
        before = Decimal(assert_exact_totals(conn))

    with connect(db_url) as chunk, connect(db_url) as watcher:
        slot = chunk.info.backend_pid % 64
        holder = _backend(db_url, lambda s: s != slot, autocommit=False)
        writer = _backend(db_url, lambda s: s == slot)
        writer.execute("SET lock_timeout = '10s'")  # a wait for the slot fails the test

        def waiting(conn: psycopg.Connection) -> bool:
            row = watcher.execute(
                "SELECT wait_event_type = 'Lock' FROM pg_stat_activity WHERE pid = %s",
                (conn.info.backend_pid,),
            ).fetchone()
            return bool(row and row[0])

        outcome: dict[str, Any] = {}

        def load_chunk() -> None:
            try:
                outcome["chunk"] = bulk_backfill(chunk, load)
            except psycopg.Error as exc:
                outcome["chunk"] = exc

        with holder, writer:
            held = action(first, holder_user, "4.000000", logged_at(1))
            assert log_action(holder, held)["status"] == "inserted"  # uncommitted
            load = [
                action(first, owner, "1.000000", logged_at(2)),
                action(second, owner, "2.000000", logged_at(3)),
            ]
            loading = threading.Thread(target=load_chunk)
            loading.start()
            wait_for(lambda: waiting(chunk), 30, what="the chunk to wait on the holder")
            assert _slot_claimed(watcher, chunk, slot)
            stored = action(second, writer_user, "8.000000", logged_at(4))
            assert log_action(writer, stored)["status"] == "inserted"
            assert waiting(chunk)  # still: the writer went past it
            holder.rollback()
            loading.join(timeout=60)
            assert not loading.is_alive(), "the chunk hung"

    assert isinstance(outcome["chunk"], psycopg.Error), outcome
    assert sqlstate(outcome["chunk"]) == "BS002", outcome["chunk"]
    assert "actions[1]" in str(outcome["chunk"])
    with connect(db_url) as conn:
        assert_exact_totals(conn, before + Decimal("8.000000"))
        assert owner not in per_user_stats(conn)


def test_log_actions_one_by_one_and_a_verification_on_its_slot_both_succeed(db_url: str) -> None:
    """log_actions whose set-based attempt fails (a total would overflow) logs each action on its
    own, in one transaction. A lone verify_action on a backend with the same home slot holds the
    second action's user and then wants a slot. The fallback takes every user first, and the
    verification claims a slot the batch does not hold (_take_slot), so neither waits for what the
    other holds (before both, they met in 40P01) and both succeed, exactly.

    Sessions hold the third user (so that the batch waits with its users taken and the
    verification queues on one of them) and the verified action (so that the verification, once
    it has that user, waits until the batch has gone on to its actions one by one).
    """
    first, second, third = (f"{n}0000000-0000-4000-8000-00000000000{n}" for n in (1, 2, 3))
    pending = new_id()
    big = "900000000000000000000000"  # 9 x 10^23: 2 x 10^23 more and the total overflows
    with connect(db_url) as conn:
        before = Decimal(assert_exact_totals(conn))
        log_action(conn, action(pending, second, "1.000000", logged_at(0), verified=False))
        log_action(conn, action(new_id(), third, big, logged_at(0)))
    batch = {
        "actions": [
            action(new_id(), first, "1.000000", logged_at(1)),
            action(new_id(), second, "2.000000", logged_at(2)),
            action(new_id(), third, "200000000000000000000000", logged_at(3)),
        ]
    }
    with connect(db_url) as watcher:
        batcher = _backend(db_url, lambda s: True)
        slot = batcher.info.backend_pid % 64
        verifier = _backend(db_url, lambda s: s == slot)
        user_holder = connect(db_url, autocommit=False)
        action_holder = connect(db_url, autocommit=False)

        def blocks(holder: psycopg.Connection, waiter: psycopg.Connection) -> bool:
            """Whether ``waiter``'s backend waits for a lock ``holder``'s backend holds."""
            return bool(
                watcher.execute(
                    "SELECT %s = ANY (pg_blocking_pids(%s))",
                    (holder.info.backend_pid, waiter.info.backend_pid),
                ).fetchone()[0]
            )

        outcome: dict[str, Any] = {}

        def start(name: str, conn: psycopg.Connection, sql: str, arg: Any) -> threading.Thread:
            def target() -> None:
                try:
                    outcome[name] = conn.execute(sql, (arg,)).fetchone()[0]
                except psycopg.Error as exc:
                    outcome[name] = exc

            thread = threading.Thread(target=target)
            thread.start()
            return thread

        with batcher, verifier, user_holder, action_holder:
            user_holder.execute(
                "SELECT FROM bulk_sync.user_stats WHERE user_id = %s FOR UPDATE", (third,)
            )
            action_holder.execute(
                "SELECT FROM bulk_sync.user_actions WHERE action_id = %s FOR UPDATE", (pending,)
            )
            batching = start("batch", batcher, "SELECT bulk_sync.log_actions(%s)", Jsonb(batch))
            wait_for(lambda: blocks(user_holder, batcher), 30, what="the batch to wait")
            verifying = start(
                "verify", verifier, "SELECT bulk_sync.verify_action(%s::uuid)", pending
            )
            wait_for(lambda: blocks(batcher, verifier), 30, what="the verification to wait")
            user_holder.rollback()  # the batch goes on, meets the overflow, goes one by one
            # Then either the verification took the second user as the set-based attempt ended,
            # and waits for its action while the batch waits for the user; or the batch took the
            # user first, and the verification waits until it has finished.
            wait_for(
                lambda: (
                    "batch" in outcome
                    or (blocks(verifier, batcher) and blocks(action_holder, verifier))
                ),
                30,
                what="the batch's actions one by one to wait for the verification",
            )
            action_holder.rollback()  # the verification goes on to the slot
            for thread in (batching, verifying):
                thread.join(timeout=60)
                assert not thread.is_alive(), "a writer hung"

    assert not isinstance(outcome["verify"], psycopg.Error), outcome["verify"]
    assert outcome["verify"]["status"] == "verified", outcome["verify"]
    assert not isinstance(outcome["batch"], psycopg.Error), outcome["batch"]
    results = outcome["batch"]["results"]
    assert [r.get("status") for r in results[:2]] == ["inserted", "inserted"], results
    assert results[2]["error"]["code"] == "22003", results[2]
    with connect(db_url) as conn:
        assert_exact_totals(conn, before + Decimal(big) + Decimal("4.000000"))


def test_reconcile_waits_for_a_writer_recreating_a_missing_user_row(db_url: str) -> None:
    """A user's row is gone (drift); while reconcile recreates it, a writer creates it too.
    Reconcile must take the user as writers do, wait for that writer and count its action, not
    overwrite it with the totals it saw before."""
    user = new_id()
    with connect(db_url) as conn:
        log_action(conn, action(new_id(), user, "10", logged_at(0)))
        conn.execute("DELETE FROM bulk_sync.user_stats WHERE user_id = %s", [user])
    results: list[dict[str, Any]] = []
    with connect(db_url, autocommit=False) as writer, connect(db_url) as watcher:
        log_action(writer, action(new_id(), user, "7", logged_at(1)))  # uncommitted: holds the row
        thread = threading.Thread(
            target=lambda: results.append(reconcile(connect(db_url), {"performed_by": "race"}))
        )
        thread.start()
        wait_for(
            lambda: (
                watcher.execute(
                    "SELECT count(*) FROM pg_stat_activity"
                    " WHERE wait_event_type = 'Lock' AND query LIKE '%%reconcile%%'"
                ).fetchone()[0]
                == 1
            ),
            30,
            0.05,
            "reconcile to wait for the writer",
        )
        writer.commit()
        thread.join(timeout=60)
    assert not thread.is_alive()
    assert results[0]["fixed"] is True
    with connect(db_url) as conn:
        stats = conn.execute(
            "SELECT total_emissions_lbs::text, action_count FROM bulk_sync.user_stats"
            " WHERE user_id = %s",
            [user],
        ).fetchone()
        assert stats == ("17.000000", 2)
        assert_exact_totals(conn, Decimal("17"))


# --------------------------------------------------------------------------- the slots' pages

SLOT_PAGES = (
    "SELECT pg_relation_size('bulk_sync._global_slots') / current_setting('block_size')::int"
)


def test_a_long_snapshot_moves_the_slots_into_spare_pages_not_new_ones(db_url: str) -> None:
    """While a snapshot older than a slot's versions lasts, none of them can be pruned: four
    writers fill their slots' pages and each slot moves, several times. Every move lands in one
    of the free pages that 0012 gave the table, and the table does not grow (with no free page,
    each move extends it), so a sum of the slots reads as many pages afterwards as before."""
    with connect(db_url) as conn:
        # Autovacuum does this after the migration: it records the spare pages as free.
        conn.execute("VACUUM bulk_sync._global_slots")
        pages = conn.execute(SLOT_PAGES).fetchone()[0]
        before = Decimal(assert_exact_totals(conn))
    assert pages >= 32

    writers, calls = 4, 300
    sent: list[list[Decimal]] = [[] for _ in range(writers)]
    start = threading.Barrier(writers)

    def writer(t: int) -> None:
        rng = random.Random(7100 + t)
        with connect(db_url) as conn:
            start.wait()
            for i in range(calls):
                lbs = random_amount(rng)
                response = log_action(conn, action(new_id(), new_id(), lbs, logged_at(i)))
                assert response["status"] == "inserted"
                sent[t].append(lbs)

    with connect(db_url, autocommit=False) as holder:
        holder.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
        holder.execute("SELECT count(*) FROM bulk_sync.user_actions").fetchone()
        _run_threads(writers, writer)
        with connect(db_url) as conn:
            moved = conn.execute(
                "SELECT count(DISTINCT (ctid::text::point)[0]) FROM bulk_sync._global_slots"
            ).fetchone()[0]
        holder.rollback()

    with connect(db_url) as conn:
        assert moved > 2, "the slots never left their first pages: nothing was tested"
        assert conn.execute(SLOT_PAGES).fetchone()[0] == pages
        assert_exact_totals(conn, before + decimal_sum(lbs for part in sent for lbs in part))
