"""``bulk-sync backfill FILE``: load a file of actions through bulk_sync's one bulk core.

1. **Stage.** The file streams into the session's stage table (``bulk_sync._stage_open``) with ONE
   ``COPY``: CSV and NDJSON bytes go to the server as they are, with no per-row Python work; a JSON
   array is read element by element (ijson) and each element sent as one row. Memory stays flat; the
   stage lives on the server and may use disk.
2. **Check.** ``bulk_sync._stage_load`` checks every row at once: the BS001 rules, and BS002 within
   the file and against stored actions. A file with any bad row changes nothing: every bad row (up
   to 100) is reported with its line number, field and reason, and the exit code is 2.
3. **Apply.** The checked rows are applied in chunks of whole users, in ``user_id`` order
   (``bulk_sync._stage_apply``), each chunk committed on its own, so each user's totals and event
   are written once per chunk and live writers wait for a chunk at most.

Validation, idempotency and every total are the SQL's. A failed or interrupted run is simply run
again: stored actions are skipped, so a rerun inserts nothing that is already there.
"""

from __future__ import annotations

import csv
import io
import os
import re
import stat
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import IO, Any

import click
import ijson
import psycopg
from psycopg import sql

from bulk_sync.db import connect, to_cli_error
from bulk_sync.errors import EXIT_BAD_INPUT, CliError
from bulk_sync.jsonutil import dumps

FORMATS = ("csv", "ndjson", "json")
DEFAULT_BATCH_SIZE = 10_000
MAX_BATCH_SIZE = 50_000
MAX_PROBLEMS = 100
BLOCK = 1 << 16  # psycopg queues up to 1,024 blocks for COPY: at most 64 MiB in flight

CSV_REQUIRED = ("action_id", "user_id", "lbs", "logged_at", "verified")
CSV_OPTIONAL = ("metadata",)

STAGE = sql.Identifier("pg_temp", "bulk_sync_stage")
# NDJSON lines go into the jsonb column as they are: CSV mode with a quote and a delimiter that
# valid JSON text cannot contain unescaped (control characters), so every line is one field.
COPY_NDJSON = sql.SQL(
    "COPY {} (doc) FROM STDIN (FORMAT csv, QUOTE E'\\x01', DELIMITER E'\\x02')"
).format(STAGE)
COPY_JSON = sql.SQL("COPY {} (line, doc) FROM STDIN").format(STAGE)
OPEN_STAGE = "SELECT bulk_sync._stage_open()"
LOAD_STAGE = "SELECT bulk_sync._stage_load(%s, %s)"
APPLY_CHUNK = "SELECT bulk_sync._stage_apply(%s::uuid, %s::uuid, 'line %%s', 'bulk_backfill', %s)"


class InputError(CliError):
    """A row or file that cannot be read, or rows the checks rejected (exit code 2)."""

    def __init__(self, message: str, details: list[str] | None = None) -> None:
        super().__init__(message, EXIT_BAD_INPUT, details)


# --------------------------------------------------------------------------- input


class _CountingRaw(io.RawIOBase):
    """A raw stream that counts the bytes read through it (for the progress bar)."""

    def __init__(self, inner: IO[bytes]) -> None:
        self._inner = inner
        self.consumed = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        data = self._inner.read(len(buffer))
        if not data:
            return 0
        size = len(data)
        buffer[:size] = data
        self.consumed += size
        return size


def format_for(name: str, explicit: str | None, peek: bytes) -> str:
    """``--format``, else the file extension, else (stdin) a look at the first byte."""
    if explicit:
        return explicit
    lower = name.lower()
    if lower.endswith(".csv"):
        return "csv"
    if lower.endswith((".ndjson", ".jsonl")):
        return "ndjson"
    if lower.endswith(".json"):
        return "json"
    first = peek.lstrip(b"\xef\xbb\xbf \t\r\n")[:1]
    if first == b"[":
        return "json"
    if first and first not in b"{":
        return "csv"
    raise InputError(f"cannot tell the format of {name}; pass --format csv, ndjson or json")


def _strip_bom(stream: io.BufferedReader) -> None:
    if stream.peek(3)[:3] == b"\xef\xbb\xbf":
        stream.read(3)


@dataclass
class Staged:
    """How a file was staged: the COPY statement, and how its rows map back to the file's lines."""

    copy: sql.Composed
    blocks: Iterator[bytes] | None = None  # raw bytes for COPY (CSV, NDJSON)
    rows: Iterator[tuple[int, str]] | None = None  # (ordinal, JSON text) rows for COPY (JSON)
    first_line: int = 1  # the file line of the first staged row
    label: str = "line"
    # Blank lines are not sent: (rows staged before a run of them, blank lines so far), in order.
    blanks: list[tuple[int, int]] = field(default_factory=list)

    def line_of(self, row: int) -> int:
        """The file line (or element) of the ``row``-th staged row (1-based)."""
        skipped = 0
        for before, total in self.blanks:
            if before >= row:
                break
            skipped = total
        return self.first_line + row - 1 + skipped


_BLANK_LINES = re.compile(rb"(?:^|(?<=\n))[ \t\r]*\n")
_COPY_LINE = re.compile(r"^COPY [^,]+, line (\d+)", re.MULTILINE)
_ANY_BLANK_LINE = re.compile(rb"\n[ \t\r]*\n")  # a quick test: most blocks have none


def _blocks(stream: io.BufferedReader, staged: Staged) -> Iterator[bytes]:
    """The rest of the stream in blocks of whole lines, without blank lines (noted in ``staged``).

    A line holding only ``\\.`` would end a COPY early and silently, so it is refused.
    """
    rest = b""
    rows = 0  # lines sent so far
    blanks = 0
    while True:
        block = stream.read(BLOCK)
        data = rest + block
        if block:
            cut = data.rfind(b"\n") + 1  # whole lines only; the rest waits for the next block
            data, rest = data[:cut], data[cut:]
        elif not data:
            return
        else:
            data, rest = data + b"\n", b""
        if not _ANY_BLANK_LINE.search(b"\n" + data):
            _refuse_end_marker(data, staged, rows)
            rows += data.count(b"\n")
            yield data
            if not block:
                return
            continue
        rows_before = rows
        kept = []
        at = 0
        for match in _BLANK_LINES.finditer(data):
            piece = data[at : match.start()]
            rows += piece.count(b"\n")
            kept.append(piece)
            blanks += 1
            if staged.blanks and staged.blanks[-1][0] == rows:
                staged.blanks[-1] = (rows, blanks)
            else:
                staged.blanks.append((rows, blanks))
            at = match.end()
        kept.append(data[at:])
        rows += data[at:].count(b"\n")
        out = b"".join(kept)
        _refuse_end_marker(out, staged, rows_before)
        if out:
            yield out
        if not block:
            return


def _refuse_end_marker(data: bytes, staged: Staged, rows_before: int) -> None:
    """A line holding only ``\\.`` would end a COPY early and silently: refuse it, by its line."""
    at = 0 if data.startswith((b"\\.\n", b"\\.\r\n")) else -1
    if at < 0:
        found = [i for i in (data.find(b"\n\\.\n"), data.find(b"\n\\.\r\n")) if i >= 0]
        at = min(found) + 1 if found else -1
    if at >= 0:
        line = staged.line_of(rows_before + data.count(b"\n", 0, at) + 1)
        raise InputError(f"line {line}: a line holding only \\. is not allowed")


def stage_csv(stream: io.BufferedReader) -> Staged:
    """CSV: the header is read here; every data byte goes to COPY as it is."""
    _strip_bom(stream)
    line = 0
    header_bytes = b""
    while not header_bytes.strip():
        header_bytes = stream.readline()
        line += 1
        if not header_bytes:
            raise InputError("line 1: the CSV file has no header")
    try:
        header = next(csv.reader([header_bytes.decode("utf-8")]))
    except (UnicodeDecodeError, csv.Error) as exc:
        raise InputError(f"line {line}: invalid CSV header: {exc}") from exc
    names = _csv_header(header, line)
    copy = sql.SQL("COPY {} ({}) FROM STDIN (FORMAT csv)").format(
        STAGE, sql.SQL(", ").join(map(sql.Identifier, names))
    )
    staged = Staged(copy=copy, first_line=line + 1)
    staged.blocks = _blocks(stream, staged)
    return staged


def _csv_header(record: list[str], line: int) -> list[str]:
    names = [name.strip().lower() for name in record]
    known = CSV_REQUIRED + CSV_OPTIONAL
    for name in names:
        if name not in known:
            raise InputError(
                f"line {line}: unknown CSV column {name!r}; "
                f"the header is {','.join(CSV_REQUIRED)}[,metadata]"
            )
    duplicates = sorted({name for name in names if names.count(name) > 1})
    missing = [name for name in CSV_REQUIRED if name not in names]
    if duplicates or missing:
        problem = (
            f"duplicate column {duplicates[0]!r}" if duplicates else f"no column {missing[0]!r}"
        )
        raise InputError(
            f"line {line}: {problem}; the header is {','.join(CSV_REQUIRED)}[,metadata]"
        )
    return names


def stage_ndjson(stream: io.BufferedReader) -> Staged:
    """NDJSON: every byte goes to COPY as it is, one line one row (a blank line is no action)."""
    _strip_bom(stream)
    staged = Staged(copy=COPY_NDJSON)
    staged.blocks = _blocks(stream, staged)
    return staged


def stage_json(stream: io.BufferedReader) -> Staged:
    """A JSON array, or the seed's ``{"actions": [...]}``: one row per element, numbered from 1."""
    _strip_bom(stream)
    return Staged(copy=COPY_JSON, rows=_json_elements(stream), label="element")


def _json_elements(stream: io.BufferedReader) -> Iterator[tuple[int, str]]:
    first = stream.peek(64).lstrip(b" \t\r\n")[:1]
    if first == b"[":
        container, target = "", "item"
    elif first == b"{":
        container, target = "actions", "actions.item"
    else:
        raise InputError('element 1: expected a JSON array or an object with an "actions" array')
    ordinal = 0
    found = False
    events = ijson.parse(stream, use_float=False)
    try:
        for prefix, event, value in events:
            if prefix == container and event == "start_array":
                found = True
            if prefix != target or event in ("end_map", "end_array"):
                continue
            ordinal += 1
            element = value
            if event in ("start_map", "start_array"):
                builder = ijson.ObjectBuilder()
                builder.event(event, value)
                end = "end_map" if event == "start_map" else "end_array"
                for inner_prefix, inner_event, inner_value in events:
                    builder.event(inner_event, inner_value)
                    if inner_prefix == target and inner_event == end:
                        break
                element = builder.value
            # Any element is staged; the SQL rules say what is wrong with one that is not an object.
            yield ordinal, dumps(element)
    except ijson.JSONError as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else "malformed"
        raise InputError(f"element {ordinal + 1}: invalid JSON: {reason}") from exc
    except UnicodeDecodeError as exc:
        raise InputError(f"element {ordinal + 1}: invalid UTF-8: {exc.reason}") from exc
    if not found:
        raise InputError('the JSON object has no "actions" array')


STAGERS: dict[str, Callable[[io.BufferedReader], Staged]] = {
    "csv": stage_csv,
    "ndjson": stage_ndjson,
    "json": stage_json,
}


# --------------------------------------------------------------------------- loading


@dataclass
class Summary:
    rows: int = 0
    chunks: int = 0
    inserted_count: int = 0
    skipped_count: int = 0
    verified_count: int = 0
    affected_users: int = 0
    global_total_lbs: str | None = None

    def add(self, result: dict[str, Any]) -> None:
        self.chunks += 1
        self.inserted_count += int(result.get("inserted_count") or 0)
        self.skipped_count += int(result.get("skipped_count") or 0)
        self.verified_count += int(result.get("verified_count") or 0)
        self.affected_users += int(result.get("affected_users") or 0)
        self.global_total_lbs = result["global_total_lbs"]

    def as_json(self) -> dict[str, Any]:
        return {
            "success": True,
            "rows": self.rows,
            "batches": self.chunks,
            "inserted_count": self.inserted_count,
            "skipped_count": self.skipped_count,
            "verified_count": self.verified_count,
            "affected_users": self.affected_users,
            "global_total_lbs": self.global_total_lbs,
        }


class _Progress:
    """A progress bar on a terminal (stderr): the file's bytes, then the chunks; else silent."""

    def __init__(self, enabled: bool) -> None:
        self._enabled = enabled
        self._bar: Any = None

    def start(self, label: str, length: int | None) -> None:
        self.close()
        if self._enabled and length:
            self._bar = click.progressbar(length=length, label=label, file=sys.stderr)
            self._bar.__enter__()

    def update(self, steps: int) -> None:
        if self._bar is not None:
            self._bar.update(steps)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.__exit__(None, None, None)
            self._bar = None


def _stream_size(stream: IO[bytes]) -> int | None:
    try:
        info = os.fstat(stream.fileno())
    except (OSError, AttributeError, io.UnsupportedOperation):
        return None
    return info.st_size if stat.S_ISREG(info.st_mode) else None


def _copy_into_stage(
    conn: psycopg.Connection, staged: Staged, counter: _CountingRaw, bar: _Progress
) -> None:
    shown = 0
    with conn.cursor() as cur, cur.copy(staged.copy) as copy:
        if staged.blocks is not None:
            for block in staged.blocks:
                copy.write(block)
                bar.update(counter.consumed - shown)
                shown = counter.consumed
        else:
            assert staged.rows is not None
            for number, row in enumerate(staged.rows, start=1):
                copy.write_row(row)
                if number % 10_000 == 0:
                    bar.update(counter.consumed - shown)
                    shown = counter.consumed
    bar.update(counter.consumed - shown)


def _copy_error(exc: psycopg.Error, staged: Staged) -> CliError:
    """A row COPY itself refused (not CSV, not JSON): name its line."""
    # COPY numbers the rows it reads from 1 (the header was read before it).
    match = _COPY_LINE.search(exc.diag.context or "")
    number = int(match.group(1)) if match else None
    where = f"{staged.label} {staged.line_of(number)}: " if number else ""
    reason = (exc.diag.message_primary or str(exc)).strip()
    if staged.copy is COPY_NDJSON:
        reason = f"invalid JSON ({reason})"
    return InputError(f"{where}{reason}; nothing was applied")


def _problem_line(problem: dict[str, Any], staged: Staged) -> str:
    """``line 7 (action_id ...): BS001: lbs must not be negative [lbs: -1]``."""
    where = f"{staged.label} {staged.line_of(int(problem['line']))}"
    action = f" (action_id {problem['action_id']})" if problem.get("action_id") else ""
    reason = problem["reason"]
    if problem.get("first_line") is not None:
        reason += f", {staged.label} {staged.line_of(int(problem['first_line']))}"
    value = problem.get("value")
    if problem["code"] == "BS002":
        shown = f" [{value}]"
    else:
        shown = f" [{problem['field']}: {value}]" if value not in (None, "") else ""
    return f"{where}{action}: {problem['code']}: {problem['field']} {reason}{shown}"


def backfill(
    database_url: str,
    stream: IO[bytes],
    *,
    name: str = "-",
    fmt: str | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    idempotency_key: str | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Stage, check and apply every row of ``stream``; return the summary."""
    if not 1 <= batch_size <= MAX_BATCH_SIZE:
        raise InputError(f"the batch size must be between 1 and {MAX_BATCH_SIZE}")
    counter = _CountingRaw(stream)
    buffered = io.BufferedReader(counter, buffer_size=1 << 16)
    fmt = format_for(name, fmt, buffered.peek(64))
    staged = STAGERS[fmt](buffered)
    summary = Summary()
    bar = _Progress(progress)
    try:
        with connect(database_url) as conn:
            conn.execute(OPEN_STAGE)
            bar.start("stage", _stream_size(stream))
            try:
                _copy_into_stage(conn, staged, counter, bar)
            except psycopg.errors.DataError as exc:  # includes BadCopyFileFormat
                conn.rollback()
                raise _copy_error(exc, staged) from exc
            load = conn.execute(LOAD_STAGE, (batch_size, MAX_PROBLEMS)).fetchone()[0]
            conn.commit()
            summary.rows = int(load["rows"])
            summary.global_total_lbs = load["global_total_lbs"]
            problems = load["problems"]
            if problems:
                rows = len({problem["line"] for problem in problems})
                more = " (the first 100 problems)" if len(problems) >= MAX_PROBLEMS else ""
                raise InputError(
                    f"{name}: {rows} bad row{'s' if rows != 1 else ''}{more} listed above; "
                    "nothing was applied",
                    [_problem_line(problem, staged) for problem in problems],
                )
            bounds = load["chunks"]
            chunks = list(zip(bounds, [*bounds[1:], None], strict=True)) if bounds else []
            bar.start("apply", len(chunks))
            for number, (low, below) in enumerate(chunks, start=1):
                key = f"{idempotency_key}:{number}" if idempotency_key else None
                try:
                    result = conn.execute(APPLY_CHUNK, (low, below, key)).fetchone()[0]
                    conn.commit()
                except psycopg.Error as exc:
                    conn.rollback()
                    raise _chunk_error(exc, number, len(chunks)) from exc
                summary.add(result)
                bar.update(1)
    finally:
        bar.close()
    return summary.as_json()


def _chunk_error(exc: psycopg.Error, number: int, total: int) -> CliError:
    """An error while applying: say which chunks committed, so that a rerun is clearly safe."""
    committed = (
        f"chunks 1-{number - 1} of {total} committed" if number > 1 else "no chunk committed"
    )
    error = to_cli_error(exc, prefix=f"chunk {number} of {total}: ")
    error.message += f" ({committed}; run the same command again to finish the load)"
    return error
