"""The bulk core behind `bulk-sync backfill FILE` and bulk_backfill(jsonb): stage, check, apply.

What the file path owes its users, each shown against a real database: the whole file is checked
before anything is applied (BS001 anywhere, BS002 within the file or against stored actions);
a rerun changes nothing; chunks are whole users, so each user's totals and event are written once
per chunk; live writers keep working while a load runs; and the stage a definer function reads
cannot be swapped for a caller's own table.
"""

from __future__ import annotations

import csv
import io
import json
import signal
import subprocess
import sys
import textwrap
import threading
from decimal import Decimal
from pathlib import Path
from typing import IO, Any

import psycopg
import pytest

from bulk_sync import backfill as backfill_module
from bulk_sync.backfill import backfill
from bulk_sync.errors import CliError
from helpers import (
    abandoned_load,
    action,
    amount,
    assert_exact_totals,
    cli_command,
    cli_env,
    connect,
    load_rows,
    log_action,
    logged_at,
    new_id,
    sqlstate,
    start_cli,
    stop_process,
    wait_for,
)


def write_csv(path: Path, rows: list[tuple[str, str, str, str, str]]) -> Decimal:
    """A CSV of (action_id, user_id, lbs, logged_at, verified); returns the verified amount."""
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["action_id", "user_id", "lbs", "logged_at", "verified"])
        writer.writerows(rows)
    return sum((Decimal(r[2]) for r in rows if r[4] == "true"), Decimal(0))


def load(url: str, path: Path, **options: Any) -> dict[str, Any]:
    with path.open("rb") as handle:
        return backfill(url, handle, name=str(path), **options)


def load_error(url: str, path: Path, **options: Any) -> CliError:
    with pytest.raises(CliError) as caught:
        load(url, path, **options)
    return caught.value


def counts(url: str) -> tuple[int, int, int]:
    """(actions, user_stats rows, outbox rows + published events): a load that changes nothing
    keeps all three."""
    with connect(url) as conn:
        row = conn.execute(
            "SELECT (SELECT count(*) FROM bulk_sync.user_actions),"
            " (SELECT count(*) FROM bulk_sync.user_stats),"
            " (SELECT count(*) FROM bulk_sync._event_outbox)"
            " + (SELECT count(*) FROM bulk_sync.events)"
        ).fetchone()
    return int(row[0]), int(row[1]), int(row[2])


def many_rows(users: list[str], per_user: int) -> list[tuple[str, str, str, str, str]]:
    return [
        (new_id(), user, f"{i}.{j:06d}", logged_at(i * 60 + j), "true" if j % 10 else "false")
        for i, user in enumerate(users)
        for j in range(per_user)
    ]


def test_a_bs002_against_stored_actions_is_found_before_anything_is_applied(
    db_url: str, tmp_path: Path
) -> None:
    stored = new_id()
    with connect(db_url) as conn:
        log_action(
            conn,
            {
                "action_id": stored,
                "user_id": "00000000-0000-4000-8000-000000000001",
                "lbs": "1",
                "logged_at": logged_at(0),
                "verified": True,
            },
        )
    before = counts(db_url)
    rows = many_rows([new_id() for _ in range(50)], 20)
    # The 700th row reuses the stored action_id with another amount.
    rows.insert(700, (stored, "00000000-0000-4000-8000-000000000001", "2", logged_at(0), "true"))
    write_csv(tmp_path / "conflict.csv", rows)

    error = load_error(db_url, tmp_path / "conflict.csv", batch_size=100)
    assert error.exit_code == 2
    assert len(error.details) == 1
    assert error.details[0].startswith(f"line 702 (action_id {stored}): BS002: lbs differs from")
    assert "lbs=1.000000" in error.details[0]
    assert "lbs=2.000000" in error.details[0]
    assert counts(db_url) == before  # no chunk was applied, not even the ones before line 702
    with connect(db_url) as conn:
        assert_exact_totals(conn, Decimal(1))


def test_every_bad_row_is_reported_up_to_100(db_url: str, tmp_path: Path) -> None:
    user = new_id()
    rows = [(new_id(), user, "1", logged_at(i), "true") for i in range(300)]
    for i in range(0, 300, 2):  # 150 bad rows: every other one
        rows[i] = (rows[i][0], user, "1.0000001", logged_at(i), "true")
    # One action_id twice in the file with other facts: BS002 within the file, found as well.
    rows.append((rows[1][0], user, "5", logged_at(1), "true"))
    write_csv(tmp_path / "bad.csv", rows)

    error = load_error(db_url, tmp_path / "bad.csv")
    assert error.exit_code == 2
    assert len(error.details) == 100
    lines = [int(d.split()[1]) for d in error.details]
    assert lines == list(range(2, 202, 2))  # in file order: the first 100 bad rows
    assert all("lbs has more than six decimal places" in d for d in error.details)
    assert "100 bad rows (the first 100)" in error.message
    assert counts(db_url) == (0, 0, 0)

    # A value holding a line break is shown on its problem's one line.
    with (tmp_path / "broken.csv").open("w", newline="") as handle:
        csv.writer(handle).writerows(
            [
                ["action_id", "user_id", "lbs", "logged_at", "verified"],
                [new_id(), user, "1\n2", logged_at(0), "true"],
            ]
        )
    (detail,) = load_error(db_url, tmp_path / "broken.csv").details
    assert detail.endswith("[lbs: 1\\n2]"), detail

    # Rows with two bad fields each: every problem of the first 100 bad rows, not 100 problems.
    twice = [(r[0], r[1], "1.0000001", "yesterday", r[4]) for r in rows[:150]]
    write_csv(tmp_path / "twice.csv", twice)
    error = load_error(db_url, tmp_path / "twice.csv")
    lines = [int(d.split()[1]) for d in error.details]
    assert lines == [line for line in range(2, 102) for _ in range(2)]
    assert "100 bad rows (the first 100)" in error.message

    # With the decimals fixed, the duplicate action_id is what is left, named against its first row.
    fixed = [(r[0], r[1], "1", r[3], r[4]) for r in rows[:-1]] + [rows[-1]]
    write_csv(tmp_path / "dup.csv", fixed)
    error = load_error(db_url, tmp_path / "dup.csv")
    assert error.details == [
        f"line 302 (action_id {rows[1][0]}): BS002: lbs differs from an earlier row with the "
        f"same action_id, line 3 [stored: user_id={user} lbs=1.000000 logged_at={logged_at(1)}; "
        f"submitted: user_id={user} lbs=5.000000 logged_at={logged_at(1)}]"
    ]
    assert counts(db_url) == (0, 0, 0)


def test_values_out_of_the_common_forms_are_judged_one_by_one(db_url: str, tmp_path: Path) -> None:
    """A load matches the uuids and times of 10,000 lines at once against their common forms
    (_in_form). Two uuids in one field, or a time in its form but in the future, are still bad rows;
    valid values in other forms, in another group of lines, still load."""
    user = new_id()
    rows = [(new_id(), user, "1", logged_at(i), "true") for i in range(10_050)]
    good = list(rows)
    rows[3] = (f"{new_id()},{new_id()}", user, "1", logged_at(3), "true")
    rows[10_010] = (rows[10_010][0], user, "1", "2999-01-01T00:00:00Z", "true")
    write_csv(tmp_path / "forms.csv", rows)

    error = load_error(db_url, tmp_path / "forms.csv")
    assert error.exit_code == 2
    assert [int(d.split()[1]) for d in error.details] == [5, 10_012]
    assert "action_id is not a valid uuid" in error.details[0]
    assert "logged_at is more than 5 minutes in the future" in error.details[1]
    assert counts(db_url) == (0, 0, 0)

    good[3] = (good[3][0].upper(), user, "1", "2025-01-31T10:00:00+01:00", "true")
    good[10_010] = (good[10_010][0], user.upper(), "1", "2025-02-28 23:59:59.5Z", "true")
    amount = write_csv(tmp_path / "good.csv", good)
    assert load(db_url, tmp_path / "good.csv")["inserted_count"] == 10_050
    with connect(db_url) as conn:
        assert_exact_totals(conn, amount)


@pytest.fixture
def split_small_files(monkeypatch: pytest.MonkeyPatch) -> None:
    """Files of any size are cut into parts (``--jobs``), as large ones are."""
    monkeypatch.setattr(backfill_module, "SPLIT_MIN", 1)


@pytest.mark.usefixtures("split_small_files")
@pytest.mark.parametrize("fmt", ["csv", "ndjson"])
def test_a_file_checked_in_parts_names_the_same_lines(
    db_url: str, tmp_path: Path, fmt: str
) -> None:
    """Three sessions check three parts of a file: bad rows in each part, a blank line and a BS002
    between two parts are reported exactly as one session reports them."""
    users = [new_id() for _ in range(30)]
    rows = many_rows(users, 20)  # 600 rows
    rows[4] = (rows[4][0], rows[4][1], "-1", rows[4][3], rows[4][4])  # line 6, part 1
    rows[450] = (rows[450][0], rows[450][1], rows[450][2], "yesterday", rows[450][4])  # part 3
    rows[590] = (rows[10][0], rows[10][1], "99", rows[10][3], rows[10][4])  # BS002 with row 10
    path = tmp_path / f"parts.{fmt}"
    if fmt == "csv":
        write_csv(path, rows)
        text = path.read_text().splitlines(keepends=True)
        text.insert(401, "\n")  # a blank line before line 402, in the last part
    else:
        keys = ("action_id", "user_id", "lbs", "logged_at")
        text = [
            json.dumps({**dict(zip(keys, row, strict=False)), "verified": row[4] == "true"}) + "\n"
            for row in rows
        ]
        text.insert(400, "\n")
    path.write_text("".join(text))
    header = 1 if fmt == "csv" else 0
    with path.open("rb") as handle:
        assert len(backfill_module._parts(handle, fmt, 3) or []) == 3

    one = load_error(db_url, path, jobs=1)
    three = load_error(db_url, path, jobs=3)
    assert three.details == one.details
    assert three.message == one.message
    lines = [int(detail.split()[1]) for detail in three.details]
    assert lines == [5 + header, 452 + header, 592 + header]
    assert f"same action_id, line {11 + header} [" in three.details[2]
    assert counts(db_url) == (0, 0, 0)


@pytest.mark.usefixtures("split_small_files")
def test_bad_rows_are_named_by_file_line_after_fields_quoted_across_lines(
    db_url: str, tmp_path: Path
) -> None:
    """Every third row's metadata spans two lines: the bad rows after them are named by the line
    they start on in the file, the same with one session or three (and from a pipe, which cannot
    be read twice, by records)."""
    users = [new_id() for _ in range(20)]
    rows = many_rows(users, 10)  # 200 rows
    bad = {4, 119, 190}
    expected, records, line = [], [], 2  # the header is line 1
    path = tmp_path / "quoted.csv"
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(["action_id", "user_id", "lbs", "logged_at", "verified", "metadata"])
        for i, (action_id, user, lbs, at, verified) in enumerate(rows):
            metadata = '{"note":\n"two lines"}' if i % 3 == 0 else "{}"
            writer.writerow([action_id, user, "-1" if i in bad else lbs, at, verified, metadata])
            if i in bad:
                expected.append(line)
                records.append(i + 2)
            line += 1 + metadata.count("\n")
    assert expected != records
    for jobs in (1, 3):
        error = load_error(db_url, path, jobs=jobs)
        assert [int(detail.split()[1]) for detail in error.details] == expected, jobs
    result = subprocess.run(
        cli_command(db_url, "backfill", "--format", "csv", "-"),
        input=path.read_bytes(),
        capture_output=True,
        env=cli_env(),
        check=False,
    )
    assert result.returncode == 2
    named = [int(line.split()[2]) for line in result.stderr.decode().splitlines()[:-1]]
    assert named == records
    assert counts(db_url) == (0, 0, 0)


@pytest.mark.usefixtures("split_small_files")
def test_a_csv_is_cut_only_between_records(db_url: str, tmp_path: Path) -> None:
    """Every row's metadata holds quotes and a line break: a cut inside a quoted field would break
    a row in two. Loaded in 2 to 8 parts, every row arrives whole."""
    users = [new_id() for _ in range(20)]
    rows = many_rows(users, 10)
    path = tmp_path / "quoted.csv"
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["action_id", "user_id", "lbs", "logged_at", "verified", "metadata"])
        for row in rows:
            note = {"note": f'said "{row[2]}"\nand then\n"more"'}
            writer.writerow([*row, json.dumps(note)])
    expected = sum((Decimal(r[2]) for r in rows if r[4] == "true"), Decimal(0))
    for jobs in range(2, 9):
        with path.open("rb") as handle:
            parts = backfill_module._parts(handle, "csv", jobs) or []
        assert len(parts) == jobs
    summary = load(db_url, path, jobs=8)
    assert summary["inserted_count"] == len(rows)
    with connect(db_url) as conn:
        assert_exact_totals(conn, expected)
        stored = dict(conn.execute("SELECT action_id::text, metadata FROM bulk_sync.user_actions"))
    assert stored == {r[0]: {"note": f'said "{r[2]}"\nand then\n"more"'} for r in rows}


def write_noted_action(path: Path, action_id: str, user: str, lbs: str, at: str, note: str) -> None:
    """One verified action whose metadata is {"note": note}, as an NDJSON line in UTF-8."""
    doc = {
        "action_id": action_id,
        "user_id": user,
        "lbs": lbs,
        "logged_at": at,
        "verified": True,
        "metadata": {"note": note},
    }
    path.write_text(json.dumps(doc, ensure_ascii=False) + "\n", encoding="utf-8")


def test_text_arrives_as_the_file_has_it_in_a_database_of_another_encoding(
    make_db: Any, tmp_path: Path
) -> None:
    """A LATIN1 database: the CSV and NDJSON bytes COPY sends are UTF-8, and their text is stored
    as written. A character LATIN1 cannot hold is refused, naming its line, and nothing changes."""
    from bulk_sync.migrate import migrate

    url = make_db(template="template0", encoding="LATIN1")
    migrate(url)
    user = new_id()
    csv_row = (new_id(), user, "1.250000", logged_at(0), "true")
    path = tmp_path / "latin1.csv"
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["action_id", "user_id", "lbs", "logged_at", "verified", "metadata"])
        writer.writerow([*csv_row, json.dumps({"note": "café"}, ensure_ascii=False)])
    ndjson_id = new_id()
    ndjson = tmp_path / "latin1.ndjson"
    write_noted_action(ndjson, ndjson_id, user, "2.5", logged_at(1), "crème brûlée")
    assert load(url, path)["inserted_count"] == 1
    assert load(url, ndjson)["inserted_count"] == 1
    with connect(url) as conn:
        assert_exact_totals(conn, Decimal("3.75"))
        stored = dict(
            conn.execute("SELECT action_id::text, metadata ->> 'note' FROM bulk_sync.user_actions")
        )
    assert stored == {csv_row[0]: "café", ndjson_id: "crème brûlée"}

    before = counts(url)
    euro = tmp_path / "euro.ndjson"
    write_noted_action(euro, new_id(), user, "1", logged_at(2), "5 €")
    error = load_error(url, euro)
    assert error.exit_code == 2, error.message
    assert "line 1" in error.message, error.message
    assert "LATIN1" in error.message, error.message
    assert counts(url) == before


def test_chunks_are_whole_users_with_one_event_each_and_a_rerun_changes_nothing(
    db_url: str, tmp_path: Path
) -> None:
    users = [new_id() for _ in range(120)]
    rows = many_rows(users, 25)
    expected = write_csv(tmp_path / "load.csv", rows)
    counted_users = {r[1] for r in rows if r[4] == "true"}

    summary = load(db_url, tmp_path / "load.csv", batch_size=500)
    assert summary["rows"] == len(rows) == summary["inserted_count"]
    assert summary["batches"] == 6  # 3,000 rows of 25 per user: 20 whole users per chunk
    assert summary["affected_users"] == len(counted_users)
    assert summary["global_total_lbs"] == amount(expected)
    with connect(db_url) as conn:
        assert_exact_totals(conn, expected)
        # One user_stats row version and one event per user: each user sits in exactly one chunk.
        events = conn.execute(
            "SELECT payload ->> 'user_id', count(*) FROM bulk_sync.events_since(0, 10000)"
            " GROUP BY 1"
        ).fetchall()
        assert {user for user, _ in events} == counted_users
        assert all(n == 1 for _, n in events)

    before = counts(db_url)
    rerun = load(db_url, tmp_path / "load.csv", batch_size=500)
    assert (rerun["inserted_count"], rerun["skipped_count"]) == (0, len(rows))
    assert (rerun["verified_count"], rerun["affected_users"]) == (0, 0)
    assert counts(db_url) == before  # no action, no user row, no event
    with connect(db_url) as conn:
        assert_exact_totals(conn, expected)

    # A rerun with the pending rows now verified verifies them, once each, and counts them.
    verified = [(r[0], r[1], r[2], r[3], "true") for r in rows]
    everything = write_csv(tmp_path / "verified.csv", verified)
    third = load(db_url, tmp_path / "verified.csv", batch_size=500)
    pending = sum(1 for r in rows if r[4] == "false")
    assert (third["inserted_count"], third["verified_count"]) == (0, pending)
    with connect(db_url) as conn:
        assert_exact_totals(conn, everything)


def test_live_writers_keep_working_during_a_load(db_url: str, tmp_path: Path) -> None:
    """Four real connections log actions for the file's own users while it loads."""
    users = [new_id() for _ in range(400)]
    rows = many_rows(users, 50)
    expected = write_csv(tmp_path / "big.csv", rows)
    logged: list[Decimal] = []
    errors: list[BaseException] = []
    stop = threading.Event()

    def writer(offset: int) -> None:
        try:
            with connect(db_url) as conn:
                i = 0
                while not stop.is_set():
                    lbs = Decimal(i % 7 + 1) / 4
                    user = users[(offset + i * 37) % len(users)]
                    response = log_action(
                        conn,
                        {
                            "action_id": new_id(),
                            "user_id": user,
                            "lbs": str(lbs),
                            "logged_at": logged_at(i),
                            "verified": True,
                        },
                    )
                    assert response["status"] == "inserted"
                    logged.append(lbs)
                    i += 1
        except BaseException as exc:
            errors.append(exc)

    proc = start_cli(db_url, "backfill", str(tmp_path / "big.csv"), "--batch-size", "1000")
    threads = [threading.Thread(target=writer, args=(k * 101,)) for k in range(4)]
    for thread in threads:
        thread.start()
    try:
        _out, err = proc.communicate(timeout=300)
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=60)
    assert proc.returncode == 0, err
    assert errors == []
    assert len(logged) > 0
    with connect(db_url) as conn:
        assert_exact_totals(conn, expected + sum(logged, Decimal(0)))


def test_an_interrupted_load_completes_when_run_again(db_url: str, tmp_path: Path) -> None:
    users = [new_id() for _ in range(2000)]
    rows = many_rows(users, 20)
    expected = write_csv(tmp_path / "load.csv", rows)
    # 400 chunks of 5 users, each its own commit: the kill lands between two of them.
    proc = start_cli(db_url, "backfill", str(tmp_path / "load.csv"), "--batch-size", "100")

    def some_committed() -> int | None:
        n = counts(db_url)[0]
        return n if 0 < n < len(rows) else None

    try:
        wait_for(some_committed, timeout=120, what="some chunks to commit")
    finally:
        stop_process(proc, sig=9)
    with connect(db_url) as conn:
        assert_exact_totals(conn)  # what committed is whole chunks, totals exact
    summary = load(db_url, tmp_path / "load.csv", batch_size=100)
    assert summary["inserted_count"] + summary["skipped_count"] == len(rows)
    assert summary["inserted_count"] < len(rows)
    with connect(db_url) as conn:
        assert_exact_totals(conn, expected)


def _default_sigint() -> None:
    """In the child: Ctrl-C's default, whatever this run inherited (a background job ignores it)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_ctrl_c_stops_a_load_between_chunks_and_a_rerun_completes_it(
    db_url: str, tmp_path: Path
) -> None:
    """SIGINT while chunks apply: no further chunk starts (those in flight may commit), the run
    exits 130 saying how far it got, what committed is whole chunks with exact totals, and the
    same command again finishes the load."""
    users = [new_id() for _ in range(2000)]
    rows = many_rows(users, 20)
    expected = write_csv(tmp_path / "load.csv", rows)
    args = ("backfill", str(tmp_path / "load.csv"), "--batch-size", "100")
    # 400 chunks of 5 users, each its own commit: the interrupt lands while they apply.
    proc = start_cli(db_url, *args, preexec_fn=_default_sigint)

    def some_committed() -> int | None:
        n = counts(db_url)[0]
        return n if 0 < n < len(rows) else None

    try:
        wait_for(some_committed, timeout=120, what="some chunks to commit")
        proc.send_signal(signal.SIGINT)
        _out, err = proc.communicate(timeout=300)  # the run must end by itself
    finally:
        stop_process(proc, sig=signal.SIGKILL)
    assert proc.returncode == 130, err
    stored = counts(db_url)[0]
    assert 0 < stored < len(rows)  # it stopped: it did not go on to apply the whole file
    assert stored % 20 == 0  # whole users: 20 rows each
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("bulk-sync: error: interrupted ("), lines[0]
    assert "chunks committed; run the same command again" in lines[0], lines[0]
    with connect(db_url) as conn:
        assert_exact_totals(conn)

    summary = load(db_url, tmp_path / "load.csv", batch_size=100)
    assert (summary["inserted_count"], summary["skipped_count"]) == (len(rows) - stored, stored)
    assert counts(db_url)[0] == len(rows)
    with connect(db_url) as conn:
        assert_exact_totals(conn, expected)


def test_ctrl_c_while_staging_stops_the_copy_and_applies_nothing(db_url: str) -> None:
    """SIGINT while the input is still being staged: the COPY stops at its next block instead of
    reading the input to its end, the run exits 130, and nothing is applied. The input here is a
    pipe that is written to until the run ends, so a run that read on would never exit."""
    proc = start_cli(
        db_url,
        "backfill",
        "-",
        "--format",
        "csv",
        stdin=subprocess.PIPE,
        preexec_fn=_default_sigint,
    )
    assert proc.stdin is not None
    feeding = threading.Event()
    feeding.set()

    def feed(pipe: IO[str]) -> None:
        try:
            pipe.write("action_id,user_id,lbs,logged_at,verified\n")
            while feeding.is_set():
                pipe.write(
                    "".join(f"{new_id()},{new_id()},1.5,{logged_at(0)},true\n" for _ in range(1000))
                )
                pipe.flush()
        except (BrokenPipeError, ValueError):  # the run has ended
            pass

    writer = threading.Thread(target=feed, args=(proc.stdin,), daemon=True)
    writer.start()

    def copying() -> bool:
        with connect(db_url) as conn:
            return conn.execute(
                "SELECT count(*) > 0 FROM pg_stat_activity"
                " WHERE datname = current_database() AND state = 'active' AND query LIKE 'COPY%%'"
            ).fetchone()[0]

    try:
        wait_for(copying, timeout=60, what="the file's COPY to start")
        proc.send_signal(signal.SIGINT)
        returncode = proc.wait(timeout=120)  # the input never ends: only a stopped COPY exits
        err = proc.stderr.read() if proc.stderr else ""
    finally:
        feeding.clear()
        stop_process(proc, sig=signal.SIGKILL)
    assert returncode == 130, err
    assert err.strip().splitlines()[-1] == (
        "bulk-sync: error: interrupted while staging the file; nothing was applied"
    ), err
    assert counts(db_url) == (0, 0, 0)


HALF_THE_BOUND = "600000000000000000000000"  # two of these take a total past NUMERIC(30,6)
# The users of the bound's tests, first and last in user_id order, so in the first and last chunk.
FIRST, LAST = "00000000-0000-4000-8000-000000000001", "ffffffff-0000-4000-8000-000000000002"


def test_a_file_that_would_take_a_total_past_the_bound_is_refused_whole(
    db_url: str, tmp_path: Path
) -> None:
    """Each row is in range, but one user's rows, or all users' rows, sum past NUMERIC(30,6):
    chunks commit one by one, so the check refuses the file (22003, exit 2) before any applies.
    The global total bounds every user's, so it is the one named."""
    one_user = tmp_path / "one_user.csv"
    write_csv(
        one_user,
        [
            (new_id(), FIRST, "1.5", logged_at(0), "true"),
            (new_id(), LAST, HALF_THE_BOUND, logged_at(1), "true"),
            (new_id(), LAST, HALF_THE_BOUND, logged_at(2), "true"),
        ],
    )
    all_users = tmp_path / "all_users.csv"
    write_csv(
        all_users, [(new_id(), new_id(), HALF_THE_BOUND, logged_at(i), "true") for i in range(2)]
    )
    for path in (one_user, all_users):
        done = subprocess.run(
            cli_command(db_url, "backfill", str(path), "--batch-size", "1", "--jobs", "1"),
            env=cli_env(),
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert done.returncode == 2, done.stderr
        assert "the load would take the global total past NUMERIC(30,6); nothing was applied" in (
            done.stderr
        ), done.stderr
        assert counts(db_url) == (0, 0, 0)


def test_a_chunk_past_the_bound_stops_the_load_without_promising_a_rerun(
    db_url: str, tmp_path: Path
) -> None:
    """A writer adds to a user's total after the check and before that user's chunk applies, which
    then fails with 22003 after the first chunk committed. The message says what committed and
    that the same command would fail the same way, which a rerun shows."""
    path = tmp_path / "bound.csv"
    write_csv(
        path,
        [
            (new_id(), FIRST, "1.5", logged_at(0), "true"),
            (new_id(), LAST, HALF_THE_BOUND, logged_at(1), "true"),
        ],
    )
    outcome: dict[str, CliError] = {}

    def run() -> None:
        outcome["error"] = load_error(db_url, path, batch_size=1, jobs=1)

    with connect(db_url, autocommit=False) as writer:
        # Holds the user's row until it commits: the second chunk waits for it.
        log_action(
            writer,
            {
                "action_id": new_id(),
                "user_id": LAST,
                "lbs": HALF_THE_BOUND,
                "logged_at": logged_at(3),
                "verified": True,
            },
        )
        loader = threading.Thread(target=run)
        loader.start()
        wait_for(lambda: counts(db_url)[0] == 1, timeout=60, what="the first chunk to commit")
        writer.commit()
    loader.join(timeout=120)
    assert not loader.is_alive()
    error = outcome["error"]
    assert error.exit_code == 2, error.message
    assert error.message.startswith("chunk 2 of 2: "), error.message
    assert "(1 of 2 chunks committed; the committed chunks stand, and a rerun would fail" in (
        error.message
    ), error.message
    assert "run the same command again" not in error.message, error.message
    with pytest.raises(psycopg.errors.NumericValueOutOfRange, match="nothing was applied"):
        load(db_url, path, batch_size=1, jobs=1)  # the rerun: refused whole by the check
    with connect(db_url) as conn:
        assert_exact_totals(conn, Decimal("1.5") + Decimal(HALF_THE_BOUND))


@pytest.mark.parametrize(
    "ddl",
    [
        "CREATE TEMP TABLE bulk_sync_stage (line bigint)",
        "CREATE TEMP VIEW bulk_sync_stage AS SELECT 1 AS line",
    ],
)
def test_the_stage_cannot_be_replaced_by_a_callers_own(db_url: str, ddl: str) -> None:
    """A writer's own pg_temp table or view of the stage's name is refused, never read as owner;
    the loads' shared rows and tokens are not the writer's to read; a load must be open."""
    with connect(db_url) as conn:
        conn.execute("CREATE ROLE stage_writer LOGIN IN ROLE bulk_sync_writer")
    try:
        with (
            connect(db_url, autocommit=True) as owner,
            psycopg.connect(db_url.replace("postgres@", "stage_writer@"), autocommit=True) as conn,
        ):
            load = owner.execute("SELECT bulk_sync._stage_open()").fetchone()[0]
            conn.execute(ddl)
            for call, params in (
                ("SELECT bulk_sync._stage_open()", ()),
                ("SELECT bulk_sync._stage_open(%s)", (load,)),
                ("SELECT bulk_sync._stage_check(%s, 1, 10)", (load,)),
            ):
                with pytest.raises(psycopg.Error) as caught:
                    conn.execute(call, params)
                assert sqlstate(caught.value) == "55000", (call, caught.value)
            assert counts(db_url) == (0, 0, 0)
            for table in ("_load_rows", "_loads"):
                with pytest.raises(psycopg.errors.InsufficientPrivilege):
                    conn.execute(f"SELECT FROM bulk_sync.{table}")
            conn.execute(f"DROP {ddl.split()[2]} pg_temp.bulk_sync_stage")  # TABLE or VIEW
            for call in (
                "SELECT bulk_sync._stage_open(gen_random_uuid())",
                "SELECT bulk_sync._stage_load(gen_random_uuid(), 10, 10)",
                "SELECT bulk_sync._stage_apply(gen_random_uuid(), NULL, NULL)",
            ):
                with pytest.raises(psycopg.Error) as caught:
                    conn.execute(call)
                assert sqlstate(caught.value) == "55000", (call, caught.value)
                assert "is not open" in str(caught.value)
            owner.execute("SELECT bulk_sync._stage_close(%s)", (load,))
            with pytest.raises(psycopg.Error) as caught:
                conn.execute("SELECT bulk_sync._stage_open(%s)", (load,))
            assert "is not open" in str(caught.value)
    finally:
        with connect(db_url) as conn:
            # The writer's temporary objects go when its backend has exited, which takes a moment.
            def dropped() -> bool:
                try:
                    conn.execute("DROP ROLE stage_writer")
                except psycopg.errors.DependentObjectsStillExist:
                    return False
                return True

            wait_for(dropped, timeout=30, what="the writer's session to end")


@pytest.mark.parametrize(
    "call",
    [
        "SELECT bulk_sync._stage_check(%s, 0)",
        "SELECT bulk_sync._stage_check(%s, 1, 0)",
        "SELECT bulk_sync._stage_load(%s, 0)",
        "SELECT bulk_sync._stage_load(%s, 10, 0)",
        "SELECT bulk_sync._stage_load(%s, 10, 10, '{}')",
    ],
)
def test_the_stage_functions_reject_bad_arguments(db_url: str, call: str) -> None:
    """The runner never sends these, but a DBA calling the stage functions by hand gets BS001 for a
    line number, chunk size or problem limit below 1, or problems that are not an array."""
    with connect(db_url, autocommit=True) as conn:
        load = conn.execute("SELECT bulk_sync._stage_open()").fetchone()[0]
        conn.execute(
            "INSERT INTO pg_temp.bulk_sync_stage (action_id, user_id, lbs, logged_at, verified)"
            " VALUES (%s, %s, '2', %s, 'true')",
            (new_id(), new_id(), logged_at(0)),
        )
        with pytest.raises(psycopg.Error) as caught:
            conn.execute(call, (load,))
        assert sqlstate(caught.value) == "BS001", caught.value
        conn.execute("SELECT bulk_sync._stage_close(%s)", (load,))
    assert counts(db_url) == (0, 0, 0)


def test_a_load_whose_runner_died_is_ended_by_the_next(db_url: str) -> None:
    """The runner's session is killed between the check and the apply: the next load to open ends
    the dead one, and its checked rows go with it."""
    load = abandoned_load(db_url)
    assert load_rows(db_url, load) == 1
    with connect(db_url, autocommit=True) as conn:
        fresh = conn.execute("SELECT bulk_sync._stage_open()").fetchone()[0]
        assert load_rows(db_url, load) == 0
        assert conn.execute("SELECT array_agg(load) FROM bulk_sync._loads").fetchone()[0] == [fresh]
        conn.execute("SELECT bulk_sync._stage_close(%s)", (fresh,))
    assert counts(db_url) == (0, 0, 0)


def test_an_action_stored_by_another_writer_after_the_check(db_url: str) -> None:
    """Between _stage_load and _stage_apply another writer stores one of the actions: with the same
    facts it is skipped and counted once; with other facts the chunk fails with BS002."""
    same, other, fresh = new_id(), new_id(), new_id()
    user = "00000000-0000-4000-8000-000000000001"

    def staged(conn: psycopg.Connection, ids: list[str]) -> str:
        load = conn.execute("SELECT bulk_sync._stage_open()").fetchone()[0]
        for i, action_id in enumerate(ids, start=1):
            conn.execute(
                "INSERT INTO pg_temp.bulk_sync_stage"
                " (line, action_id, user_id, lbs, logged_at, verified)"
                " VALUES (%s, %s, %s, '2', %s, 'true')",
                (i, action_id, user, logged_at(0)),
            )
        checked = conn.execute("SELECT bulk_sync._stage_check(%s)", (load,)).fetchone()[0]
        assert checked["problems"] == []
        checked = conn.execute("SELECT bulk_sync._stage_load(%s, NULL, 10)", (load,)).fetchone()[0]
        assert checked["problems"] == []
        return load

    with connect(db_url) as loader, connect(db_url) as writer:
        loader.execute("BEGIN")
        load = staged(loader, [same, fresh])
        loader.execute("COMMIT")
        request = {"user_id": user, "lbs": "2", "logged_at": logged_at(0), "verified": True}
        assert log_action(writer, {"action_id": same, **request})["status"] == "inserted"
        apply = "SELECT bulk_sync._stage_apply(%s, NULL, NULL)"
        result = loader.execute(apply, (load,)).fetchone()[0]
        assert (result["inserted_count"], result["skipped_count"]) == (1, 1)
        assert_exact_totals(loader, Decimal(4))

        loader.execute("BEGIN")
        load = staged(loader, [other])
        loader.execute("COMMIT")
        log_action(writer, {"action_id": other, **request, "lbs": "3"})
        with pytest.raises(psycopg.Error) as caught:
            loader.execute(apply, (load,))
        assert sqlstate(caught.value) == "BS002"
        assert "line 1" in str(caught.value)
        assert_exact_totals(loader, Decimal(7))


def test_a_line_holding_only_the_copy_end_marker_is_refused_by_its_line(
    db_url: str, tmp_path: Path
) -> None:
    """`\\.` alone on a line would end COPY early and silently; deep in a file (past the first
    block sent) it is still refused, with its own line number, and nothing is applied."""
    rows = many_rows([new_id() for _ in range(100)], 30)  # 3,000 rows, about 250 KB
    write_csv(tmp_path / "marker.csv", rows)
    lines = (tmp_path / "marker.csv").read_text().splitlines(keepends=True)
    lines.insert(2500, "\n")  # a blank line before it shifts nothing but the count
    lines.insert(2600, "\\.\n")
    (tmp_path / "marker.csv").write_text("".join(lines))
    error = load_error(db_url, tmp_path / "marker.csv")
    assert error.exit_code == 2
    assert error.message == "line 2601: a line holding only \\. is not allowed"
    assert counts(db_url) == (0, 0, 0)


def test_a_writer_role_loads_a_file_and_an_empty_file_loads_nothing(
    db_url: str, tmp_path: Path
) -> None:
    """The runner needs nothing beyond bulk_sync_writer (it reads no total itself), and a file with
    a header only, or an empty NDJSON, is a load of zero rows."""
    rows = many_rows([new_id() for _ in range(3)], 4)
    expected = write_csv(tmp_path / "small.csv", rows)
    (tmp_path / "header.csv").write_text("action_id,user_id,lbs,logged_at,verified\n")
    (tmp_path / "empty.ndjson").write_text("\n\n")
    with connect(db_url) as conn:
        conn.execute("CREATE ROLE file_writer LOGIN IN ROLE bulk_sync_writer")
    writer_url = db_url.replace("postgres@", "file_writer@")
    try:
        summary = load(writer_url, tmp_path / "small.csv")
        assert (summary["inserted_count"], summary["global_total_lbs"]) == (
            len(rows),
            amount(expected),
        )
        for name in ("header.csv", "empty.ndjson"):
            empty = load(writer_url, tmp_path / name)
            assert (empty["rows"], empty["batches"], empty["inserted_count"]) == (0, 0, 0), name
            assert empty["global_total_lbs"] == amount(expected), name
    finally:
        with connect(db_url) as conn:

            def dropped() -> bool:
                try:
                    conn.execute("DROP ROLE file_writer")
                except psycopg.errors.DependentObjectsStillExist:
                    return False
                return True

            wait_for(dropped, timeout=30, what="the writer's sessions to end")


def test_a_json_parse_error_names_its_element_on_one_line(db_url: str, tmp_path: Path) -> None:
    """Elements are numbered from 1, as in the bad-row lines: a parse error inside element 2 is
    `element 2`, and the reason is one clean line whatever the bytes around it (no bytes repr of
    the parser's excerpt), and nothing is applied."""
    good = json.dumps(
        {
            "action_id": new_id(),
            "user_id": new_id(),
            "lbs": "1",
            "logged_at": logged_at(0),
            "verified": True,
        }
    )
    cases = {
        # Cut off inside element 2.
        f'[{good}, {{"action_id": "y", "lbs": 1': "element 2",
        # A bad escape in element 2 of the seed's object, after a run of two-byte characters: the
        # parser's excerpt of the text then starts inside one of them, and comes back as bytes.
        f'{{"actions": [{good}, {{"action_id": "{"é" * 15}\\q"}}]}}': "element 2",
        f"[{good}, 42, nul]": "element 3",
        f"[{good}] trailing": "after the array",
    }
    for number, (text, where) in enumerate(cases.items()):
        path = tmp_path / f"broken-{number}.json"
        path.write_text(text, encoding="utf-8")
        error = load_error(db_url, path)
        assert error.exit_code == 2
        assert error.message.startswith(f"{where}: invalid JSON: "), (text, error.message)
        reason = error.message.removeprefix(f"{where}: invalid JSON: ")
        # The parser's reason alone: not its excerpt of the text, not a bytes repr.
        assert reason[:1].isalpha(), error.message
        for fragment in ("\n", "\\n", "\\x", "right here", "b'"):
            assert fragment not in reason, error.message
    assert counts(db_url) == (0, 0, 0)


def test_a_lone_surrogate_escape_in_a_json_array_is_refused_not_altered(
    db_url: str, tmp_path: Path
) -> None:
    """The JSON parser would read "\\ud800" as "?": the file is refused, as PostgreSQL refuses the
    same action as NDJSON, and nothing is applied. A whole pair (an emoji) is stored as it is."""

    def doc(metadata: str) -> str:
        return (
            f'{{"action_id": "{new_id()}", "user_id": "{new_id()}", "lbs": "1",'
            f' "logged_at": "{logged_at(0)}", "verified": true, "metadata": {{"a": "{metadata}"}}}}'
        )

    for lone in ("\\ud800", "\\udc00", "\\\\\\ud83d"):
        path = tmp_path / "lone.json"
        path.write_text(f"[{doc('x')}, {doc(lone)}]", encoding="ascii")
        error = load_error(db_url, path)
        assert error.exit_code == 2
        assert "surrogate" in error.message, error.message
        assert counts(db_url) == (0, 0, 0)
    path = tmp_path / "pair.json"
    pair = doc("\\ud83d\\ude00 \\\\ud800")  # an emoji, then a backslash and "ud800"
    path.write_text(f"[{pair}]", encoding="ascii")
    assert load(db_url, path)["inserted_count"] == 1
    with connect(db_url) as conn:
        stored = conn.execute("SELECT metadata ->> 'a' FROM bulk_sync.user_actions").fetchone()
    assert stored == ("\U0001f600 \\ud800",)


def blocks_of(data: bytes) -> tuple[list[bytes], backfill_module.Staged]:
    staged = backfill_module.Staged(copy=backfill_module.COPY_NDJSON, first_line=1)
    stream = io.BufferedReader(io.BytesIO(data), buffer_size=backfill_module.BLOCK)
    return list(backfill_module._blocks(stream, staged)), staged


def test_lines_longer_than_many_blocks_are_sent_whole_and_numbered() -> None:
    """The file is sent in blocks of whole lines: a line several blocks long (a big metadata
    object, say) is sent once and whole, the last one with or without its ending as in the file,
    blank lines are dropped but still counted, and a line holding only `\\.` after long lines is
    refused by its own line number."""
    block = backfill_module.BLOCK
    lines = [
        b"short 1",
        b"a" * (5 * block + 17),  # longer than five blocks
        b"",
        b"short 4",
        b"b" * (3 * block),  # exactly three blocks, then its newline
        b" \t",
        b"",
        b"c" * (block - 1),  # its newline is the last byte of a block
        b"d" * (2 * block + 1),
        b"short 10",
        b"e" * (4 * block + 3),  # the last line, with no newline
    ]
    data = b"\n".join(lines)
    sent, staged = blocks_of(data)
    assert all(piece and piece.endswith(b"\n") for piece in sent[:-1])
    kept = [(number, line) for number, line in enumerate(lines, start=1) if line.strip(b" \t")]
    assert b"".join(sent) == b"\n".join(line for _, line in kept)
    # Each staged row maps back to its own line of the file, blank lines skipped.
    assert [staged.line_of(row) for row in range(1, len(kept) + 1)] == [n for n, _ in kept]

    # One long line and nothing else, with and without its newline.
    assert blocks_of(b"f" * (7 * block + 5))[0] == [b"f" * (7 * block + 5)]
    assert b"".join(blocks_of(b"g" * (7 * block) + b"\n")[0]) == b"g" * (7 * block) + b"\n"
    assert blocks_of(b"")[0] == []

    marker = b"\n".join([b"h" * (3 * block + 9), b"", b"i" * (2 * block), b"\\.", b"after"])
    with pytest.raises(CliError) as caught:
        blocks_of(marker)
    assert caught.value.message == "line 4: a line holding only \\. is not allowed"


def test_integers_past_pythons_digit_limit_are_judged_and_stored_exactly(
    db_url: str, tmp_path: Path
) -> None:
    """Python converts an integer of more than 4,300 digits to or from text only with its limit
    lifted (the JSON parser crashed the runner on one): an amount that large is a BS001 for its
    element, and one in metadata, as from `log --metadata`, is valid JSON stored as it is."""
    huge, nines = "1" + "0" * 5000, "9" * 4301

    def doc(action_id: str, lbs: str, metadata: str) -> str:
        return (
            f'{{"action_id": "{action_id}", "user_id": "{new_id()}", "lbs": {lbs},'
            f' "logged_at": "{logged_at(0)}", "verified": true, "metadata": {metadata}}}'
        )

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            cli_command(db_url, *args), capture_output=True, text=True, env=cli_env(), check=False
        )

    bad = tmp_path / "amount.json"
    bad.write_text(f"[{doc(new_id(), '1', '{}')}, {doc(new_id(), huge, '{}')}]")
    result = run("backfill", str(bad))
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("bulk-sync: element 2 (action_id "), result.stderr
    assert "): BS001: lbs must be below 10^24" in result.stderr
    assert counts(db_url) == (0, 0, 0)

    stored = new_id()
    good = tmp_path / "metadata.json"
    metadata = f'{{"n": {nines}, "d": -1.50e-3, "z": 0.10}}'
    good.write_text(f"[{doc(stored, '1', metadata)}]")
    result = run("backfill", str(good))
    assert result.returncode == 0, result.stderr
    logged = new_id()
    result = run(
        "log",
        *("--action-id", logged, "--user-id", new_id(), "--lbs", "1"),
        *("--logged-at", logged_at(1), "--metadata", f'{{"n": -{nines}}}'),
    )
    assert result.returncode == 0, result.stderr
    with connect(db_url) as conn:
        found = dict(
            conn.execute(
                "SELECT action_id::text, array[metadata ->> 'n', metadata ->> 'd',"
                " metadata ->> 'z'] FROM bulk_sync.user_actions"
            ).fetchall()
        )
    assert found == {stored: [nines, "-0.00150", "0.10"], logged: [f"-{nines}", None, None]}


def test_backfill_from_python_judges_a_long_integer_and_puts_the_limit_back(
    db_url: str, tmp_path: Path
) -> None:
    """backfill() called as a library, under Python's default limit of 4,300 digits, answers an
    amount of 5,001 digits with its element's BS001, as the CLI does, instead of crashing the
    process in the JSON parser; the limit is Python's again once the load has ended."""
    bad = tmp_path / "amount.json"
    lbs = "1" + "0" * 5000
    bad.write_text(
        f'[{{"action_id": "{new_id()}", "user_id": "{new_id()}", "lbs": {lbs},'
        f' "logged_at": "{logged_at(0)}", "verified": true}}]'
    )
    script = textwrap.dedent(
        """
        import sys
        from bulk_sync.backfill import backfill
        from bulk_sync.errors import CliError
        print(sys.get_int_max_str_digits())
        try:
            with open(sys.argv[2], "rb") as stream:
                backfill(sys.argv[1], stream, name=sys.argv[2])
        except CliError as exc:
            print(*exc.details, sep="\\n")
        print(sys.get_int_max_str_digits())
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script, db_url, str(bad)],
        capture_output=True,
        text=True,
        env=cli_env(),
        check=False,
    )
    assert result.returncode == 0, (result.returncode, result.stderr)
    before, problem, after = result.stdout.splitlines()
    assert before == after == "4300"
    assert problem.startswith("element 1 (action_id "), problem
    assert "): BS001: lbs must be below 10^24" in problem
    assert counts(db_url) == (0, 0, 0)


def test_the_digit_limit_comes_back_when_the_last_of_two_loads_ends() -> None:
    """Two loads in one process overlap: the first to end must not put the limit back under the
    other, which may still be reading a long integer."""
    loads = backfill_module._INTEGERS_OF_ANY_LENGTH
    original = sys.get_int_max_str_digits()
    sys.set_int_max_str_digits(5000)
    try:
        loads.__enter__()  # one load begins
        loads.__enter__()  # a second one begins
        loads.__exit__(None, None, None)  # the first ends
        assert sys.get_int_max_str_digits() == 0
        loads.__exit__(None, None, None)  # the second ends
        assert sys.get_int_max_str_digits() == 5000
    finally:
        sys.set_int_max_str_digits(original)


def test_a_surrogate_pair_is_judged_whole_wherever_the_reads_cut_it() -> None:
    """Python writes an emoji as the pair of escapes \\ud83d\\ude00: a read that ends between or
    inside its halves leaves the check nothing wrong to see, whatever the size of the reads, while
    a lone half is refused wherever it falls, the last bytes of the file included. A run of
    backslashes longer than the bytes kept from a read still escapes (or not) what follows it."""

    def check(data: bytes, size: int) -> None:
        reader = backfill_module._SurrogateCheck(io.BufferedReader(io.BytesIO(data)))
        while reader.read(size):
            pass

    escaped = b"\\\\" * 40  # 40 backslashes as text
    valid = [b'"\\ud83d\\ude00 x \\ud83d\\ude00\\ud83d\\ude00"', escaped + b"ud800 " + escaped]
    lone = [b'"\\ud83d x"', b'"x \\ud83d"', b"\\ude00", b'"\\ude00\\ud83d"', escaped + b"\\ud800"]
    for size in range(1, 100):
        for data in valid:
            check(data, size)
        for data in lone:
            with pytest.raises(CliError, match="surrogate pair, with no other half"):
                check(data, size)


def test_a_json_file_whose_reads_cut_surrogate_pairs_loads_as_it_is(
    db_url: str, tmp_path: Path
) -> None:
    """A note of 20,000 emoji written by json.dumps spans several 64 KiB reads: some of them end
    between the two escapes of a pair. The file loads, and the note is stored as it was written."""
    note = "\U0001f600" * 20_000
    action_id = new_id()
    element = action(action_id, new_id(), "1", logged_at(0))
    path = tmp_path / "emoji.json"
    path.write_text(json.dumps([{**element, "metadata": {"note": note}}]), encoding="ascii")
    assert load(db_url, path)["inserted_count"] == 1
    with connect(db_url) as conn:
        stored = conn.execute("SELECT metadata ->> 'note' FROM bulk_sync.user_actions").fetchone()
    assert stored == (note,)


@pytest.mark.parametrize("fmt", ["csv", "ndjson"])
def test_a_crlf_file_loads_with_or_without_a_line_ending_after_its_last_line(
    db_url: str, tmp_path: Path, fmt: str
) -> None:
    """COPY takes the line ending of a file's first line for all of them: the last line, when
    nothing ends it, is ended as the others are (CRLF), so the file loads as with its ending."""
    user = new_id()
    rows = [(new_id(), user, f"1.{i}", logged_at(i), "true") for i in range(3)]
    if fmt == "csv":
        lines = ["action_id,user_id,lbs,logged_at,verified"] + [",".join(row) for row in rows]
    else:
        lines = [json.dumps(action(row[0], row[1], row[2], row[3], verified=True)) for row in rows]
    for number, ending in enumerate(("", "\r\n")):
        path = tmp_path / f"crlf-{number}.{fmt}"
        path.write_bytes(("\r\n".join(lines) + ending).encode())
        summary = load(db_url, path)
        assert summary["rows"] == 3, ending
        assert summary["inserted_count"] == (3 if number == 0 else 0), ending
    with connect(db_url) as conn:
        assert_exact_totals(conn, Decimal("3.3"))


@pytest.mark.parametrize("control", [b"\x01", b"\x02"])
def test_a_raw_control_character_in_an_ndjson_line_is_refused_by_its_line(
    db_url: str, tmp_path: Path, control: bytes
) -> None:
    """NDJSON lines reach COPY as CSV fields quoted by \\x01 and cut by \\x02, characters that JSON
    text holds only escaped: raw, in a string, they would silently change it ("a\\x01b" stored as
    "ab"), so the line is refused, named by its line (past the first block sent), and nothing is
    applied."""
    lines = [
        json.dumps(action(new_id(), new_id(), "1", logged_at(i))).encode() for i in range(3_000)
    ]
    lines.insert(2_500, b"")  # a blank line shifts nothing but the count
    note = b"a" + control + b"b" + control + b"c"
    lines[2_700] = lines[2_700].replace(b'"lbs"', b'"metadata": {"note": "' + note + b'"}, "lbs"')
    path = tmp_path / "control.ndjson"
    path.write_bytes(b"\n".join(lines) + b"\n")
    error = load_error(db_url, path)
    assert error.exit_code == 2
    assert error.message.startswith("line 2701: invalid JSON ("), error.message
    assert f"0x{control[0]:02x}" in error.message
    assert counts(db_url) == (0, 0, 0)


def test_a_row_copy_refuses_is_named_by_its_line_after_a_field_quoted_across_lines(
    db_url: str, tmp_path: Path
) -> None:
    """COPY counts records: a row it refuses after a field quoted across lines is named by the file
    line it starts on, as a bad row is."""
    user = new_id()
    rows = [
        [new_id(), user, "1", logged_at(0), "true", '{\n"a":\n1\n}'],  # lines 2-5
        [new_id(), user, "1", logged_at(1), "true", "{}"],
        [new_id(), user, "1", logged_at(2), "true", "{}", "extra"],  # line 7
    ]
    path = tmp_path / "extra.csv"
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(["action_id", "user_id", "lbs", "logged_at", "verified", "metadata"])
        writer.writerows(rows)
    error = load_error(db_url, path)
    assert error.exit_code == 2
    assert error.message.startswith("line 7: extra data after last expected column"), error.message
    assert counts(db_url) == (0, 0, 0)
