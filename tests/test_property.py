"""Property test: random operation sequences against the database and a pure-Python model.

A hypothesis state machine logs, resubmits (identically, with numerically equal
amounts spelled differently, or with conflicting facts), verifies, revokes,
bulk-loads (with in-batch duplicates, conflicts and idempotency keys),
corrupts the global total or a user's stats, and reconciles. The model keeps
the truth (the counted actions) and the drift that corruption introduced, all
in Decimal. After every step the database must match the model exactly, as
six-decimal strings: the global total, every user's total, count and latest
action, every action's status, the leaderboard (with ranks, from four read
functions), and the change events written by the step.

One database serves the whole test; each example starts from a TRUNCATE.
"""

from __future__ import annotations

import copy
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal
from typing import Any

import psycopg
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)
from psycopg.types.json import Jsonb

from helpers import amount, connect, decimal_sum

LIMIT = Decimal(10) ** 24  # NUMERIC(30,6) holds values below this
BASE = datetime(2024, 3, 1, tzinfo=UTC)
TIMES = [
    BASE,
    BASE + timedelta(hours=1),
    BASE + timedelta(hours=1, microseconds=123456),
    BASE + timedelta(days=2),
]
# Leading hex digits chosen so that user_id order differs from creation order.
USERS = [
    "a0000000-0000-4000-8000-000000000001",
    "30000000-0000-4000-8000-000000000002",
    "c0000000-0000-4000-8000-000000000003",
    "50000000-0000-4000-8000-000000000004",
]

amounts = st.one_of(
    st.decimals(min_value=0, max_value=1000, places=6, allow_nan=False, allow_infinity=False),
    st.sampled_from([Decimal(0), Decimal("1.5"), Decimal("2.000001"), Decimal("7")]),  # ties
)
huge_amounts = st.decimals(
    min_value=Decimal(10) ** 23,
    max_value=LIMIT - Decimal("0.000001"),
    places=6,
    allow_nan=False,
    allow_infinity=False,
)
drifts = st.decimals(
    min_value=Decimal("0.000001"), max_value=500, places=6, allow_nan=False, allow_infinity=False
)
mostly_true = st.sampled_from([True, True, True, False])
rarely_true = st.sampled_from([False, False, False, True])
lbs_forms = st.sampled_from(["plain", "six", "trailing"])
time_forms = st.sampled_from(["z", "offset"])

TRUNCATE = """
TRUNCATE bulk_sync.user_actions, bulk_sync.user_stats, bulk_sync.emissions_corrections,
         bulk_sync.reconciliation_runs, bulk_sync.idempotency_keys, bulk_sync.action_transitions,
         bulk_sync._event_outbox, bulk_sync.events;
UPDATE bulk_sync._global_slots SET total_lbs = 0;
"""


OUTCOMES: Counter[str] = Counter()


def note(what: str) -> None:
    """Count what the steps did (printed with -s: proof that the run exercised each path)."""
    OUTCOMES[what] += 1


def lbs_text(value: Decimal, form: str) -> str:
    """The same amount spelled three ways: all must be the same action's lbs."""
    if form == "plain":
        return format(value.normalize(), "f") if value else "0"
    if form == "six":
        return amount(value)
    return amount(value) + "00"  # more than six decimals, but only trailing zeros


def nudge(value: Decimal) -> Decimal:
    """A different valid amount (one millionth away, staying inside the limits)."""
    step = Decimal("0.000001")
    return value + step if value + step < LIMIT else value - step


def time_text(value: datetime, form: str) -> str:
    if form == "offset":
        return value.astimezone(timezone(timedelta(hours=2))).isoformat()
    return value.astimezone(UTC).isoformat().replace("+00:00", "Z")


@dataclass
class Act:
    user: str
    lbs: Decimal
    at: datetime
    verified: bool
    revoked: bool = False

    @property
    def counted(self) -> bool:
        return self.verified and not self.revoked


@dataclass
class Model:
    actions: dict[str, Act] = field(default_factory=dict)
    user_drift: dict[str, Decimal] = field(default_factory=dict)
    count_drift: dict[str, int] = field(default_factory=dict)
    global_drift: Decimal = Decimal(0)
    stats_rows: set[str] = field(default_factory=set)
    keys: dict[str, tuple[list[dict[str, Any]], dict[str, Any]]] = field(default_factory=dict)

    def counted_ids(self, user: str) -> set[str]:
        return {i for i, a in self.actions.items() if a.user == user and a.counted}

    def truth(self, user: str) -> tuple[Decimal, int, datetime | None]:
        acts = [a for a in self.actions.values() if a.user == user and a.counted]
        return (
            decimal_sum(a.lbs for a in acts),
            len(acts),
            max((a.at for a in acts), default=None),
        )

    def reported(self, user: str) -> tuple[Decimal, int, datetime | None]:
        total, count, last = self.truth(user)
        return (
            total + self.user_drift.get(user, Decimal(0)),
            count + self.count_drift.get(user, 0),
            last,
        )

    def user_total(self, user: str) -> Decimal:
        return self.reported(user)[0] if user in self.stats_rows else Decimal(0)

    def global_truth(self) -> Decimal:
        return decimal_sum(a.lbs for a in self.actions.values() if a.counted)

    def global_reported(self) -> Decimal:
        return self.global_truth() + self.global_drift

    def drifted_users(self) -> list[str]:
        return sorted(
            u for u in self.stats_rows if self.user_drift.get(u) or self.count_drift.get(u)
        )

    def refresh_rows(self) -> None:
        """A user_stats row appears with a user's first counted action, and stays."""
        self.stats_rows |= {a.user for a in self.actions.values() if a.counted}

    def overflows(self) -> bool:
        values = [self.global_truth(), self.global_reported()]
        values += [self.reported(u)[0] for u in self.stats_rows]
        return any(v >= LIMIT for v in values)

    def leaderboard(self) -> list[tuple[int, str, str, int, datetime | None]]:
        rows = [(u, *self.reported(u)) for u in self.stats_rows]
        rows = [r for r in rows if r[2] > 0]
        # PostgreSQL sorts a NULL last_action_at last (only reachable through a corrupted count).
        rows.sort(key=lambda r: (-r[1], r[3] is None, r[3] or BASE, r[0]))
        return [(i + 1, u, amount(t), n, last) for i, (u, t, n, last) in enumerate(rows)]


class LedgerMachine(RuleBasedStateMachine):
    """Set `conn` (an autocommit connection to a migrated database) before running."""

    conn: psycopg.Connection

    def __init__(self) -> None:
        super().__init__()
        self.model = Model()
        self.next_id = 0
        self.next_key = 0
        self.last_event_id = 0
        self.expected_events: dict[str, Any] = {}
        self.conn.execute(TRUNCATE)

    # ------------------------------------------------------------------ plumbing

    def fresh_id(self) -> str:
        self.next_id += 1
        return f"00000000-0000-4000-8000-{self.next_id:012d}"

    def sql(self, query: str, params: tuple[Any, ...] = ()) -> Any:
        return self.conn.execute(query, params).fetchone()[0]

    def expect_error(self, states: set[str], query: str, params: tuple[Any, ...]) -> str:
        with pytest.raises(psycopg.Error) as caught:
            self.sql(query, params)
        state = caught.value.sqlstate
        note(f"error {state}")
        assert state in states, f"expected {states}, got {state}: {caught.value}"
        return state

    def commit(self, new: Model, touched: set[str], single: str | None = None) -> None:
        """Adopt the new model and note which users' counted sets changed (for events)."""
        changed = {u for u in touched if new.counted_ids(u) != self.model.counted_ids(u)}
        note(f"counted set changed for {len(changed)} user(s)")
        self.expected_events = {"users": changed, "single": single, "kind": "change"}
        self.model = new

    def no_change(self) -> None:
        self.expected_events = {"users": set(), "single": None, "kind": "none"}

    def pick(self, data: st.DataObject) -> str:
        return data.draw(st.sampled_from(sorted(self.model.actions)), label="action_id")

    def request(self, action_id: str, act: Act, lbs_form: str, time_form: str) -> dict[str, Any]:
        return {
            "action_id": action_id,
            "user_id": act.user,
            "lbs": lbs_text(act.lbs, lbs_form),
            "logged_at": time_text(act.at, time_form),
            "verified": act.verified,
        }

    def log(self, request: dict[str, Any], positional: bool) -> dict[str, Any]:
        if positional:
            return self.sql(
                "SELECT bulk_sync.log_action(%s::uuid, %s::uuid, %s::numeric, %s::timestamptz, %s)",
                (
                    request["action_id"],
                    request["user_id"],
                    request["lbs"],
                    request["logged_at"],
                    request["verified"],
                ),
            )
        return self.sql("SELECT bulk_sync.log_action(%s)", (Jsonb(request),))

    def check_log_response(
        self, response: dict[str, Any], request: dict[str, Any], status: str, lbs: Decimal
    ) -> None:
        assert response["success"] is True
        assert response["status"] == status
        assert response["is_duplicate"] is (status != "inserted")
        assert response["action_id"] == request["action_id"]
        assert response["user_id"] == request["user_id"]
        assert response["emissions_lbs"] == amount(lbs)
        assert response["user_total_lbs"] == amount(self.model.user_total(request["user_id"]))
        assert response["global_total_lbs"] == amount(self.model.global_reported())

    # ------------------------------------------------------------------ log / resubmit

    def _log_new(self, user: str, lbs: Decimal, at: datetime, verified: bool, **forms: Any) -> None:
        action_id = self.fresh_id()
        act = Act(user, lbs, at, verified)
        req = self.request(action_id, act, forms["lbs_form"], forms["time_form"])
        new = copy.deepcopy(self.model)
        new.actions[action_id] = act
        new.refresh_rows()
        if new.overflows():
            self.expect_error({"22003"}, "SELECT bulk_sync.log_action(%s)", (Jsonb(req),))
            self.no_change()
            return
        response = self.log(req, forms["positional"])
        self.commit(new, {user}, action_id)
        self.check_log_response(response, req, "inserted", lbs)

    @rule(
        user=st.sampled_from(USERS),
        # Now and then an amount near the NUMERIC(30,6) limit: a total that would overflow
        # must fail the call cleanly (22003), changing nothing.
        lbs=st.one_of(*[amounts] * 9, huge_amounts),
        at=st.sampled_from(TIMES),
        verified=st.booleans(),
        lbs_form=lbs_forms,
        time_form=time_forms,
        positional=st.booleans(),
    )
    def log_new(self, user: str, lbs: Decimal, at: datetime, verified: bool, **forms: Any) -> None:
        self._log_new(user, lbs, at, verified, **forms)

    @precondition(lambda self: self.model.actions)
    @rule(
        data=st.data(),
        verified=st.booleans(),
        lbs_form=lbs_forms,
        time_form=time_forms,
        positional=st.booleans(),
    )
    def resubmit(self, data: st.DataObject, verified: bool, **forms: Any) -> None:
        action_id = self.pick(data)
        stored = self.model.actions[action_id]
        req = self.request(action_id, stored, forms["lbs_form"], forms["time_form"])
        req["verified"] = verified
        new = copy.deepcopy(self.model)
        status = "duplicate"
        if verified and not stored.verified and not stored.revoked:
            status = "verified"
            new.actions[action_id].verified = True
            new.refresh_rows()
        if new.overflows():
            self.expect_error({"22003"}, "SELECT bulk_sync.log_action(%s)", (Jsonb(req),))
            self.no_change()
            return
        response = self.log(req, forms["positional"])
        self.commit(new, {stored.user}, action_id)
        self.check_log_response(response, req, status, stored.lbs)

    @precondition(lambda self: self.model.actions)
    @rule(data=st.data(), what=st.sampled_from(["user_id", "lbs", "logged_at"]))
    def resubmit_conflicting(self, data: st.DataObject, what: str) -> None:
        action_id = self.pick(data)
        stored = self.model.actions[action_id]
        changed = copy.copy(stored)
        if what == "user_id":
            changed.user = USERS[(USERS.index(stored.user) + 1) % len(USERS)]
        elif what == "lbs":
            changed.lbs = nudge(stored.lbs)
        else:
            changed.at = stored.at + timedelta(microseconds=1)
        req = self.request(action_id, changed, "six", "z")
        self.expect_error({"BS002"}, "SELECT bulk_sync.log_action(%s)", (Jsonb(req),))
        self.no_change()

    # ------------------------------------------------------------------ verify / revoke

    def check_transition(self, response: dict[str, Any], action_id: str, status: str) -> None:
        user = self.model.actions[action_id].user
        assert response["success"] is True
        assert response["action_id"] == action_id
        assert response["user_id"] == user
        assert response["status"] == status
        assert response["user_total_lbs"] == amount(self.model.user_total(user))
        assert response["global_total_lbs"] == amount(self.model.global_reported())

    @rule(data=st.data(), known=mostly_true)
    def verify(self, data: st.DataObject, known: bool) -> None:
        query = "SELECT bulk_sync.verify_action(%s::uuid, 'property-test')"
        if not known or not self.model.actions:
            self.expect_error({"BS004"}, query, (self.fresh_id(),))
            self.no_change()
            return
        action_id = self.pick(data)
        stored = self.model.actions[action_id]
        if stored.revoked:
            self.expect_error({"BS006"}, query, (action_id,))
            self.no_change()
            return
        new = copy.deepcopy(self.model)
        new.actions[action_id].verified = True
        new.refresh_rows()
        if new.overflows():
            self.expect_error({"22003"}, query, (action_id,))
            self.no_change()
            return
        status = "already_verified" if stored.verified else "verified"
        response = self.sql(query, (action_id,))
        self.commit(new, {stored.user}, action_id)
        self.check_transition(response, action_id, status)

    @rule(data=st.data(), known=mostly_true, empty_reason=rarely_true)
    def revoke(self, data: st.DataObject, known: bool, empty_reason: bool) -> None:
        query = "SELECT bulk_sync.revoke_action(%s::uuid, %s, 'property-test')"
        if not known or not self.model.actions:
            self.expect_error({"BS004"}, query, (self.fresh_id(), "gone"))
            self.no_change()
            return
        action_id = self.pick(data)
        if empty_reason:
            self.expect_error({"BS001"}, query, (action_id, "  "))
            self.no_change()
            return
        stored = self.model.actions[action_id]
        new = copy.deepcopy(self.model)
        new.actions[action_id].revoked = True
        status = "already_revoked" if stored.revoked else "revoked"
        response = self.sql(query, (action_id, "property test"))
        self.commit(new, {stored.user}, action_id)
        self.check_transition(response, action_id, status)

    # ------------------------------------------------------------------ bulk

    @rule(
        data=st.data(),
        new_items=st.lists(
            st.tuples(st.sampled_from(USERS), amounts, st.sampled_from(TIMES), st.booleans()),
            max_size=6,
        ),
        existing=st.integers(min_value=0, max_value=4),
        duplicates=st.integers(min_value=0, max_value=3),
        conflict=st.sampled_from([None, None, None, "in_batch", "stored"]),
        key_mode=st.sampled_from([None, None, "fresh", "replay", "reuse_other"]),
    )
    def bulk(
        self,
        data: st.DataObject,
        new_items: list[tuple[str, Decimal, datetime, bool]],
        existing: int,
        duplicates: int,
        conflict: str | None,
        key_mode: str | None,
    ) -> None:
        if key_mode in ("replay", "reuse_other") and self.model.keys:
            self._bulk_with_used_key(data, key_mode)
            return

        batch: list[tuple[str, Act, str, str]] = []  # (action_id, facts, lbs form, time form)
        for user, lbs, at, verified in new_items:
            forms = data.draw(st.tuples(lbs_forms, time_forms), label="forms")
            batch.append((self.fresh_id(), Act(user, lbs, at, verified), *forms))
        if self.model.actions:
            for _ in range(existing):
                action_id = self.pick(data)
                act = copy.copy(self.model.actions[action_id])
                act.verified = data.draw(st.booleans(), label="verified")
                act.revoked = False
                forms = data.draw(st.tuples(lbs_forms, time_forms), label="forms")
                batch.append((action_id, act, *forms))
        if batch:
            for _ in range(duplicates):  # in-batch duplicates, identical facts
                action_id, act, _, _ = data.draw(st.sampled_from(batch), label="duplicate")
                twin = copy.copy(act)
                twin.verified = data.draw(st.booleans(), label="verified")
                forms = data.draw(st.tuples(lbs_forms, time_forms), label="forms")
                batch.append((action_id, twin, *forms))
        if conflict == "in_batch" and batch:
            action_id, act, _, _ = data.draw(st.sampled_from(batch), label="conflict")
            twin = Act(act.user, nudge(act.lbs), act.at, act.verified)
            batch.append((action_id, twin, "six", "z"))
        elif conflict == "stored" and self.model.actions:
            action_id = self.pick(data)
            act = self.model.actions[action_id]
            batch.append(
                (action_id, Act(act.user, act.lbs, act.at + timedelta(seconds=1), True), "six", "z")
            )
        else:
            conflict = None
        batch = data.draw(st.permutations(batch), label="order")

        actions = [self.request(i, a, lf, tf) for i, a, lf, tf in batch]
        key = None
        if key_mode is not None:
            self.next_key += 1
            key = f"key-{self.next_key}"
        request: dict[str, Any] = {"actions": actions}
        if key is not None:
            request["idempotency_key"] = key
        query = "SELECT bulk_sync.bulk_backfill(%s)"

        if conflict is not None:
            self.expect_error({"BS002"}, query, (Jsonb(request),))
            self.no_change()
            return

        new = copy.deepcopy(self.model)
        inserted: set[str] = set()
        verified: set[str] = set()
        for action_id, act, _, _ in batch:
            if action_id not in self.model.actions:
                if action_id in new.actions:
                    new.actions[action_id].verified |= act.verified
                else:
                    new.actions[action_id] = Act(act.user, act.lbs, act.at, act.verified)
                    inserted.add(action_id)
            else:
                stored = self.model.actions[action_id]
                if act.verified and not stored.verified and not stored.revoked:
                    new.actions[action_id].verified = True
                    verified.add(action_id)
        new.refresh_rows()
        touched = {a.user for _, a, _, _ in batch}
        if new.overflows():
            self.expect_error({"22003"}, query, (Jsonb(request),))
            self.no_change()
            return

        response = self.sql(query, (Jsonb(request),))
        self.commit(new, touched)
        affected = {new.actions[i].user for i in inserted if new.actions[i].verified}
        affected |= {new.actions[i].user for i in verified}
        expected = {
            "success": True,
            "inserted_count": len(inserted),
            "skipped_count": len(batch) - len(inserted) - len(verified),
            "verified_count": len(verified),
            "global_total_lbs": amount(new.global_reported()),
            "affected_users": len(affected),
            "idempotency_key": key,
            "replayed": False,
        }
        note(f"bulk inserted>0={bool(inserted)} verified>0={bool(verified)}")
        assert {k: response[k] for k in expected} == expected, response
        if key is not None:
            new.keys[key] = (actions, response)

    def _bulk_with_used_key(self, data: st.DataObject, key_mode: str) -> None:
        key = data.draw(st.sampled_from(sorted(self.model.keys)), label="key")
        actions, first = self.model.keys[key]
        query = "SELECT bulk_sync.bulk_backfill(%s)"
        if key_mode == "replay":
            response = self.sql(query, (Jsonb({"actions": actions, "idempotency_key": key}),))
            assert response == {**first, "replayed": True}
        else:
            other = [{**a, "verified": not a["verified"]} for a in actions] or [
                self.request(self.fresh_id(), Act(USERS[0], Decimal(1), BASE, True), "six", "z")
            ]
            request = {"actions": other, "idempotency_key": key}
            self.expect_error({"BS003"}, query, (Jsonb(request),))
        self.no_change()

    # ------------------------------------------------------------------ drift and reconcile

    @rule(value=st.decimals(min_value=0, max_value=10**6, places=6, allow_nan=False))
    def corrupt_global(self, value: Decimal) -> None:
        self.conn.execute(
            "UPDATE bulk_sync.global_emissions SET total_lbs_saved = %s WHERE id = 1", (value,)
        )
        self.model.global_drift = value - self.model.global_truth()
        self.no_change()

    @precondition(lambda self: self.model.stats_rows)
    @rule(data=st.data(), delta=drifts, count_delta=st.integers(min_value=0, max_value=2))
    def corrupt_user(self, data: st.DataObject, delta: Decimal, count_delta: int) -> None:
        user = data.draw(st.sampled_from(sorted(self.model.stats_rows)), label="user")
        if self.model.reported(user)[0] + delta >= LIMIT:
            self.expect_error(
                {"22003"},
                "UPDATE bulk_sync.user_stats SET total_emissions_lbs = total_emissions_lbs + %s"
                " WHERE user_id = %s RETURNING 1",
                (delta, user),
            )
            self.no_change()
            return
        self.conn.execute(
            "UPDATE bulk_sync.user_stats SET total_emissions_lbs = total_emissions_lbs + %s,"
            " action_count = action_count + %s WHERE user_id = %s",
            (delta, count_delta, user),
        )
        self.model.user_drift[user] = self.model.user_drift.get(user, Decimal(0)) + delta
        self.model.count_drift[user] = self.model.count_drift.get(user, 0) + count_delta
        self.no_change()

    @rule(auto_correct=mostly_true)
    def reconcile(self, auto_correct: bool) -> None:
        model = self.model
        drifted = model.drifted_users()
        global_off = model.global_drift != 0
        in_sync = not global_off and not drifted
        corrections_before = self.sql("SELECT count(*) FROM bulk_sync.emissions_corrections")
        result = self.sql(
            "SELECT bulk_sync.reconcile(%s)",
            (Jsonb({"performed_by": "property-test", "auto_correct": auto_correct}),),
        )
        note(f"reconcile in_sync={in_sync} auto_correct={auto_correct}")
        assert result["in_sync"] is in_sync
        assert result["user_stats_sum"] == amount(model.global_truth())
        assert result["global_total"] == amount(model.global_reported())
        assert result["discrepancy"] == amount(abs(model.global_drift))
        assert result["users_out_of_sync"] == len(drifted)
        fixed = auto_correct and not in_sync
        assert result["fixed"] is fixed
        assert (result["correction_id"] is not None) is fixed
        corrections = self.sql("SELECT count(*) FROM bulk_sync.emissions_corrections")
        assert corrections - corrections_before == (
            (int(global_off) + len(drifted)) if auto_correct else 0
        )
        if fixed:
            run_rows = self.sql(
                "SELECT count(*) FROM bulk_sync.emissions_corrections"
                " WHERE reconciliation_run_id = %s::uuid",
                (result["run_id"],),
            )
            assert run_rows == int(global_off) + len(drifted)
            new = copy.deepcopy(model)
            new.global_drift = Decimal(0)
            new.user_drift.clear()
            new.count_drift.clear()
            self.model = new
            self.expected_events = {"users": set(drifted), "single": None, "kind": "reconciled"}
        else:
            self.no_change()

    # ------------------------------------------------------------------ the comparison

    @invariant()
    def database_matches_model(self) -> None:
        model = self.model
        conn = self.conn
        assert self.sql(
            "SELECT total_lbs_saved::numeric(30,6)::text FROM bulk_sync.global_emissions"
            " WHERE id = 1"
        ) == amount(model.global_reported())
        assert self.sql("SELECT bulk_sync.global_total()::text") == amount(model.global_reported())

        stats = {
            user: (total, count, last)
            for user, total, count, last in conn.execute(
                "SELECT user_id::text, total_emissions_lbs::text, action_count, last_action_at"
                " FROM bulk_sync.user_stats"
            ).fetchall()
        }
        expected_stats = {}
        for user in model.stats_rows:
            total, count, last = model.reported(user)
            expected_stats[user] = (amount(total), count, last)
        # A row with nothing in it is the same as no row (bulk_backfill may create one early).
        empty = ("0.000000", 0, None)
        for user in set(stats) | set(expected_stats):
            assert stats.get(user, empty) == expected_stats.get(user, empty), user

        statuses = dict(
            conn.execute(
                "SELECT action_id::text, (verified, revoked)::text FROM bulk_sync.user_actions"
            ).fetchall()
        )
        assert statuses == {
            i: f"({'t' if a.verified else 'f'},{'t' if a.revoked else 'f'})"
            for i, a in model.actions.items()
        }

        board = model.leaderboard()
        rows = conn.execute(
            "SELECT rank, user_id::text, total_lbs::text, action_count, last_action_at"
            " FROM bulk_sync.leaderboard(10000)"
        ).fetchall()
        assert [tuple(r) for r in rows] == board
        assert self.sql("SELECT bulk_sync.leaderboard_json(10000)") == [
            {"rank": rank, "user_id": user, "total_lbs": total} for rank, user, total, _, _ in board
        ]
        ranks = {
            row[1]: tuple(row)
            for row in conn.execute(
                "SELECT r.rank, r.user_id::text, r.total_lbs::text, r.action_count,"
                " r.last_action_at FROM unnest(%s::uuid[]) AS u(id),"
                " LATERAL bulk_sync.user_rank(u.id) AS r",
                (USERS,),
            ).fetchall()
        }
        assert ranks == {row[1]: row for row in board}
        if board:
            middle = board[len(board) // 2]
            around = conn.execute(
                "SELECT rank, user_id::text, total_lbs::text, action_count, last_action_at"
                " FROM bulk_sync.leaderboard_around(%s::uuid, 1)",
                (middle[1],),
            ).fetchall()
            position = middle[0] - 1
            assert [tuple(r) for r in around] == board[max(0, position - 1) : position + 2]

        self.check_events()

    def check_events(self) -> None:
        """The step's change events: one per user whose counted set changed (or who was fixed)."""
        expected = self.expected_events or {"users": set(), "single": None, "kind": "none"}
        self.expected_events = {}
        events = self.conn.execute(
            "SELECT event_id, payload FROM bulk_sync.events_since(%s, 10000)",
            (self.last_event_id,),
        ).fetchall()
        ids = [int(e[0]) for e in events]
        assert ids == sorted(set(ids))
        assert all(i > self.last_event_id for i in ids)
        if ids:
            self.last_event_id = ids[-1]
        payloads = [e[1] for e in events]
        assert {p["user_id"] for p in payloads} == expected["users"], payloads
        per_user = Counter(p["user_id"] for p in payloads)
        # A bulk call changes a user at most twice (its insert, then its verify update).
        assert all(
            n <= (1 if expected["kind"] != "change" or expected["single"] else 2)
            for n in per_user.values()
        ), payloads
        last_by_user = {p["user_id"]: p for p in payloads}
        for user, payload in last_by_user.items():
            assert payload["user_total_lbs"] == amount(self.model.user_total(user)), payload
            assert payload["action_count"] == self.model.reported(user)[1], payload
        if payloads:
            assert payloads[-1]["global_total_lbs"] == amount(self.model.global_reported())
        if expected["kind"] == "reconciled":
            assert {p["kind"] for p in payloads} <= {"reconciled"}
        if expected["single"] is not None and payloads:
            assert payloads[0]["action_id"] == expected["single"]


def test_state_machine_matches_model(db_url: str) -> None:
    with connect(db_url) as conn:
        LedgerMachine.conn = conn
        run_state_machine_as_test(
            LedgerMachine,
            settings=settings(
                max_examples=40,
                stateful_step_count=40,
                deadline=None,
                database=None,
                print_blob=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
            ),
        )
    print(dict(sorted(OUTCOMES.items())))
