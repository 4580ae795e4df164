"""Static analysis: plpgsql_check over every PL/pgSQL function of bulk_sync.

Trigger functions are checked once per trigger that uses them, with its relation and its
transition tables. Every level counts (errors, warnings, extra, performance, security,
compatibility); a finding fails the test unless tests/plpgsql_check.allow lists it with a
reason, and an allow-list entry that no longer matches fails it as well.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import psycopg
import pytest

from helpers import connect

# plpgsql_check is a C extension built per major version (Debian: postgresql-15-plpgsql-check).
pytestmark = pytest.mark.plpgsql_check

ALLOW_LIST = Path(__file__).resolve().parent / "plpgsql_check.allow"

CHECK = """
WITH f AS (
    SELECT p.oid, p.oid::regprocedure::text AS signature,
           p.prorettype = 'trigger'::regtype AS is_trigger
      FROM pg_proc AS p JOIN pg_language AS l ON l.oid = p.prolang
     WHERE p.pronamespace = 'bulk_sync'::regnamespace AND l.lanname = 'plpgsql'
)
SELECT f.signature, t.tgname, r.level, r.sqlstate, r.lineno, r.message, r.detail
  FROM f
  LEFT JOIN pg_trigger AS t ON f.is_trigger AND t.tgfoid = f.oid
 CROSS JOIN LATERAL plpgsql_check_function_tb(
           f.oid, coalesce(t.tgrelid, 0),
           fatal_errors => false,
           other_warnings => true,
           performance_warnings => true,
           extra_warnings => true,
           security_warnings => true,
           compatibility_warnings => true,
           newtable => t.tgnewtable,
           oldtable => t.tgoldtable) AS r
 ORDER BY 1, 2, 5
"""


def _allowed() -> dict[tuple[str, str], tuple[int, str]]:
    entries: dict[tuple[str, str], tuple[int, str]] = {}
    for raw in ALLOW_LIST.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        signature, count, finding, reason = (part.strip() for part in line.split("|"))
        assert reason, f"allow-list entry without a reason: {raw}"
        entries[(signature, finding)] = (int(count), reason)
    return entries


def test_every_plpgsql_function_passes_plpgsql_check(db_url: str) -> None:
    with connect(db_url) as conn:
        conn.execute("CREATE EXTENSION plpgsql_check")
        # The bulk core reads the session's load stage, which _stage_open creates in pg_temp:
        # create it here, so that the functions reading it are checked against its columns.
        conn.execute("SELECT bulk_sync._stage_open()")
        functions = conn.execute(
            "SELECT count(*) FROM pg_proc AS p JOIN pg_language AS l ON l.oid = p.prolang"
            " WHERE p.pronamespace = 'bulk_sync'::regnamespace AND l.lanname = 'plpgsql'"
        ).fetchone()[0]
        assert functions > 20
        unused_triggers = conn.execute(
            "SELECT p.oid::regprocedure::text FROM pg_proc AS p"
            " WHERE p.pronamespace = 'bulk_sync'::regnamespace"
            " AND p.prorettype = 'trigger'::regtype"
            " AND NOT EXISTS (SELECT FROM pg_trigger AS t WHERE t.tgfoid = p.oid)"
        ).fetchall()
        assert unused_triggers == [], "trigger functions no trigger uses (unchecked)"
        rows = conn.execute(CHECK).fetchall()

    found: Counter[tuple[str, str]] = Counter()
    described: dict[tuple[str, str], list[str]] = {}
    for signature, trigger, level, sqlstate, lineno, message, detail in rows:
        key = (signature, detail or message)
        found[key] += 1
        where = f"{signature}" + (f" (trigger {trigger})" if trigger else "") + f" line {lineno}"
        described.setdefault(key, []).append(f"{where}: {level} {sqlstate} {message} {detail}")

    allowed = _allowed()
    unexpected = [
        text
        for key, count in found.items()
        if allowed.get(key, (0, ""))[0] != count
        for text in described[key]
    ]
    stale = [
        f"{signature} | {count} | {finding}"
        for (signature, finding), (count, _reason) in allowed.items()
        if found.get((signature, finding), 0) != count
    ]
    assert unexpected == [], "plpgsql_check findings:\n" + "\n".join(unexpected)
    assert stale == [], "allow-list entries that no longer match exactly:\n" + "\n".join(stale)


def test_the_check_sees_a_bad_function(conn: psycopg.Connection) -> None:
    """The same query reports a planted error and a planted performance warning."""
    conn.execute("CREATE EXTENSION plpgsql_check")
    conn.execute(
        "CREATE FUNCTION bulk_sync._planted() RETURNS integer LANGUAGE plpgsql AS $$"
        " DECLARE v_n integer; BEGIN SELECT count(*) INTO v_n FROM bulk_sync.user_stats;"
        " RETURN (SELECT no_such_column FROM bulk_sync.user_stats LIMIT 1); END $$"
    )
    rows = conn.execute(CHECK).fetchall()
    planted = {(row[2], row[3]) for row in rows if row[0] == "bulk_sync._planted()"}
    assert ("error", "42703") in planted
    assert ("performance", "42804") in planted
    conn.execute("DROP FUNCTION bulk_sync._planted()")  # not part of bulk_sync's coverage
