"""The `bulk-sync` command line (contract §6), driven end to end against real databases.

Most tests run the click group in-process with CliRunner against `db_url` (a fresh,
migrated database per test, from conftest.py); `listen`, the worker under signals and the
embedded default run the installed console script in a subprocess. Amounts are compared
as the contract's six-decimal strings; nothing here produces a float.
"""

from __future__ import annotations

import io
import json
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import tracemalloc
import uuid
from collections.abc import Callable, Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import psycopg
import pytest
from click.testing import CliRunner, Result

from bulk_sync import embedded, events, paths
from bulk_sync.backfill import backfill
from bulk_sync.cli import main
from bulk_sync.jsonutil import loads
from helpers import abandoned_load, load_rows, wait_for

SEED_FILE = paths.seed_actions_file()
U1 = "00000000-0000-4000-8000-000000000001"
U2 = "00000000-0000-4000-8000-000000000002"
U3 = "00000000-0000-4000-8000-000000000003"
SIX = Decimal("0.000001")
WORKER_LOCK = (1651862635, 1)


# --------------------------------------------------------------------------- helpers


def cli(url: str | None, *args: str, stdin: bytes | str | None = None, **env: str) -> Result:
    """Run `bulk-sync [--database-url url] args...` in-process."""
    argv = (["--database-url", url] if url else []) + list(args)
    return CliRunner().invoke(main, argv, input=stdin, env=env or None, catch_exceptions=False)


def out_json(result: Result) -> Any:
    assert result.exit_code == 0, (result.exit_code, result.stdout, result.stderr)
    return loads(result.stdout)


def assert_error(result: Result, code: int, *fragments: str) -> str:
    """Exactly one `bulk-sync: error: ...` line on stderr, no traceback, the given exit code."""
    assert result.exit_code == code, (result.exit_code, result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("bulk-sync: error: "), lines[0]
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


def query(url: str, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    with psycopg.connect(url, autocommit=True) as conn:
        cursor = conn.execute(sql, params)
        return cursor.fetchall() if cursor.description is not None else []


def global_total(url: str) -> str:
    return query(url, "SELECT total_lbs_saved::text FROM bulk_sync.global_emissions WHERE id = 1")[
        0
    ][0]


def user_totals(url: str) -> dict[str, str]:
    rows = query(url, "SELECT user_id::text, total_emissions_lbs::text FROM bulk_sync.user_stats")
    return dict(rows)


def amount(value: Decimal) -> str:
    return str(value.quantize(SIX))


def new_id() -> str:
    return str(uuid.uuid4())


def action(action_id: str, user_id: str, lbs: str, at: str, verified: bool = True) -> dict:
    return {
        "action_id": action_id,
        "user_id": user_id,
        "lbs": lbs,
        "logged_at": at,
        "verified": verified,
    }


def log_args(action_id: str, user_id: str, lbs: str, verified: bool = True) -> list[str]:
    args = ["log", "--action-id", action_id, "--user-id", user_id, "--lbs", lbs]
    args += ["--logged-at", "2025-11-05T12:00:00Z"]
    return args + (["--verified"] if verified else [])


def console_script() -> str:
    """The installed `bulk-sync` console script (the package must be installed)."""
    beside = Path(sys.executable).parent / "bulk-sync"
    found = str(beside) if beside.is_file() else shutil.which("bulk-sync")
    assert found, "the bulk-sync console script is not installed (pip install -e .)"
    return found


def subprocess_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "DATABASE_URL" and not k.startswith("PG")}
    env.update(extra)
    return env


class Lines:
    """Collects a subprocess stream line by line on a thread, for reads with a deadline."""

    def __init__(self, stream: Any) -> None:
        self._queue: queue.Queue[str] = queue.Queue()
        self._thread = threading.Thread(target=self._pump, args=(stream,), daemon=True)
        self._thread.start()

    def _pump(self, stream: Any) -> None:
        for line in stream:
            self._queue.put(line)

    def next(self, timeout: float = 15.0) -> str:
        return self._queue.get(timeout=timeout)

    def until(self, predicate: Callable[[str], bool], timeout: float = 15.0) -> str:
        deadline = time.monotonic() + timeout
        while True:
            line = self.next(max(0.01, deadline - time.monotonic()))
            if predicate(line):
                return line

    def rest(self) -> list[str]:
        self._thread.join(timeout=10)
        lines = []
        while not self._queue.empty():
            lines.append(self._queue.get_nowait())
        return lines


def stop(proc: subprocess.Popen[str], sig: int = signal.SIGTERM) -> int:
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=15)
    return proc.returncode


@pytest.fixture
def seeded(db_url: str) -> str:
    """db_url with the seed's three actions loaded through `backfill`."""
    out_json(cli(db_url, "backfill", str(SEED_FILE)))
    return db_url


# --------------------------------------------------------------------------- migrate


def test_migrate_installs_then_is_a_noop(make_db: Callable[..., str]) -> None:
    url = make_db(template=None)
    expected_ids = sorted(
        p.name.removesuffix(".sql")
        for p in paths.migrations_dir().glob("*.sql")
        if not p.name.endswith(".rollback.sql")
    )
    definitions = len(list(paths.definitions_dir().glob("*.sql")))

    first = out_json(cli(url, "migrate"))
    assert first == {
        "applied_migrations": expected_ids,
        "definitions": definitions,
        "definitions_applied": True,
        "dropped": [],
    }
    second = out_json(cli(url, "migrate"))
    assert second == {
        "applied_migrations": [],
        "definitions": definitions,
        "definitions_applied": False,
        "dropped": [],
    }
    assert global_total(url) == "0.000000"


def test_commands_on_an_unmigrated_database_say_run_migrate(make_db: Callable[..., str]) -> None:
    url = make_db(template=None)
    assert_error(cli(url, "status"), 3, "bulk-sync migrate")
    assert_error(cli(url, "leaderboard"), 3, "bulk-sync migrate")


def test_verbose_adds_the_traceback(make_db: Callable[..., str]) -> None:
    url = make_db(template=None)
    result = cli(url, "--verbose", "status")
    assert result.exit_code == 3
    assert "Traceback" in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("bulk-sync: error: ")


def test_connection_failure_is_exit_3() -> None:
    result = cli("postgresql://postgres@127.0.0.1:1/nowhere?connect_timeout=3", "status")
    assert_error(result, 3, "cannot connect")


def test_database_url_comes_from_the_environment(seeded: str) -> None:
    result = CliRunner().invoke(main, ["status", "--json"], env={"DATABASE_URL": seeded})
    assert out_json(result)["global_total_lbs"] == "30.900000"


# --------------------------------------------------------------------------- log


def test_log_prints_the_response_with_string_amounts(db_url: str) -> None:
    action_id, user = new_id(), new_id()
    first = out_json(cli(db_url, *log_args(action_id, user, "10.2"), "--metadata", '{"n": 1.50}'))
    assert first["status"] == "inserted"
    assert first["is_duplicate"] is False
    assert first["emissions_lbs"] == "10.200000"
    assert first["user_total_lbs"] == "10.200000"
    assert first["global_total_lbs"] == "10.200000"
    stored = query(db_url, "SELECT metadata::text FROM bulk_sync.user_actions")[0][0]
    assert stored == '{"n": 1.50}'

    again = out_json(cli(db_url, *log_args(action_id, user, "10.200000")))
    assert again["status"] == "duplicate"
    assert again["is_duplicate"] is True
    assert global_total(db_url) == "10.200000"

    conflict = cli(db_url, *log_args(action_id, user, "10.3"))
    assert_error(conflict, 2, "lbs")
    assert global_total(db_url) == "10.200000"


def test_log_unverified_does_not_count_until_verified(db_url: str) -> None:
    action_id, user = new_id(), new_id()
    assert (
        out_json(cli(db_url, *log_args(action_id, user, "1.5", verified=False)))["status"]
        == "inserted"
    )
    assert global_total(db_url) == "0.000000"
    verified = out_json(cli(db_url, *log_args(action_id, user, "1.5")))
    assert verified["status"] == "verified"
    assert global_total(db_url) == "1.500000"


def test_log_rejects_bad_input_with_one_line(db_url: str) -> None:
    assert_error(cli(db_url, *log_args("not-a-uuid", new_id(), "1")), 2, "action_id")
    assert_error(cli(db_url, *log_args(new_id(), new_id(), "1.1234567")), 2, "lbs")
    bad_json = cli(db_url, *log_args(new_id(), new_id(), "1"), "--metadata", "{oops")
    assert bad_json.exit_code == 2
    assert "--metadata" in bad_json.stderr
    missing = cli(db_url, "log", "--action-id", new_id())
    assert missing.exit_code == 2
    assert global_total(db_url) == "0.000000"


# --------------------------------------------------------------------------- backfill


def test_backfill_of_the_seed_gives_the_seed_totals(db_url: str) -> None:
    summary = out_json(cli(db_url, "backfill", str(SEED_FILE)))
    assert summary == {
        "success": True,
        "rows": 3,
        "batches": 1,
        "inserted_count": 3,
        "skipped_count": 0,
        "verified_count": 0,
        "affected_users": 3,
        "global_total_lbs": "30.900000",
    }
    assert global_total(db_url) == "30.900000"
    assert user_totals(db_url) == {U1: "10.200000", U2: "10.300000", U3: "10.400000"}

    rerun = out_json(cli(db_url, "backfill", str(SEED_FILE)))
    assert (rerun["inserted_count"], rerun["skipped_count"]) == (0, 3)
    assert rerun["global_total_lbs"] == "30.900000"
    assert global_total(db_url) == "30.900000"


def test_backfill_csv_maps_verified_and_metadata(db_url: str, tmp_path: Path) -> None:
    users = [new_id(), new_id()]
    rows = [
        (new_id(), users[0], "1.5", "true", '"{""src"": ""csv"", ""x"": 0.10}"'),
        (new_id(), users[0], "2.25", "YES", ""),
        (new_id(), users[1], "0.000001", "1", ""),
        (new_id(), users[1], "100", "no", ""),
        (new_id(), users[1], "7", "", ""),
        (new_id(), users[1], "8", "0", ""),
    ]
    path = tmp_path / "actions.csv"
    with path.open("w") as handle:
        handle.write("action_id,user_id,lbs,logged_at,verified,metadata\n")
        for action_id, user, lbs, verified, metadata in rows:
            handle.write(f"{action_id},{user},{lbs},2025-11-01T00:00:00Z,{verified},{metadata}\n")
            handle.write("\n")  # blank lines are skipped
    summary = out_json(cli(db_url, "backfill", str(path)))
    assert (summary["rows"], summary["inserted_count"]) == (6, 6)
    assert summary["global_total_lbs"] == "3.750001"
    assert user_totals(db_url) == {users[0]: "3.750000", users[1]: "0.000001"}
    metadata = query(
        db_url,
        "SELECT metadata::text FROM bulk_sync.user_actions WHERE action_id = %s::uuid",
        (rows[0][0],),
    )[0][0]
    assert metadata == '{"x": 0.10, "src": "csv"}'

    # The same file with `verified` now true for the unverified rows verifies them.
    path2 = tmp_path / "verify.csv"
    path2.write_text(
        "action_id,user_id,lbs,logged_at,verified\n"
        f"{rows[3][0]},{users[1]},100,2025-11-01T00:00:00Z,t\n"
    )
    verified = out_json(cli(db_url, "backfill", str(path2)))
    assert verified["verified_count"] == 1
    assert global_total(db_url) == "103.750001"


def test_backfill_ndjson_from_stdin(db_url: str) -> None:
    user = new_id()
    lines = [
        json.dumps(action(new_id(), user, lbs, "2025-11-01T00:00:00Z"))
        for lbs in ("0.1", "0.2", "0.3")
    ]
    text = "\n".join([lines[0], "", lines[1], "   ", lines[2]]) + "\n"
    summary = out_json(cli(db_url, "backfill", "--format", "ndjson", "-", stdin=text))
    assert summary["rows"] == 3
    assert summary["global_total_lbs"] == "0.600000"
    assert user_totals(db_url) == {user: "0.600000"}


def test_backfill_json_array_keeps_exact_numbers(db_url: str, tmp_path: Path) -> None:
    user = new_id()
    path = tmp_path / "array.json"
    # lbs as exact JSON numbers: 0.1 + 0.2 must be 0.300000, not a binary-float artefact.
    path.write_text(
        "[\n"
        f'  {{"action_id": "{new_id()}", "user_id": "{user}", "lbs": 0.1,'
        ' "logged_at": "2025-11-01T00:00:00Z", "verified": true},\n'
        f'  {{"action_id": "{new_id()}", "user_id": "{user}", "lbs": 0.2,'
        ' "logged_at": "2025-11-01T00:00:00+01:00", "verified": true,'
        ' "metadata": {"tags": ["a", 1E+2]}}\n'
        "]\n"
    )
    summary = out_json(cli(db_url, "backfill", str(path)))
    assert (summary["rows"], summary["global_total_lbs"]) == (2, "0.300000")
    assert user_totals(db_url) == {user: "0.300000"}


def test_json_reads_exact_decimals_from_text_and_bytes(db_url: str) -> None:
    """The one decoder the runner shares, psycopg's jsonb loader included (it hands it bytes)."""
    document = '{"lbs": 0.1, "n": 3, "big": 123456789012345678.123456}'
    expected = {"lbs": Decimal("0.1"), "n": 3, "big": Decimal("123456789012345678.123456")}
    for encoded in (
        document,
        document.encode(),
        b"\xef\xbb\xbf" + document.encode(),
        document.encode("utf-16"),
        memoryview(document.encode()),
    ):
        value = loads(encoded)
        assert value == expected
        assert type(value["lbs"]) is Decimal
        assert type(value["n"]) is int
    for bad, why in (
        ("NaN", "NaN is not valid JSON"),
        ('{"lbs": Infinity}', "Infinity is not valid JSON"),
        ("[-Infinity]", "-Infinity is not valid JSON"),
        ("\ufeff{}", "Expecting value"),
        ("{", "Expecting property name"),
    ):
        with pytest.raises(ValueError, match=why):
            loads(bad)
    with psycopg.connect(db_url) as conn:
        row = conn.execute("SELECT %s::jsonb, '[1e-6]'::jsonb", (document,)).fetchone()
    assert row == (expected, [Decimal("0.000001")])
    assert type(row[0]["lbs"]) is Decimal


def test_backfill_chunks_by_user_and_replays_with_an_idempotency_key(
    db_url: str, tmp_path: Path
) -> None:
    users = sorted(new_id() for _ in range(5))
    path = tmp_path / "five.ndjson"
    path.write_text(
        "".join(
            json.dumps(action(new_id(), user, f"1.00000{i}", "2025-11-01T00:00:00Z")) + "\n"
            for i, user in enumerate(reversed(users), start=1)
        )
    )
    args = ("backfill", str(path), "--batch-size", "2", "--idempotency-key", "load-1")
    first = out_json(cli(db_url, *args))
    # Chunks of whole users, about 2 rows each, in user_id order: 2 + 2 + 1.
    assert (first["rows"], first["batches"], first["inserted_count"]) == (5, 3, 5)
    assert (first["affected_users"], first["replayed"]) == (5, 0)
    assert first["global_total_lbs"] == "5.000015"
    keys = [
        row[0]
        for row in query(
            db_url, "SELECT idempotency_key FROM bulk_sync.idempotency_keys ORDER BY 1"
        )
    ]
    assert keys == ["load-1:1", "load-1:2", "load-1:3"]

    # Each chunk replays its first response: the summary says so, and that this run inserted
    # nothing, as a rerun without a key would (every row skipped).
    replay = out_json(cli(db_url, *args))
    assert replay == {
        "success": True,
        "rows": 5,
        "batches": 3,
        "inserted_count": 0,
        "skipped_count": 5,
        "verified_count": 0,
        "affected_users": 0,
        "global_total_lbs": "5.000015",
        "replayed": 3,
    }
    assert global_total(db_url) == "5.000015"

    # Chunks that replay and a chunk that applies again (its key gone): only the latter is
    # counted as applied, and its rows, already stored, are skipped.
    query(db_url, "DELETE FROM bulk_sync.idempotency_keys WHERE idempotency_key = 'load-1:3'")
    mixed = out_json(cli(db_url, *args))
    assert (mixed["replayed"], mixed["inserted_count"], mixed["skipped_count"]) == (2, 0, 5)
    assert (mixed["affected_users"], mixed["global_total_lbs"]) == (0, "5.000015")

    # The same key for other rows is BS003, and changes nothing.
    other = tmp_path / "other.ndjson"
    other.write_text(json.dumps(action(new_id(), users[0], "9", "2025-11-01T00:00:00Z")) + "\n")
    reused = cli(db_url, "backfill", str(other), "--idempotency-key", "load-1")
    message = assert_error(reused, 2, "chunk 1 of 1", "load-1:1", "no chunk committed")
    assert "another --idempotency-key" in message
    assert "run the same command" not in message
    assert global_total(db_url) == "5.000015"

    over = cli(db_url, "backfill", str(path), "--batch-size", "50001")
    assert over.exit_code == 2

    # One user's rows are never split across chunks, however small --batch-size is.
    one_user = tmp_path / "one-user.ndjson"
    user = new_id()
    one_user.write_text(
        "".join(
            json.dumps(action(new_id(), user, "1", "2025-11-01T00:00:00Z")) + "\n" for _ in range(5)
        )
    )
    single = out_json(cli(db_url, "backfill", str(one_user), "--batch-size", "2"))
    assert (single["batches"], single["affected_users"]) == (1, 1)


def assert_bad_rows(result: Result, *expected: tuple[str, str]) -> list[str]:
    """Exit 2; one `bulk-sync: <where> ...` line per bad row, with (where, field) in order, then
    one `bulk-sync: error: ... nothing was applied` line; no traceback."""
    assert result.exit_code == 2, (result.exit_code, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith("bulk-sync: error: "), lines
    assert "nothing was applied" in lines[-1], lines[-1]
    rows = lines[:-1]
    assert len(rows) == len(expected), rows
    for line, (where, fragment) in zip(rows, expected, strict=True):
        assert line.startswith(f"bulk-sync: {where} ") or line.startswith(f"bulk-sync: {where}:")
        assert fragment in line, (fragment, line)
    return rows


def test_backfill_reports_every_bad_row_and_applies_nothing(db_url: str, tmp_path: Path) -> None:
    user = new_id()
    good = [action(new_id(), user, "1", "2025-11-01T00:00:00Z") for _ in range(3)]
    bad = action(new_id(), user, "1.1234567", "2025-11-01T00:00:00Z")
    worse = action("a1-uuid", user, "-2", "2025-11-01T00:00:00")
    path = tmp_path / "bad.ndjson"
    # Line 3 is blank; the bad rows are lines 5 and 7, after good ones.
    path.write_text(
        "\n".join(
            [
                json.dumps(good[0]),
                json.dumps(good[1]),
                "",
                json.dumps(good[2]),
                json.dumps(bad),
                json.dumps(action(new_id(), user, "3", "2025-11-01T00:00:00Z")),
                json.dumps(worse),
            ]
        )
        + "\n"
    )
    result = cli(db_url, "backfill", str(path), "--batch-size", "2")
    assert_bad_rows(
        result,
        ("line 5", "lbs has more than six decimal places"),
        ("line 7", "action_id is not a valid uuid"),
        ("line 7", "lbs must not be negative"),
        ("line 7", "logged_at has no zone offset"),
    )
    assert "2 bad rows" in result.stderr
    assert result.stdout == ""
    assert global_total(db_url) == "0.000000"  # the good rows were not applied either
    assert query(db_url, "SELECT count(*) FROM bulk_sync.user_actions")[0][0] == 0


def test_backfill_reports_parse_errors_before_sending_anything(db_url: str, tmp_path: Path) -> None:
    good = json.dumps(action(new_id(), new_id(), "1", "2025-11-01T00:00:00Z"))
    ndjson = tmp_path / "broken.ndjson"
    ndjson.write_text(f"{good}\n\n{{not json\n")
    assert_error(cli(db_url, "backfill", str(ndjson)), 2, "line 3:", "invalid JSON")

    csv_file = tmp_path / "short.csv"
    csv_file.write_text(
        "action_id,user_id,lbs,logged_at,verified\n"
        f"{new_id()},{new_id()},1,2025-11-01T00:00:00Z,true\n"
        "a,b,c\n"
    )
    assert_error(cli(db_url, "backfill", str(csv_file)), 2, "line 3:", "missing data")

    typo = tmp_path / "typo.csv"
    typo.write_text("action_id,user_id,lbs,logged_at,verifed\n")
    assert_error(cli(db_url, "backfill", str(typo)), 2, "line 1:", "verifed")

    maybe = tmp_path / "maybe.csv"
    maybe.write_text(
        "action_id,user_id,lbs,logged_at,verified\n"
        f"{new_id()},{new_id()},1,2025-11-01T00:00:00Z,maybe\n"
    )
    assert_bad_rows(cli(db_url, "backfill", str(maybe)), ("line 2", "verified must be"))

    marker = tmp_path / "marker.csv"
    marker.write_text(
        "action_id,user_id,lbs,logged_at,verified\n"
        f"{new_id()},{new_id()},1,2025-11-01T00:00:00Z,true\n"
        "\\.\n"
        f"{new_id()},{new_id()},1,2025-11-01T00:00:00Z,true\n"
    )
    assert_error(cli(db_url, "backfill", str(marker)), 2, "line 3:", "\\.")

    array = tmp_path / "array.json"
    array.write_text(f"[{good}, 42]")
    assert_bad_rows(cli(db_url, "backfill", str(array)), ("element 2", "must be a JSON object"))

    no_actions = tmp_path / "object.json"
    no_actions.write_text('{"rows": []}')
    assert_error(cli(db_url, "backfill", str(no_actions)), 2, '"actions"')

    missing = cli(db_url, "backfill", str(tmp_path / "nope.csv"))
    assert missing.exit_code == 2
    assert global_total(db_url) == "0.000000"


def test_backfill_streams_in_flat_memory(db_url: str, tmp_path: Path) -> None:
    rows, users = 40_000, 400
    path = tmp_path / "many.ndjson"
    expected = Decimal(0)
    with path.open("w") as handle:
        for i in range(rows):
            lbs = Decimal(i % 1000) + Decimal(i % 997).scaleb(-6)
            expected += lbs
            user = f"00000000-0000-4000-8000-{i % users:012d}"
            record = action(
                str(uuid.UUID(int=i + 1, version=4)), user, str(lbs), "2025-11-01T00:00:00Z"
            )
            record["metadata"] = {"i": i, "pad": "x" * 100}
            handle.write(json.dumps(record) + "\n")
    size = path.stat().st_size

    tracemalloc.start()
    try:
        with path.open("rb") as handle:
            summary = backfill(db_url, handle, name=str(path), batch_size=1000)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()

    # 400 users of 100 rows: chunks of 10 whole users.
    assert (summary["rows"], summary["batches"]) == (rows, 40)
    assert summary["global_total_lbs"] == amount(expected)
    assert global_total(db_url) == amount(expected)
    # The file streams to the server block by block; it is never in memory whole.
    assert peak < size / 5, (peak, size)


# --------------------------------------------------------------------------- reconcile


def test_reconcile_dry_run_exits_1_on_drift_and_reconcile_fixes_it(seeded: str) -> None:
    clean = cli(seeded, "reconcile", "--dry-run")
    assert out_json(clean)["in_sync"] is True

    query(seeded, "UPDATE bulk_sync.global_emissions SET total_lbs_saved = 30.5 WHERE id = 1")
    assert global_total(seeded) == "30.500000"

    drift = cli(seeded, "reconcile", "--dry-run")
    assert drift.exit_code == 1, (drift.stdout, drift.stderr)
    report = loads(drift.stdout)
    assert report["in_sync"] is False
    assert report["global_total"] == "30.500000"
    assert report["user_stats_sum"] == "30.900000"
    assert report["discrepancy"] == "0.400000"
    assert report["fixed"] is False
    assert "out of sync" in drift.stderr
    assert global_total(seeded) == "30.500000"  # a dry run changes nothing
    assert query(seeded, "SELECT count(*) FROM bulk_sync.emissions_corrections")[0][0] == 0

    fixed = out_json(cli(seeded, "reconcile", "--performed-by", "cli-test"))
    assert fixed["fixed"] is True
    assert fixed["correction_id"] is not None
    assert global_total(seeded) == "30.900000"
    corrections = query(
        seeded,
        "SELECT previous_total::text, corrected_total::text, discrepancy::text, performed_by"
        " FROM bulk_sync.emissions_corrections WHERE correction_id = %s::uuid",
        (fixed["correction_id"],),
    )
    assert corrections == [("30.500000", "30.900000", "0.400000", "cli-test")]
    assert cli(seeded, "reconcile", "--dry-run").exit_code == 0


# --------------------------------------------------------------------------- leaderboard


def test_leaderboard_json_and_table(seeded: str) -> None:
    board = out_json(cli(seeded, "leaderboard", "--json"))
    assert board == [
        {
            "rank": 1,
            "user_id": U3,
            "total_lbs": "10.400000",
            "action_count": 1,
            "last_action_at": "2025-11-05T10:10:00Z",
        },
        {
            "rank": 2,
            "user_id": U2,
            "total_lbs": "10.300000",
            "action_count": 1,
            "last_action_at": "2025-11-05T10:05:00Z",
        },
        {
            "rank": 3,
            "user_id": U1,
            "total_lbs": "10.200000",
            "action_count": 1,
            "last_action_at": "2025-11-05T10:00:00Z",
        },
    ]
    assert [
        row["user_id"] for row in out_json(cli(seeded, "leaderboard", "--json", "--limit", "2"))
    ] == [U3, U2]
    around = out_json(cli(seeded, "leaderboard", "--json", "--user", U1))
    assert [(row["rank"], row["user_id"]) for row in around] == [(1, U3), (2, U2), (3, U1)]

    table = cli(seeded, "leaderboard")
    assert table.exit_code == 0
    lines = table.stdout.splitlines()
    assert lines[0].split() == ["rank", "user_id", "total_lbs", "actions", "last_action_at"]
    assert [line.split() for line in lines[1:]] == [
        ["1", U3, "10.400000", "1", "2025-11-05T10:10:00Z"],
        ["2", U2, "10.300000", "1", "2025-11-05T10:05:00Z"],
        ["3", U1, "10.200000", "1", "2025-11-05T10:00:00Z"],
    ]
    assert len({line.index("10.") for line in lines[1:]}) == 1  # aligned column

    assert cli(seeded, "leaderboard", "--user", "not-a-uuid").exit_code == 2


def test_numbers_wider_than_the_sql_parameters_are_bad_usage(db_url: str) -> None:
    """A number past the SQL parameter's type (int, bigint) is refused by the option itself, as
    bad usage on one line: it never reaches PostgreSQL as a type no function takes (exit 3 with a
    hint to run migrate)."""
    cases = [
        (("leaderboard", "--limit", "2147483648"), "--limit", "2147483647"),
        (("leaderboard", "--limit", "0"), "--limit", "2147483647"),
        (("listen", "--after", "99999999999999999999"), "--after", "9223372036854775807"),
        (("listen", "--after", "9223372036854775808"), "--after", "9223372036854775807"),
        (("worker", "--once", "--reconcile-every", "99999999999999999999"), "--reconcile-every"),
    ]
    for args, *fragments in cases:
        line = assert_error(cli(db_url, *args), 2, *fragments)
        assert "migrate" not in line
    assert query(db_url, "SELECT count(*) FROM bulk_sync.reconciliation_runs") == [(0,)]

    # The widest int the option takes reaches the SQL, whose own rule answers (BS001).
    widest = cli(db_url, "leaderboard", "--limit", "2147483647")
    line = assert_error(widest, 2, "p_limit")
    assert "migrate" not in line


# --------------------------------------------------------------------------- status, schedule


def test_status_reports_totals_and_the_last_reconcile(seeded: str) -> None:
    before = out_json(cli(seeded, "status", "--json"))
    assert {
        "global_total_lbs",
        "users",
        "counted_actions",
        "last_reconcile",
        "events_pending",
        "last_event_id",
        "worker_alive",
    } <= set(before)
    assert before["global_total_lbs"] == "30.900000"
    assert (before["users"], before["counted_actions"]) == (3, 3)
    assert before["last_reconcile"] is None
    assert before["worker_alive"] is False

    text = cli(seeded, "status")
    assert text.exit_code == 0
    assert "30.900000" in text.stdout
    assert "last reconcile:" in text.stdout
    assert "never" in text.stdout

    out_json(cli(seeded, "reconcile", "--performed-by", "status-test"))
    after = out_json(cli(seeded, "status", "--json"))
    assert after["last_reconcile"]["performed_by"] == "status-test"
    assert "by status-test: in sync" in cli(seeded, "status").stdout


def test_schedule_without_pg_cron_exits_2(db_url: str) -> None:
    result = cli(db_url, "schedule")
    assert_error(result, 2, "pg_cron is not installed", "bulk-sync worker")
    assert cli(db_url, "schedule", "--unschedule").exit_code == 2


@pytest.mark.pg_cron
def test_schedule_with_pg_cron(cron_url: str) -> None:
    created = not query(cron_url, "SELECT 1 FROM pg_extension WHERE extname = 'pg_cron'")
    query(cron_url, "CREATE EXTENSION IF NOT EXISTS pg_cron")
    try:
        result = cli(cron_url, "schedule", "--cron", "*/5 * * * *")
        assert result.exit_code == 0, result.stderr
        assert "bulk-sync-reconcile" in result.stdout
        jobs = query(
            cron_url,
            "SELECT schedule, command FROM cron.job WHERE jobname = 'bulk-sync-reconcile'",
        )
        assert jobs == [("*/5 * * * *", "SELECT bulk_sync.reconcile()")]
        assert cli(cron_url, "schedule", "--unschedule").exit_code == 0
        assert query(cron_url, "SELECT 1 FROM cron.job WHERE jobname = 'bulk-sync-reconcile'") == []
    finally:
        query(
            cron_url,
            "SELECT cron.unschedule(jobid) FROM cron.job WHERE jobname = 'bulk-sync-reconcile'",
        )
        if created:
            query(cron_url, "DROP EXTENSION IF EXISTS pg_cron")


# --------------------------------------------------------------------------- worker


def worker_log(result: Result) -> list[dict[str, Any]]:
    return [loads(line) for line in result.stderr.splitlines() if line.startswith("{")]


def test_worker_once_publishes_reconciles_and_prunes(db_url: str) -> None:
    out_json(cli(db_url, *log_args(new_id(), new_id(), "2.5")))
    assert out_json(cli(db_url, "status", "--json"))["events_pending"] >= 1

    first = cli(db_url, "worker", "--once")
    assert first.exit_code == 0, first.stderr
    events = worker_log(first)
    kinds = [event["event"] for event in events]
    assert kinds[:2] == ["started", "active"]
    assert {"published", "reconciled", "pruned"} <= set(kinds)
    published = next(event for event in events if event["event"] == "published")
    assert published["count"] >= 1
    reconciled = next(event for event in events if event["event"] == "reconciled")
    assert reconciled["in_sync"] is True
    status = out_json(cli(db_url, "status", "--json"))
    assert status["events_pending"] == 0
    assert status["last_reconcile"]["performed_by"] == "worker"

    # Reconciled a moment ago: with the default hourly schedule it is not due again.
    second = cli(db_url, "worker", "--once")
    assert "reconciled" not in [event["event"] for event in worker_log(second)]
    runs = query(db_url, "SELECT count(*) FROM bulk_sync.reconciliation_runs")[0][0]
    assert runs == 1


def test_the_worker_ends_the_loads_of_killed_runners(db_url: str) -> None:
    """A runner killed between the check and the apply leaves its load and checked rows; the
    worker's prune ends them without waiting for the next load, and says how many it ended."""
    load = abandoned_load(db_url)
    assert load_rows(db_url, load) == 1

    result = cli(db_url, "worker", "--once")
    assert result.exit_code == 0, result.stderr
    pruned = next(event for event in worker_log(result) if event["event"] == "pruned")
    assert pruned["abandoned_loads"] == 1
    assert load_rows(db_url, load) == 0
    assert query(db_url, "SELECT count(*) FROM bulk_sync._loads")[0][0] == 0


def test_the_worker_names_a_reader_whose_open_transaction_holds_the_events(
    db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A reader calls events_since in a transaction it leaves open: it holds publish_events' lock,
    so no event can be published until that transaction ends. The worker says which session it is,
    once, and publishes as soon as it ends."""
    monkeypatch.setattr(events, "BLOCKED_AFTER_S", 1)
    with psycopg.connect(db_url) as reader:  # not autocommit: its transaction stays open
        reader.execute("SELECT * FROM bulk_sync.events_since(0)").fetchall()
        out_json(cli(db_url, *log_args(new_id(), new_id(), "2.5")))
        time.sleep(1.5)  # idle in its transaction for longer than BLOCKED_AFTER_S
        held = cli(db_url, "worker", "--once")
        assert held.exit_code == 0, held.stderr
        kinds = [event["event"] for event in worker_log(held)]
        assert "published" not in kinds
        (blocked,) = [event for event in worker_log(held) if event["event"] == "publish_blocked"]
        assert blocked["pid"] == reader.info.backend_pid
        assert blocked["state"] == "idle in transaction"
        assert "events_since" in blocked["hint"]
        reader.commit()

    freed = cli(db_url, "worker", "--once")
    events_logged = worker_log(freed)
    assert "publish_blocked" not in [event["event"] for event in events_logged]
    (published,) = [event for event in events_logged if event["event"] == "published"]
    assert published["count"] >= 1


def test_the_worker_times_a_holder_whose_session_it_cannot_see(
    db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As a role without pg_read_all_stats, the worker cannot see how long another role's session
    has sat in its transaction: it times the holder of the publish lock across its own passes, and
    names it once it has held on for BLOCKED_AFTER_S."""
    monkeypatch.setattr(events, "BLOCKED_AFTER_S", 1)
    tag = uuid.uuid4().hex[:8]
    reader_role, worker_role = f"bs_reader_{tag}", f"bs_worker_{tag}"
    query(db_url, f"CREATE ROLE {reader_role} LOGIN IN ROLE bulk_sync_reader")
    query(db_url, f"CREATE ROLE {worker_role} LOGIN IN ROLE bulk_sync_admin")
    try:
        with psycopg.connect(db_url.replace("postgres@", f"{reader_role}@")) as reader:
            reader_pid = reader.info.backend_pid
            reader.execute("SELECT * FROM bulk_sync.events_since(0)").fetchall()
            out_json(cli(db_url, *log_args(new_id(), new_id(), "2.5")))
            log, stopper = io.StringIO(), events.Stopper()
            worker = events.Worker(
                db_url.replace("postgres@", f"{worker_role}@"),
                reconcile_every_s=3600,
                log=log,
                stopper=stopper,
            )
            thread = threading.Thread(target=worker.run)
            thread.start()
            try:
                wait_for(lambda: "publish_blocked" in log.getvalue(), 30, what="the warning")
            finally:
                stopper.stopped = True
                thread.join(timeout=30)
            reader.rollback()
        records = [loads(line) for line in log.getvalue().splitlines()]
        (blocked,) = [record for record in records if record["event"] == "publish_blocked"]
        assert blocked["pid"] == reader_pid
        assert blocked["state"] is None  # another role's session: hidden from the worker
        assert blocked["held_s"] >= 1
        assert "published" not in [record["event"] for record in records]
    finally:
        query(db_url, f"DROP ROLE {reader_role}")
        query(db_url, f"DROP ROLE {worker_role}")


def test_dry_runs_do_not_postpone_the_workers_reconcile(db_url: str) -> None:
    """A dry run fixes nothing: however recent, it must not count as the worker's last run."""
    user = new_id()
    out_json(cli(db_url, *log_args(new_id(), user, "2.5")))
    query(db_url, "UPDATE bulk_sync.global_emissions SET total_lbs_saved = 100 WHERE id = 1")
    # Monitoring checks more often than --reconcile-every: each dry run reports the drift.
    for _ in range(2):
        assert cli(db_url, "reconcile", "--dry-run").exit_code == 1

    result = cli(db_url, "worker", "--once", "--reconcile-every", "1h")
    assert result.exit_code == 0, result.stderr
    reconciled = [event for event in worker_log(result) if event["event"] == "reconciled"]
    assert len(reconciled) == 1, worker_log(result)
    assert (reconciled[0]["in_sync"], reconciled[0]["fixed"]) == (False, True)
    assert global_total(db_url) == "2.500000"
    runs = query(
        db_url,
        "SELECT performed_by, auto_correct FROM bulk_sync.reconciliation_runs ORDER BY started_at",
    )
    assert runs[-1] == ("worker", True)

    # A run that could correct does postpone it: the worker's own, a moment ago.
    again = cli(db_url, "worker", "--once", "--reconcile-every", "1h")
    assert "reconciled" not in [event["event"] for event in worker_log(again)]


def test_worker_waits_as_standby_while_another_holds_the_lock(db_url: str) -> None:
    with psycopg.connect(db_url, autocommit=True) as holder:
        holder.execute("SELECT pg_advisory_lock(%s, %s)", WORKER_LOCK)
        result = cli(db_url, "worker", "--once")
    assert result.exit_code == 0
    kinds = [event["event"] for event in worker_log(result)]
    assert "standby" in kinds
    assert "active" not in kinds
    assert "published" not in kinds


def test_worker_rejects_bad_options(db_url: str) -> None:
    assert cli(db_url, "worker", "--once", "--reconcile-every", "soon").exit_code == 2
    assert_error(cli(db_url, "worker", "--once", "--event-retention", "bogus"), 2, "interval")
    assert_error(cli(db_url, "worker", "--once", "--event-retention", "-1 days"), 2, "negative")


def test_worker_runs_until_sigterm(db_url: str) -> None:
    proc = subprocess.Popen(
        [console_script(), "--database-url", db_url, "worker", "--reconcile-every", "2h30m"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=subprocess_env(),
    )
    try:
        log = Lines(proc.stderr)
        log.until(lambda line: '"active"' in line)
        assert out_json(cli(db_url, "status", "--json"))["worker_alive"] is True
        out_json(cli(db_url, *log_args(new_id(), new_id(), "1")))
        log.until(lambda line: '"published"' in line)
    finally:
        code = stop(proc)
    assert code == 0
    assert any('"stopped"' in line for line in log.rest())


# --------------------------------------------------------------------------- listen


def test_listen_catches_up_follows_live_and_survives_a_lost_connection(seeded: str) -> None:
    existing = query(seeded, "SELECT event_id FROM bulk_sync.events_since(0, 1000)")
    assert len(existing) == 3
    proc = subprocess.Popen(
        [console_script(), "--database-url", seeded, "listen", "--after", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=subprocess_env(),
    )
    try:
        out = Lines(proc.stdout)
        caught_up = [loads(out.next()) for _ in range(3)]
        assert [e["event_id"] for e in caught_up] == [row[0] for row in existing]
        assert {(e["user_id"], e["user_total_lbs"]) for e in caught_up} == {
            (U1, "10.200000"),
            (U2, "10.300000"),
            (U3, "10.400000"),
        }

        user = new_id()
        out_json(cli(seeded, *log_args(new_id(), user, "0.5")))
        live = loads(out.next())
        assert live["user_id"] == user
        assert live["user_total_lbs"] == "0.500000"
        assert live["global_total_lbs"] == "31.400000"

        killed = query(
            seeded,
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
            " WHERE application_name = 'bulk-sync listen' AND datname = current_database()",
        )[0][0]
        assert killed == 1
        out_json(cli(seeded, *log_args(new_id(), user, "0.25")))
        after_loss = loads(out.next(timeout=30))
        assert after_loss["event_id"] > live["event_id"]
        assert after_loss["user_total_lbs"] == "0.750000"
    finally:
        code = stop(proc)
    assert code == 0
    assert out.rest() == []  # nothing printed twice

    # A new listener resuming from an id prints what came after it, and only that.
    resumed = subprocess.Popen(
        [console_script(), "--database-url", seeded, "listen", "--after", str(live["event_id"])],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=subprocess_env(),
    )
    try:
        again = Lines(resumed.stdout)
        assert loads(again.next()) == after_loss
    finally:
        assert stop(resumed, signal.SIGINT) == 0
    assert again.rest() == []


# --------------------------------------------------------------------------- demo, embedded


def test_demo_on_a_given_database_is_idempotent(db_url: str) -> None:
    first = cli(db_url, "demo")
    assert first.exit_code == 0, first.stderr
    assert "global total lbs: 30.900000" in first.stdout
    for user, total in ((U1, "10.200000"), (U2, "10.300000"), (U3, "10.400000")):
        assert f"{user}  {total}" in first.stdout
    second = cli(db_url, "demo")
    assert second.stdout == first.stdout
    assert global_total(db_url) == "30.900000"


@pytest.fixture
def embedded_home() -> Iterator[Path]:
    """A clean BULK_SYNC_HOME the postgres OS user can reach (under /tmp, mode 0755)."""
    home = Path(tempfile.mkdtemp(prefix="bs-home-", dir="/tmp"))
    home.chmod(0o755)
    try:
        yield home
    finally:
        env = subprocess_env(BULK_SYNC_HOME=str(home))
        subprocess.run(
            [console_script(), "db", "stop"], env=env, capture_output=True, check=False, timeout=120
        )
        shutil.rmtree(home, ignore_errors=True)


def test_embedded_default_from_a_clean_directory(embedded_home: Path) -> None:
    env = subprocess_env(BULK_SYNC_HOME=str(embedded_home))

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [console_script(), *args],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )

    first = run("demo")
    assert first.returncode == 0, first.stderr
    lines = first.stdout.splitlines()
    # The first line names the data directory and the server: data-<major>, its version.
    described = re.match(
        rf"database: embedded default in {re.escape(str(embedded_home))}/data-(\d+): "
        r"PostgreSQL (\d+)\.\d+ ",
        lines[0],
    )
    assert described, lines[0]
    major = described[1]
    assert described[2] == major
    configured = os.environ.get("BULK_SYNC_PG_BIN")
    if configured:  # scripts/test names each pass's server
        assert f"({Path(configured).absolute()})" in lines[0], lines[0]
    assert "global total lbs: 30.900000" in lines
    assert f"  {U1}  10.200000" in lines
    assert f"  {U2}  10.300000" in lines
    assert f"  {U3}  10.400000" in lines
    board = lines[lines.index("leaderboard:") + 2 :]
    assert [(row.split()[0], row.split()[1]) for row in board] == [("1", U3), ("2", U2), ("3", U1)]
    assert (embedded_home / f"data-{major}" / "PG_VERSION").read_text().strip() == major
    assert "creating the embedded PostgreSQL database" in first.stderr

    second = run("demo")
    assert second.returncode == 0, second.stderr
    assert second.stdout == first.stdout
    assert "creating" not in second.stderr  # reused, not re-created

    url = run("db", "url")
    assert url.returncode == 0
    assert url.stdout.strip() == (
        f"postgresql://postgres@/bulk_sync?host={embedded_home}/run&port={embedded.PORT}"
    )
    assert global_total(url.stdout.strip()) == "30.900000"

    stopped = run("db", "stop")
    assert stopped.returncode == 0
    assert "stopped" in stopped.stdout
    assert not (embedded_home / "run" / f".s.PGSQL.{embedded.PORT}").exists()
    assert "not running" in run("db", "stop").stdout
