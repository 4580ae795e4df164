"""Statement and branch coverage of the bulk_sync PL/pgSQL, from plpgsql_check's profiler.

`scripts/test --coverage` starts the session cluster with plpgsql_check preloaded and its
profiler on. The profiler keeps one profile per function *per database*, and every test has
its own database, so conftest's make_db calls harvest() on each database just before dropping
it: the per-statement execution counts are appended to a JSON-lines file. report() then merges
them by function signature (a template's clones share the definitions, so statement ids agree).

- Statement coverage is plpgsql_check's own: executed statements / statements.
- Branch coverage: each branch of an IF or CASE (then, every elsif or when, else) is a branch,
  covered when its first statement ran. An IF or CASE without an ELSE has an implicit one,
  covered when the IF or CASE ran more often than its explicit branches did.

    python tests/plpgsql_coverage.py report DIR     # prints the table
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

import psycopg

STATEMENTS = """
SELECT p.oid::regprocedure::text, s.stmtid, s.parent_stmtid, s.parent_note, s.lineno,
       coalesce(s.exec_stmts, 0), s.stmtname
  FROM pg_proc AS p
  JOIN pg_language AS l ON l.oid = p.prolang AND l.lanname = 'plpgsql'
 CROSS JOIN LATERAL plpgsql_profiler_function_statements_tb(p.oid) AS s
 WHERE p.pronamespace = 'bulk_sync'::regnamespace
"""


def harvest(urls: list[str], out_dir: Path) -> None:
    """Append the profile of every bulk_sync PL/pgSQL function in each database, then reset."""
    out_dir.mkdir(parents=True, exist_ok=True)
    with (out_dir / "plpgsql-profile.jsonl").open("a", encoding="utf-8") as out:
        for url in urls:
            with psycopg.connect(url, autocommit=True) as conn:
                if conn.execute("SELECT to_regnamespace('bulk_sync') IS NULL").fetchone()[0]:
                    continue
                conn.execute("CREATE EXTENSION IF NOT EXISTS plpgsql_check")
                for row in conn.execute(STATEMENTS).fetchall():
                    out.write(json.dumps(row) + "\n")
        if urls:
            with psycopg.connect(urls[0], autocommit=True) as conn:
                conn.execute("CREATE EXTENSION IF NOT EXISTS plpgsql_check")
                conn.execute("SELECT plpgsql_profiler_reset_all()")


def _merge(path: Path) -> dict[str, dict[int, dict[str, Any]]]:
    functions: dict[str, dict[int, dict[str, Any]]] = defaultdict(dict)
    with path.open(encoding="utf-8") as handle:
        for line in handle:
            signature, stmtid, parent, note, lineno, count, name = json.loads(line)
            stmt = functions[signature].setdefault(
                stmtid,
                {"parent": parent, "note": note, "lineno": lineno, "count": 0, "name": name},
            )
            stmt["count"] += count
    return functions


def _branches(stmts: dict[int, dict[str, Any]]) -> tuple[int, int]:
    covered = total = 0
    for stmtid, stmt in stmts.items():
        if stmt["name"] not in ("IF", "CASE"):
            continue
        firsts: dict[str, dict[str, Any]] = {}
        for child_id in sorted(stmts):
            child = stmts[child_id]
            if child["parent"] == stmtid and child["note"] not in firsts:
                firsts[child["note"]] = child
        explicit = sum(child["count"] for child in firsts.values())
        total += len(firsts)
        covered += sum(1 for child in firsts.values() if child["count"] > 0)
        if not any(note.endswith("else") for note in firsts):
            total += 1  # the implicit ELSE
            covered += stmt["count"] > explicit
    return covered, total


def report(out_dir: Path) -> str:
    functions = _merge(out_dir / "plpgsql-profile.jsonl")
    lines = [
        f"{'function':<70} {'statements':>14} {'branches':>14}",
    ]
    all_stmts = all_hit = all_br = all_br_hit = 0
    for signature in sorted(functions):
        stmts = functions[signature]
        hit = sum(1 for s in stmts.values() if s["count"] > 0)
        br_hit, br = _branches(stmts)
        all_stmts += len(stmts)
        all_hit += hit
        all_br += br
        all_br_hit += br_hit
        missed = sorted(s["lineno"] for s in stmts.values() if s["count"] == 0)
        branch_text = f"{br_hit}/{br} {100 * br_hit / br:5.1f}%" if br else "-"
        lines.append(
            f"{signature[:70]:<70} {hit:>3}/{len(stmts):<3} {100 * hit / len(stmts):5.1f}%"
            f" {branch_text:>14}" + (f"  missed lines {missed}" if missed else "")
        )
    lines.append(
        f"{'TOTAL':<70} {all_hit:>3}/{all_stmts:<3} {100 * all_hit / all_stmts:5.1f}%"
        f" {all_br_hit}/{all_br} {100 * all_br_hit / max(all_br, 1):5.1f}%"
    )
    return "\n".join(lines)


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] != "report":
        sys.exit("usage: plpgsql_coverage.py report DIR")
    print(report(Path(sys.argv[2])))
