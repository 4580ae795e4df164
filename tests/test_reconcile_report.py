"""reconcile's mismatch report (contract §3.3): the global correction's metadata lists the
recent counted actions, and the bulk_sync_ops notification (sent on commit) carries them too,
cut to NOTIFY's 8000-byte limit when 100 actions do not fit.
"""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import psycopg

from helpers import (
    action,
    amount,
    bulk_backfill,
    connect,
    drain_notifies,
    log_action,
    logged_at,
    new_id,
    reconcile,
)

OPS_CHANNEL = "bulk_sync_ops"


def _drift_and_reconcile(url: str) -> tuple[dict[str, Any], dict[str, Any], list[Any]]:
    """Corrupt the global total, reconcile, and return (response, notification, stored list)."""
    with connect(url) as listener, connect(url) as conn:
        listener.execute(f"LISTEN {OPS_CHANNEL}")
        conn.execute("UPDATE bulk_sync.global_emissions SET total_lbs_saved = 0 WHERE id = 1")
        response = reconcile(conn, {"performed_by": "report-test"})
        notes = drain_notifies(listener, 2.0, channel=OPS_CHANNEL)
        stored = conn.execute(
            "SELECT metadata -> 'recent_actions' FROM bulk_sync.emissions_corrections"
            " WHERE correction_id = %s",
            (response["correction_id"],),
        ).fetchone()[0]
    assert len(notes) == 1, notes
    return response, notes[0], stored


def test_a_corrupted_total_reports_recent_actions(db_url: str) -> None:
    user = new_id()
    logged = []
    with connect(db_url) as conn:
        for i, lbs in enumerate(["1.100000", "2.200000", "3.300000"]):
            request = action(new_id(), user, lbs, logged_at(i))
            assert log_action(conn, request)["status"] == "inserted"
            logged.append(request)
        log_action(conn, action(new_id(), user, "9.000000", logged_at(9), verified=False))
    response, note, stored = _drift_and_reconcile(db_url)

    assert response["fixed"] is True
    assert response["discrepancy"] == amount(Decimal("6.6"))
    # Newest first: each log_action was its own transaction, so created_at orders them.
    assert [a["action_id"] for a in stored] == [r["action_id"] for r in reversed(logged)]
    assert [a["lbs"] for a in stored] == ["3.300000", "2.200000", "1.100000"]
    for entry in stored:
        assert set(entry) == {"action_id", "user_id", "lbs", "logged_at", "created_at"}
        assert entry["user_id"] == user
        assert entry["created_at"].endswith("Z")
        assert entry["logged_at"].endswith("Z")
    assert note["event"] == "reconcile"
    assert note["correction_id"] == response["correction_id"]
    assert note["recent_actions"] == stored
    assert note["recent_actions_count"] == 3
    assert note["recent_actions_truncated"] is False


def test_a_hundred_recent_actions_fit_the_notification(db_url: str) -> None:
    users = [new_id() for _ in range(7)]
    with connect(db_url) as conn:
        for batch in range(3):
            bulk_backfill(
                conn,
                [
                    action(new_id(), users[i % 7], "0.123456", logged_at(batch * 100 + i))
                    for i in range(45)
                ],
            )
    response, note, stored = _drift_and_reconcile(db_url)

    assert len(stored) == 100
    with connect(db_url) as conn:
        newest = conn.execute(
            "SELECT action_id::text FROM bulk_sync.user_actions"
            " ORDER BY created_at DESC, action_id DESC LIMIT 100"
        ).fetchall()
    assert [a["action_id"] for a in stored] == [row[0] for row in newest]
    assert note["recent_actions_truncated"] is True
    assert note["recent_actions_count"] == 100
    assert note["correction_id"] == response["correction_id"]
    kept = note["recent_actions"]
    assert 30 <= len(kept) < 100
    assert kept == stored[: len(kept)]


def test_no_report_when_only_a_user_drifted(db_url: str, conn: psycopg.Connection) -> None:
    user = new_id()
    log_action(conn, action(new_id(), user, "4.000000", logged_at(0)))
    conn.execute(
        "UPDATE bulk_sync.user_stats SET total_emissions_lbs = 1 WHERE user_id = %s", (user,)
    )
    conn.execute(f"LISTEN {OPS_CHANNEL}")
    response = reconcile(conn)
    notes = drain_notifies(conn, 1.0, channel=OPS_CHANNEL)
    assert response["fixed"] is True
    assert response["users_out_of_sync"] == 1
    assert len(notes) == 1
    assert "recent_actions" not in notes[0]
    assert (
        conn.execute(
            "SELECT count(*) FROM bulk_sync.emissions_corrections WHERE metadata ? 'recent_actions'"
        ).fetchone()[0]
        == 0
    )
