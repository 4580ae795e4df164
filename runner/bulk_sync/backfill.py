"""``bulk-sync backfill FILE``: stream a file of actions into ``bulk_sync.bulk_backfill``.

The file is read row by row (CSV, NDJSON, a JSON array, or the seed's ``{"actions": [...]}``
object) and never held in memory whole. Each batch is copied into a temporary stage table
with ``COPY`` and sent as ONE ``bulk_backfill`` call, in its own transaction. Validation and
every total are the SQL's job; this module only parses, batches and reports. A row that
cannot be parsed, or that the SQL rejects, is reported with its line number.

Actions are idempotent by ``action_id``, so a failed or interrupted run can simply be run
again; with ``--idempotency-key K`` batch ``n`` uses the key ``K:n`` and a rerun with the
same batch size replays the batches that were already committed.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
import stat
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from itertools import islice
from typing import IO, Any

import click
import ijson
import psycopg

from bulk_sync.db import connect, to_cli_error
from bulk_sync.errors import EXIT_BAD_INPUT, CliError
from bulk_sync.jsonutil import dumps, loads

FORMATS = ("csv", "ndjson", "json")
DEFAULT_BATCH_SIZE = 10_000
MAX_BATCH_SIZE = 50_000

CSV_REQUIRED = ("action_id", "user_id", "lbs", "logged_at", "verified")
CSV_OPTIONAL = ("metadata",)
_TRUE = frozenset({"true", "t", "1", "yes", "y"})
_FALSE = frozenset({"false", "f", "0", "no", "n"})

CREATE_STAGE = (
    "CREATE TEMP TABLE IF NOT EXISTS bulk_sync_stage (line_no bigint NOT NULL, doc jsonb NOT NULL)"
)
CLEAR_STAGE = "TRUNCATE pg_temp.bulk_sync_stage"
COPY_STAGE = "COPY pg_temp.bulk_sync_stage (line_no, doc) FROM STDIN"
CALL_BACKFILL = (
    "SELECT bulk_sync.bulk_backfill(jsonb_build_object("
    "'actions', jsonb_agg(doc ORDER BY line_no), 'idempotency_key', %s::text)) "
    "FROM pg_temp.bulk_sync_stage"
)
CURRENT_TOTAL = "SELECT bulk_sync.global_total()::text"

_ELEMENT_INDEX = re.compile(r"actions\[(\d+)\]")
_COPY_LINE = re.compile(r"\bline (\d+)\b")

Row = tuple[int, str]  # (1-based line number or element ordinal, one JSON object as text)


class InputError(CliError):
    """A row or file that cannot be read (exit code 2)."""

    def __init__(self, message: str) -> None:
        super().__init__(message, EXIT_BAD_INPUT)


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


def read_csv(stream: io.BufferedReader) -> Iterator[Row]:
    """CSV rows; the header is ``action_id,user_id,lbs,logged_at,verified[,metadata]``."""
    text = io.TextIOWrapper(stream, encoding="utf-8-sig", newline="")
    csv.field_size_limit(max(csv.field_size_limit(), 1 << 24))
    reader = csv.reader(text, strict=True)
    header: list[str] | None = None
    previous = 0
    try:
        for record in reader:
            line, previous = previous + 1, reader.line_num
            if not record or record == [""]:
                continue
            if header is None:
                header = _csv_header(record, line)
                continue
            if len(record) != len(header):
                raise InputError(f"line {line}: expected {len(header)} fields, found {len(record)}")
            yield line, _csv_doc(header, record, line)
    except csv.Error as exc:
        raise InputError(f"line {reader.line_num}: invalid CSV: {exc}") from exc
    except UnicodeDecodeError as exc:
        raise InputError(f"line {reader.line_num + 1}: invalid UTF-8: {exc.reason}") from exc
    finally:
        text.detach()
    if header is None:
        raise InputError("line 1: the CSV file has no header")


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


def _csv_doc(header: list[str], record: list[str], line: int) -> str:
    doc: dict[str, Any] = {}
    for name, value in zip(header, record, strict=True):
        if name == "verified":
            flag = value.strip().lower()
            if flag in _TRUE:
                doc[name] = True
            elif flag in _FALSE:
                doc[name] = False
            elif flag:
                doc[name] = value  # passed through: the SQL rejects it with BS001
        elif name == "metadata":
            if value.strip():
                try:
                    doc[name] = loads(value)
                except ValueError as exc:
                    reason = _json_reason(exc)
                    raise InputError(f"line {line}: metadata is not valid JSON: {reason}") from exc
        else:
            doc[name] = value
    return dumps(doc)


def read_ndjson(stream: io.BufferedReader) -> Iterator[Row]:
    """One JSON object per line; blank lines are skipped."""
    _strip_bom(stream)
    for line, raw in enumerate(stream, start=1):
        if not raw.strip():
            continue
        try:
            text = raw.decode("utf-8")
            value = loads(text)
        except UnicodeDecodeError as exc:
            raise InputError(f"line {line}: invalid UTF-8: {exc.reason}") from exc
        except ValueError as exc:
            raise InputError(f"line {line}: invalid JSON: {_json_reason(exc)}") from exc
        if not isinstance(value, dict):
            raise InputError(f"line {line}: expected a JSON object, found {_kind(value)}")
        # The line is valid JSON: it goes to the server as written (numbers exactly as typed).
        yield line, text.strip()


def read_json(stream: io.BufferedReader) -> Iterator[Row]:
    """Elements of a JSON array, or of the ``actions`` array of a JSON object.

    The numbers are the elements' 1-based ordinals (a streaming parser has no line numbers).
    """
    _strip_bom(stream)
    first = stream.peek(64).lstrip(b" \t\r\n")[:1]
    if first == b"[":
        container, target = "", "item"
    elif first == b"{":
        container, target = "actions", "actions.item"
    else:
        raise InputError('element 1: expected a JSON array or an object with an "actions" array')
    ordinal = 0
    at = 1  # the element a parse error is in (or about to start)
    found = False
    events = ijson.parse(stream, use_float=False)
    try:
        for prefix, event, value in events:
            if prefix == container and event == "start_array":
                found = True
            if prefix != target or event in ("end_map", "end_array"):
                continue
            ordinal = at
            if event not in ("start_map", "start_array"):
                raise InputError(f"element {ordinal}: expected a JSON object, found {_kind(value)}")
            if event == "start_array":
                raise InputError(f"element {ordinal}: expected a JSON object, found an array")
            builder = ijson.ObjectBuilder()
            builder.event(event, value)
            for inner_prefix, inner_event, inner_value in events:
                if inner_prefix == target and inner_event == "end_map":
                    break
                builder.event(inner_event, inner_value)
            at = ordinal + 1
            yield ordinal, dumps(builder.value)
    except ijson.JSONError as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else "malformed"
        raise InputError(f"element {at}: invalid JSON: {reason}") from exc
    except UnicodeDecodeError as exc:
        raise InputError(f"element {at}: invalid UTF-8: {exc.reason}") from exc
    if not found:
        raise InputError('the JSON object has no "actions" array')


def _json_reason(exc: ValueError) -> str:
    if isinstance(exc, json.JSONDecodeError):
        return f"{exc.msg} (column {exc.colno})"
    return str(exc)


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return "a number"


READERS: dict[str, Callable[[io.BufferedReader], Iterator[Row]]] = {
    "csv": read_csv,
    "ndjson": read_ndjson,
    "json": read_json,
}


# --------------------------------------------------------------------------- loading


@dataclass
class Summary:
    rows: int = 0
    batches: int = 0
    inserted_count: int = 0
    skipped_count: int = 0
    verified_count: int = 0
    affected_users: int = 0
    global_total_lbs: str | None = None
    replayed: list[int] = field(default_factory=list)

    def add(self, batch_rows: int, result: dict[str, Any]) -> None:
        self.rows += batch_rows
        self.batches += 1
        self.inserted_count += int(result.get("inserted_count") or 0)
        self.skipped_count += int(result.get("skipped_count") or 0)
        self.verified_count += int(result.get("verified_count") or 0)
        self.affected_users += int(result.get("affected_users") or 0)
        self.global_total_lbs = result.get("global_total_lbs")
        if result.get("replayed"):
            self.replayed.append(self.batches)

    def as_json(self) -> dict[str, Any]:
        return {
            "success": True,
            "rows": self.rows,
            "batches": self.batches,
            "inserted_count": self.inserted_count,
            "skipped_count": self.skipped_count,
            "verified_count": self.verified_count,
            "affected_users": self.affected_users,
            "global_total_lbs": self.global_total_lbs,
        }


class _Progress:
    """A click progress bar on a terminal (stderr); silent otherwise."""

    def __init__(self, counter: _CountingRaw, size: int | None, enabled: bool) -> None:
        self._counter = counter
        self._bar: Any = None
        self._shown = 0
        self._rows = 0
        self._enabled = enabled
        if enabled and size:
            self._bar = click.progressbar(
                length=size, label="backfill", file=sys.stderr, show_pos=False, show_percent=True
            )
            self._bar.__enter__()

    def rows(self, count: int) -> None:
        if not self._enabled:
            return
        self._rows += count
        if self._bar is not None:
            self._bar.update(self._counter.consumed - self._shown)
            self._shown = self._counter.consumed
        else:
            click.echo(f"\rbackfill: {self._rows} rows", file=sys.stderr, nl=False)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.__exit__(None, None, None)
        elif self._enabled and self._rows:
            click.echo("", file=sys.stderr)


def _stream_size(stream: IO[bytes]) -> int | None:
    try:
        info = os.fstat(stream.fileno())
    except (OSError, AttributeError, io.UnsupportedOperation):
        return None
    return info.st_size if stat.S_ISREG(info.st_mode) else None


def _batches(rows: Iterator[Row], size: int) -> Iterator[list[Row]]:
    while batch := list(islice(rows, size)):
        yield batch


def _locate(exc: psycopg.Error, batch: list[Row], label: str, number: int) -> str:
    """Name the input row an SQL error is about (``actions[i]`` or a COPY line)."""
    diag = exc.diag
    for text in (diag.message_primary, diag.message_detail, diag.message_hint):
        match = _ELEMENT_INDEX.search(text or "")
        if match and int(match.group(1)) < len(batch):
            return f"{label} {batch[int(match.group(1))][0]}: "
    match = _COPY_LINE.search(diag.context or "")
    if match and "COPY" in (diag.context or "") and 0 < int(match.group(1)) <= len(batch):
        return f"{label} {batch[int(match.group(1)) - 1][0]}: "
    return f"batch {number} ({label}s {batch[0][0]}-{batch[-1][0]}): "


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
    """Load every row of ``stream`` through ``bulk_sync.bulk_backfill``; return the summary."""
    if not 1 <= batch_size <= MAX_BATCH_SIZE:
        raise InputError(f"the batch size must be between 1 and {MAX_BATCH_SIZE}")
    counter = _CountingRaw(stream)
    buffered = io.BufferedReader(counter, buffer_size=1 << 16)
    fmt = format_for(name, fmt, buffered.peek(64))
    label = "element" if fmt == "json" else "line"
    rows = READERS[fmt](buffered)
    summary = Summary()
    bar = _Progress(counter, _stream_size(stream), progress)
    try:
        with connect(database_url) as conn:
            conn.execute(CREATE_STAGE)
            conn.commit()
            for number, batch in enumerate(_batches(rows, batch_size), start=1):
                key = f"{idempotency_key}:{number}" if idempotency_key else None
                try:
                    with conn.cursor() as cur:
                        cur.execute(CLEAR_STAGE)
                        with cur.copy(COPY_STAGE) as copy:
                            for row in batch:
                                copy.write_row(row)
                        result = cur.execute(CALL_BACKFILL, (key,)).fetchone()[0]
                    conn.commit()
                except psycopg.Error as exc:
                    conn.rollback()
                    raise _batch_error(exc, batch, label, number, summary) from exc
                summary.add(len(batch), result)
                bar.rows(len(batch))
            if summary.batches == 0:
                summary.global_total_lbs = conn.execute(CURRENT_TOTAL).fetchone()[0]
                conn.commit()
    except InputError as exc:
        if summary.batches:
            exc.message += _committed_note(summary)
        raise
    finally:
        bar.close()
    return summary.as_json()


def _committed_note(summary: Summary) -> str:
    return (
        f" ({summary.batches} earlier batch{'es' if summary.batches != 1 else ''}, "
        f"{summary.rows} rows, committed; fix the row and run again)"
    )


def _batch_error(
    exc: psycopg.Error, batch: list[Row], label: str, number: int, summary: Summary
) -> CliError:
    error = to_cli_error(exc, prefix=_locate(exc, batch, label, number))
    if summary.batches and error.exit_code == EXIT_BAD_INPUT:
        error.message += _committed_note(summary)
    return error
