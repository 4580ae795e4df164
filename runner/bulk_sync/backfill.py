"""``bulk-sync backfill FILE``: load a file of actions through bulk_sync's one bulk core.

1. **Stage.** The file streams into a session's stage table (``bulk_sync._stage_open``) with ONE
   ``COPY``: CSV and NDJSON bytes go to the server as they are, with no per-row Python work; a JSON
   array is read element by element (ijson) and each element sent as one row. Memory stays flat; the
   stage lives on the server and may use disk. A large CSV or NDJSON file is cut at record
   boundaries into ``--jobs`` parts, each staged by its own session at the same time.
2. **Check.** Each session checks its part against the BS001 rules (``bulk_sync._stage_check``),
   the parts at the same time, into the load's shared rows; ``bulk_sync._stage_load`` then finds
   BS002 within the file and against stored actions. A file with any bad row changes nothing: every
   bad row (up to 100) is reported with its line number, field and reason, and the exit code is 2.
3. **Apply.** The checked rows are applied in chunks of whole users, in ``user_id`` order
   (``bulk_sync._stage_apply``), each chunk committed on its own, so each user's totals and event
   are written once per chunk and live writers wait for a chunk at most. ``_stage_close`` ends the
   load, whatever happened.

Validation, idempotency and every total are the SQL's. A failed or interrupted run is simply run
again: stored actions are skipped, so a rerun inserts nothing that is already there.
"""

from __future__ import annotations

import csv
import io
import itertools
import os
import re
import stat
import sys
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import IO, Any

import click
import ijson
import psycopg
from psycopg import sql
from psycopg.types.json import Jsonb

from bulk_sync.db import connect, to_cli_error
from bulk_sync.errors import EXIT_BAD_INPUT, CliError
from bulk_sync.jsonutil import dumps

FORMATS = ("csv", "ndjson", "json")
DEFAULT_BATCH_SIZE = 10_000
MAX_BATCH_SIZE = 50_000
MAX_PROBLEMS = 100
EXIT_INTERRUPTED = 130  # as the CLI exits on Ctrl-C (128 + SIGINT)
BLOCK = 1 << 16  # psycopg queues up to 1,024 blocks for COPY: at most 64 MiB in flight
DEFAULT_JOBS = 2
MAX_JOBS = 8
# A smaller file is staged by one session: a second one would not pay for itself.
SPLIT_MIN = 8 << 20

CSV_REQUIRED = ("action_id", "user_id", "lbs", "logged_at", "verified")
CSV_OPTIONAL = ("metadata",)

STAGE = sql.Identifier("pg_temp", "bulk_sync_stage")
# NDJSON lines go into the jsonb column as they are: CSV mode with a quote and a delimiter that
# valid JSON text cannot contain unescaped (control characters), so every line is one field.
COPY_NDJSON = sql.SQL(
    "COPY {} (doc) FROM STDIN (FORMAT csv, QUOTE E'\\x01', DELIMITER E'\\x02')"
).format(STAGE)
COPY_JSON = sql.SQL("COPY {} (line, doc) FROM STDIN").format(STAGE)
OPEN_STAGE = "SELECT bulk_sync._stage_open(%s)"
CHECK_PART = "SELECT bulk_sync._stage_check(%s, %s, %s)"
LOAD_STAGE = "SELECT bulk_sync._stage_load(%s, %s, %s, %s)"
APPLY_CHUNK = (
    "SELECT bulk_sync._stage_apply(%s, %s::uuid, %s::uuid, 'line %%s', 'bulk_backfill', %s)"
)
CLOSE_LOAD = "SELECT bulk_sync._stage_close(%s)"


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
    first_row: int = 1  # the load's number of the first staged row (parts after the first: later)
    # Blank lines are not sent: (rows staged before a run of them, blank lines so far), in order.
    blanks: list[tuple[int, int]] = field(default_factory=list)
    # A CSV row's field may be quoted across lines, which only a CSV reader sees: for a regular
    # file, rows are numbered by line when a problem is shown (see ``look_up_lines``).
    csv: bool = False
    # (file descriptor, first byte, end, the file line of that byte) of the part
    source: tuple[int, int, int, int] | None = None
    lines: dict[int, int] = field(default_factory=dict)  # row -> file line, once looked up

    def line_of(self, row: int) -> int:
        """The file line (or element) of the ``row``-th staged row (1-based)."""
        if row in self.lines:
            return self.lines[row]
        skipped = 0
        for before, total in self.blanks:
            if before >= row:
                break
            skipped = total
        return self.first_line + row - 1 + skipped


_BLANK_LINES = re.compile(rb"(?:^|(?<=\n))[ \t\r]*\n")
_BLANK_LINE = re.compile(rb"[ \t\r]*\n?")
_COPY_LINE = re.compile(r"^COPY [^,]+, line (\d+)", re.MULTILINE)
_ANY_BLANK_LINE = re.compile(rb"\n[ \t\r]*\n")  # a quick test: most blocks have none


def _blocks(stream: io.BufferedReader, staged: Staged) -> Iterator[bytes]:
    """The rest of the stream in blocks of whole lines, without blank lines (noted in ``staged``);
    the last line as it is, with or without its line ending.

    A line holding only ``\\.`` would end a COPY early and silently, so it is refused.
    """
    # The start of a line not ended yet, block by block: it is joined once, when its end comes,
    # so a line longer than many blocks costs no more than its length.
    pending: list[bytes] = []
    rows = 0  # lines sent so far
    blanks = 0
    while True:
        block = stream.read(BLOCK)
        if block:
            cut = block.rfind(b"\n") + 1  # whole lines only; the rest waits for a later block
            if not cut:
                pending.append(block)
                continue
            data = b"".join([*pending, block[:cut]]) if pending else block[:cut]
            pending = [block[cut:]] if cut < len(block) else []
        elif not pending:
            return
        else:
            # The last line, not ended: it is checked as ended by a newline but sent as it is, as
            # COPY takes every line's ending from the first one's (a CRLF file's is not "\n").
            data, pending = b"".join([*pending, b"\n"]), []
        if not _ANY_BLANK_LINE.search(b"\n" + data):
            _refuse_unsendable(data, staged, rows)
            rows += data.count(b"\n")
            yield data if block else data[:-1]
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
        _refuse_unsendable(out, staged, rows_before)
        if out:
            yield out if block else out[:-1]
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


def _refuse_unsendable(data: bytes, staged: Staged, rows_before: int) -> None:
    """Lines COPY would read otherwise than they are written: an end marker, and in NDJSON a raw
    quote or delimiter byte."""
    _refuse_end_marker(data, staged, rows_before)
    if staged.copy is COPY_NDJSON:
        _refuse_copy_quoting(data, staged, rows_before)


def _refuse_copy_quoting(data: bytes, staged: Staged, rows_before: int) -> None:
    """NDJSON lines reach COPY as CSV fields quoted by \\x01 and cut by \\x02 (``COPY_NDJSON``):
    either, raw, would change the line ("a\\x01b\\x01c" read as "abc"). Valid JSON holds neither
    unescaped, so a line holding one is refused, by its line."""
    found = [at for at in (data.find(b"\x01"), data.find(b"\x02")) if at >= 0]
    if found:
        at = min(found)
        line = staged.line_of(rows_before + data.count(b"\n", 0, at) + 1)
        raise InputError(
            f"line {line}: invalid JSON (the control character 0x{data[at]:02x} must be escaped);"
            " nothing was applied"
        )


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
    staged = Staged(copy=copy, first_line=line + 1, csv=True)
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


# A \uD800-\uDFFF escape that is not half of a pair, after an even run of backslashes (an odd one
# would make it text). The JSON parser turns such an escape into "?", which would store other
# text than the file's; PostgreSQL refuses it in jsonb, as it does for NDJSON.
_HIGH, _LOW = rb"\\u[dD][89abAB][0-9a-fA-F]{2}", rb"\\u[dD][c-fC-F][0-9a-fA-F]{2}"
_LONE_SURROGATE = re.compile(
    rb"(?<!\\)(?:\\\\)*(?:" + _HIGH + rb"(?!" + _LOW + rb")|(?<!" + _HIGH + rb")" + _LOW + rb")"
)


class _SurrogateCheck:
    """A stream read through, refusing a lone surrogate escape (see ``_LONE_SURROGATE``).

    Each read is scanned with the last bytes of the one before it, so an escape cut in two by a
    read is seen whole. A high half in the last bytes of a read may have its low half in the next:
    it is held back, and judged (and passed on) with the next read or at the end of the stream."""

    OVERLAP = 64  # bytes of the previous read scanned again: more than a pair and what precedes it
    PAIR_HALF = 6  # len(rb"\udc00"): the bytes a high half needs after it to be judged

    def __init__(self, stream: io.BufferedReader) -> None:
        self.stream = stream
        self.tail = b""  # the last bytes passed on
        self.offset = 0  # of ``tail`` in the stream
        # The bytes before ``tail`` end in an odd run of backslashes: its first byte is escaped.
        self.escaped = False
        self.held = b""  # bytes read, not passed on yet

    def read(self, size: int = -1) -> bytes:
        if size == 0:
            return b""
        data = self.held
        while True:
            more = self.stream.read(size)
            data += more
            scanned = self._lead() + self.tail + data
            judged = len(scanned) - len(data)
            passed = len(data)
            found = self._lone(scanned, judged) if rb"\u" in scanned else None
            if found:
                if not more or found.end() + self.PAIR_HALF <= len(scanned):
                    escape = "\\" + found.group().lstrip(b"\\").decode()
                    at = self.offset + found.end() - len(self._lead()) - self.PAIR_HALF
                    raise InputError(
                        f"byte {at}: invalid JSON: {escape} is half of a UTF-16 surrogate pair,"
                        " with no other half"
                    )
                passed = max(found.start() - judged, 0)
            if passed or not more:
                break
        out, self.held = data[:passed], data[passed:]
        self._pass(out)
        return out

    @staticmethod
    def _lone(scanned: bytes, judged: int) -> re.Match[bytes] | None:
        """The first lone surrogate escape that ends past byte ``judged``: those before it were
        judged by an earlier read, with the bytes before them that ``scanned`` may have cut off."""
        for found in _LONE_SURROGATE.finditer(scanned):
            if found.end() > judged:
                return found
        return None

    def _lead(self) -> bytes:
        return b"\\" if self.escaped else b""

    def _pass(self, out: bytes) -> None:
        """Keep the last OVERLAP bytes passed on, to scan again with the next read."""
        scanned = self.tail + out
        cut = max(len(scanned) - self.OVERLAP, 0)
        if cut and scanned[cut - 1] == 0x5C:  # a run of backslashes goes on into the new tail
            run = cut - len(scanned[:cut].rstrip(b"\\"))
            self.escaped = (run % 2 == 1) != (run == cut and self.escaped)
        elif cut:
            self.escaped = False
        self.tail = scanned[cut:]
        self.offset += cut


def _json_elements(stream: io.BufferedReader) -> Iterator[tuple[int, str]]:
    first = stream.peek(64).lstrip(b" \t\r\n")[:1]
    if first == b"[":
        container, target = "", "item"
    elif first == b"{":
        container, target = "actions", "actions.item"
    else:
        raise InputError('element 1: expected a JSON array or an object with an "actions" array')
    ordinal = 0  # elements begun so far: the one being read is element ``ordinal``
    inside = False  # within element ``ordinal``, not between two elements
    found = closed = False
    # Integers come as int: one longer than Python's digit limit crashes the parser, so backfill()
    # lifts the limit while it runs (_INTEGERS_OF_ANY_LENGTH).
    events = ijson.parse(_SurrogateCheck(stream), use_float=False)
    try:
        for prefix, event, value in events:
            if prefix == container and event in ("start_array", "end_array"):
                found, closed = True, event == "end_array"
            if prefix != target or event in ("end_map", "end_array"):
                continue
            ordinal += 1
            element = value
            if event in ("start_map", "start_array"):
                inside = True
                builder = ijson.ObjectBuilder()
                builder.event(event, value)
                end = "end_map" if event == "start_map" else "end_array"
                for inner_prefix, inner_event, inner_value in events:
                    builder.event(inner_event, inner_value)
                    if inner_prefix == target and inner_event == end:
                        break
                element = builder.value
                inside = False
            # Any element is staged; the SQL rules say what is wrong with one that is not an object.
            yield ordinal, dumps(element)
    except ijson.JSONError as exc:
        where = _json_where(ordinal, inside, closed)
        raise InputError(f"{where}: invalid JSON: {_json_reason(exc)}") from exc
    except UnicodeDecodeError as exc:
        where = _json_where(ordinal, inside, closed)
        raise InputError(f"{where}: invalid UTF-8: {exc.reason}") from exc
    if not found:
        raise InputError('the JSON object has no "actions" array')


class _IntegersOfAnyLength:
    """While a load runs, Python converts integers of any length to and from text.

    The JSON parser crashes the process (it does not raise) on an integer past Python's limit of
    4,300 digits, and the SQL judges such an amount itself. The limit is the whole process's, so
    it is lifted while any load runs in it and put back when the last one ends.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._loads = 0
        self._saved = 0

    def __enter__(self) -> None:
        with self._lock:
            if self._loads == 0:
                self._saved = sys.get_int_max_str_digits()
                sys.set_int_max_str_digits(0)
            self._loads += 1

    def __exit__(self, *exc: object) -> None:
        with self._lock:
            self._loads -= 1
            if self._loads == 0:
                sys.set_int_max_str_digits(self._saved)


_INTEGERS_OF_ANY_LENGTH = _IntegersOfAnyLength()


def _json_where(ordinal: int, inside: bool, closed: bool) -> str:
    """Where a parse error is: in the element being read, else where the next one would start."""
    if closed:
        return "after the array"
    return f"element {ordinal if inside else ordinal + 1}"


def _json_reason(exc: Exception) -> str:
    """The parser's reason, on one line: without the excerpt of the text it quotes below it, and
    without the bytes repr (``b'lexical error: ...\\n...'``) it gives when that excerpt is not
    valid UTF-8."""
    raw = exc.args[0] if exc.args else ""
    text = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else str(raw)
    lines = text.strip().splitlines()
    reason = lines[0].strip().rstrip(".") if lines else ""
    return reason or "malformed"


STAGERS: dict[str, Callable[[io.BufferedReader], Staged]] = {
    "csv": stage_csv,
    "ndjson": stage_ndjson,
    "json": stage_json,
}


# --------------------------------------------------------------------------- parts


class _RangeRaw(io.RawIOBase):
    """Bytes ``start`` to ``end`` of a file, read with ``pread``: parts read side by side."""

    def __init__(self, fd: int, start: int, end: int) -> None:
        self._fd, self._at, self._end = fd, start, end

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        data = os.pread(self._fd, min(len(buffer), self._end - self._at), self._at)
        size = len(data)
        buffer[:size] = data
        self._at += size
        return size


def _count(fd: int, start: int, end: int, byte: bytes) -> int:
    """How many times ``byte`` occurs in bytes ``start`` to ``end`` of the file."""
    total = 0
    while start < end:
        block = os.pread(fd, min(1 << 20, end - start), start)
        if not block:
            break
        total += block.count(byte)
        start += len(block)
    return total


def _record_start(fd: int, at: int, size: int, quoted: bool) -> int | None:
    """The first record boundary at or after byte ``at``: after a newline outside any quoted field
    (CSV: after an even number of quotes from the file's start). None when there is none."""
    quotes = _count(fd, 0, at, b'"') if quoted else 0
    while at < size:
        block = os.pread(fd, min(BLOCK, size - at), at)
        start = 0
        while (newline := block.find(b"\n", start)) >= 0:
            if quoted:
                quotes += block.count(b'"', start, newline)
            if quotes % 2 == 0:
                return at + newline + 1 if at + newline + 1 < size else None
            start = newline + 1
        if quoted:
            quotes += block.count(b'"', start)
        at += len(block)
    return None


def _parts(stream: IO[bytes], fmt: str, jobs: int) -> list[tuple[Staged, _CountingRaw]] | None:
    """A large regular CSV or NDJSON file cut into ``jobs`` parts at record boundaries, each staged
    on its own (the first one reads the header); None when the file is staged whole."""
    size = _stream_size(stream)
    if jobs < 2 or fmt not in ("csv", "ndjson") or size is None or size < SPLIT_MIN:
        return None
    fd = stream.fileno()
    cuts = [0]
    for k in range(1, jobs):
        cut = _record_start(fd, max(cuts[-1], size * k // jobs), size, fmt == "csv")
        if cut is None:
            break
        cuts.append(cut)
    if len(cuts) < 2:
        return None
    cuts.append(size)
    parts = []
    for start, end in itertools.pairwise(cuts):
        counter = _CountingRaw(_RangeRaw(fd, start, end))
        buffered = io.BufferedReader(counter, buffer_size=BLOCK)
        if not parts:
            first = STAGERS[fmt](buffered)
            first.source = (fd, start, end, 1)
            parts.append((first, counter))
            continue
        line = 1 + _count(fd, 0, start, b"\n")
        staged = Staged(first.copy, first_line=line, csv=first.csv, source=(fd, start, end, line))
        staged.blocks = _blocks(buffered, staged)
        parts.append((staged, counter))
    return parts


def look_up_lines(staged: Staged, rows: set[int]) -> None:
    """Number ``rows`` of a CSV part by the file's lines: its rows are read again from the file
    with a CSV reader, as COPY read them, so that a field quoted across lines moves the numbers
    of the rows after it. Only for a regular file; other rows keep ``line_of``'s count."""
    if not staged.csv or staged.source is None:
        return
    fd, start, end, start_line = staged.source
    wanted = rows - staged.lines.keys()
    lines = iter(io.BufferedReader(_RangeRaw(fd, start, end), buffer_size=BLOCK))
    for _ in range(staged.first_line - start_line):  # the first part's header (and lines before)
        next(lines, None)
    read = [0, b""]  # lines read since the first row, the last of them

    def texts() -> Iterator[str]:
        for raw in lines:
            read[0], read[1] = read[0] + 1, raw
            yield raw.decode("utf-8", "replace")

    records = csv.reader(texts())
    row = 0
    limit = csv.field_size_limit(sys.maxsize)
    try:
        while wanted:
            before = read[0]
            if next(records, None) is None:
                return
            if read[0] - before == 1 and _BLANK_LINE.fullmatch(read[1]):
                continue  # a blank line is no row (see _blocks)
            row += 1
            if row in wanted:
                staged.lines[row] = staged.first_line + before
                wanted.discard(row)
    except csv.Error:  # not CSV as Python reads it: the rest keep line_of's count
        return
    finally:
        csv.field_size_limit(limit)


def _part_of(parts: list[Staged], row: int) -> tuple[Staged, int]:
    """The part holding the load's ``row``-th row, and the row's number within that part."""
    part = next(p for p in reversed(parts) if p.first_row <= row)
    return part, row - part.first_row + 1


# --------------------------------------------------------------------------- loading


@dataclass
class Summary:
    """The run's totals, chunk by chunk. A chunk replayed under ``--idempotency-key`` changed
    nothing in this run: its rows count as skipped, and ``replayed`` counts it."""

    rows: int = 0
    chunks: int = 0
    inserted_count: int = 0
    skipped_count: int = 0
    verified_count: int = 0
    affected_users: int = 0
    global_total_lbs: str | None = None
    replayed: int | None = None  # chunks replayed; reported only with an idempotency key

    def add(self, result: dict[str, Any]) -> None:
        self.chunks += 1
        keys = ("inserted_count", "skipped_count", "verified_count")
        counts = [int(result.get(key) or 0) for key in keys]
        if result.get("replayed"):
            # The first run's response, replayed: this run inserted and verified none of its rows.
            self.replayed = (self.replayed or 0) + 1
            self.skipped_count += sum(counts)
            return
        inserted, skipped, verified = counts
        self.inserted_count += inserted
        self.skipped_count += skipped
        self.verified_count += verified
        self.affected_users += int(result.get("affected_users") or 0)

    def as_json(self) -> dict[str, Any]:
        summary = {
            "success": True,
            "rows": self.rows,
            "batches": self.chunks,
            "inserted_count": self.inserted_count,
            "skipped_count": self.skipped_count,
            "verified_count": self.verified_count,
            "affected_users": self.affected_users,
            "global_total_lbs": self.global_total_lbs,
        }
        if self.replayed is not None:
            summary["replayed"] = self.replayed
        return summary


class _Progress:
    """A progress bar on a terminal (stderr): the file's bytes, then the chunks; else silent."""

    def __init__(self, enabled: bool) -> None:
        self._enabled = enabled
        self._bar: Any = None
        self._lock = threading.Lock()  # parts are staged from several threads

    def start(self, label: str, length: int | None) -> None:
        self.close()
        if self._enabled and length:
            self._bar = click.progressbar(length=length, label=label, file=sys.stderr)
            self._bar.__enter__()

    def update(self, steps: int) -> None:
        with self._lock:
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


class _Stopped(Exception):
    """Raised in a COPY's thread when the load stops (Ctrl-C, or another part failed): leaving
    ``cur.copy()`` with it ends the COPY on the server."""


def _copy_into_stage(
    conn: psycopg.Connection,
    staged: Staged,
    counter: _CountingRaw,
    bar: _Progress,
    stop: threading.Event,
) -> int:
    """COPY one part into the session's stage, until ``stop`` is set; the number of rows staged."""
    shown = 0
    try:
        with conn.cursor() as cur:
            with cur.copy(staged.copy) as copy:
                if staged.blocks is not None:
                    for block in staged.blocks:
                        if stop.is_set():
                            raise _Stopped
                        copy.write(block)
                        bar.update(counter.consumed - shown)
                        shown = counter.consumed
                else:
                    assert staged.rows is not None
                    for number, row in enumerate(staged.rows, start=1):
                        copy.write_row(row)
                        if number % 10_000 == 0:
                            if stop.is_set():
                                raise _Stopped
                            bar.update(counter.consumed - shown)
                            shown = counter.consumed
            bar.update(counter.consumed - shown)
            return cur.rowcount
    except psycopg.errors.DataError as exc:  # includes BadCopyFileFormat
        conn.rollback()
        raise _copy_error(exc, staged) from exc


def _copy_error(exc: psycopg.Error, staged: Staged) -> CliError:
    """A row COPY itself refused (not CSV, not JSON): name its line."""
    # COPY numbers the rows it reads from 1 (the header was read before it), a CSV row quoted
    # across lines as one: ``look_up_lines`` numbers it by the file's lines.
    match = _COPY_LINE.search(exc.diag.context or "")
    number = int(match.group(1)) if match else None
    if number:
        look_up_lines(staged, {number})
    where = f"{staged.label} {staged.line_of(number)}: " if number else ""
    reason = (exc.diag.message_primary or str(exc)).strip()
    if staged.copy is COPY_NDJSON:
        reason = f"invalid JSON ({reason})"
    return InputError(f"{where}{reason}; nothing was applied")


def _problem_line(problem: dict[str, Any], parts: list[Staged]) -> str:
    """``line 7 (action_id ...): BS001: lbs must not be negative [lbs: -1]``."""

    def where(row: int) -> str:
        part, number = _part_of(parts, row)
        return f"{part.label} {part.line_of(number)}"

    action = f" (action_id {problem['action_id']})" if problem.get("action_id") else ""
    reason = problem["reason"]
    if problem.get("first_line") is not None:
        reason += f", {where(int(problem['first_line']))}"
    value = problem.get("value")
    if value is not None:  # one line per problem, whatever the field held
        value = value.replace("\r", "\\r").replace("\n", "\\n")
    if problem["code"] == "BS002":
        shown = f" [{value}]"
    else:
        shown = f" [{problem['field']}: {value}]" if value not in (None, "") else ""
    code, fields = problem["code"], problem["field"]
    return f"{where(int(problem['line']))}{action}: {code}: {fields} {reason}{shown}"


def _check_parts(
    sessions: list[psycopg.Connection],
    load: str,
    parts: list[tuple[Staged, _CountingRaw]],
    bar: _Progress,
) -> list[dict[str, Any]]:
    """Stage and check every part, each on its own session and all at once; the BS001 problems, by
    the load's row numbers, in line order."""
    stop = threading.Event()
    with ThreadPoolExecutor(len(parts)) as pool:
        staging = [
            pool.submit(_copy_into_stage, session, part, counter, bar, stop)
            for session, (part, counter) in zip(sessions, parts, strict=True)
        ]
        try:
            counts = [future.result() for future in staging]
        except KeyboardInterrupt as exc:  # SIGINT reaches this thread only
            raise CliError(
                "interrupted while staging the file; nothing was applied", EXIT_INTERRUPTED
            ) from exc
        finally:
            # However staging ended, each COPY stops at its next block instead of reading its
            # part to the end; leaving the pool waits for that.
            stop.set()
        row = 1
        for (part, _), count in zip(parts, counts, strict=True):
            part.first_row, row = row, row + count

        def check(session: psycopg.Connection, part: Staged) -> dict[str, Any]:
            result = session.execute(CHECK_PART, (load, part.first_row, MAX_PROBLEMS)).fetchone()
            session.commit()
            return result[0]

        checking = [
            pool.submit(check, session, part)
            for session, (part, _) in zip(sessions, parts, strict=True)
        ]
        results = [future.result() for future in checking]
    # Each part's problems are those of its first MAX_PROBLEMS bad rows; _stage_load keeps the
    # first MAX_PROBLEMS bad rows of them all.
    return sorted(
        (problem for result in results for problem in result["problems"]),
        key=lambda problem: (int(problem["line"]), problem["field"]),
    )


def _apply_chunks(
    sessions: list[psycopg.Connection],
    load: str,
    chunks: list[tuple[str, str | None]],
    idempotency_key: str | None,
    summary: Summary,
    bar: _Progress,
) -> None:
    """Apply the chunks, each in its own transaction, on every session at once (chunks share no
    user, so they never wait for each other). After a failure, or an interrupt (Ctrl-C), no
    further chunk starts; the chunks in flight end as they would (they may commit)."""
    lock = threading.Lock()
    pending = iter(enumerate(chunks, start=1))
    committed: list[int] = []
    failed: list[tuple[int, psycopg.Error]] = []
    stopped = threading.Event()

    def work(session: psycopg.Connection) -> None:
        while True:
            with lock:
                taken = None if failed or stopped.is_set() else next(pending, None)
            if taken is None:
                return
            number, (low, below) = taken
            key = f"{idempotency_key}:{number}" if idempotency_key else None
            try:
                result = session.execute(APPLY_CHUNK, (load, low, below, key)).fetchone()[0]
                session.commit()
            except psycopg.Error as exc:
                session.rollback()
                with lock:
                    failed.append((number, exc))
                return
            with lock:
                summary.add(result)
                committed.append(number)
            bar.update(1)

    pool = ThreadPoolExecutor(len(sessions))
    try:
        for future in [pool.submit(work, session) for session in sessions]:
            future.result()
    except KeyboardInterrupt as exc:
        # SIGINT reaches this thread only: the workers stop at their next chunk, and the load
        # ends once they have (the sessions are theirs until then).
        stopped.set()
        pool.shutdown(wait=True)
        done = f"{len(committed)} of {len(chunks)} chunks committed"
        raise CliError(
            f"interrupted ({done}; run the same command again to finish the load)", EXIT_INTERRUPTED
        ) from exc
    finally:
        stopped.set()
        pool.shutdown(wait=True)
    if failed:
        number, exc = min(failed, key=lambda failure: failure[0])
        raise _chunk_error(exc, number, len(chunks), len(committed))


def backfill(
    database_url: str,
    stream: IO[bytes],
    *,
    name: str = "-",
    fmt: str | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    idempotency_key: str | None = None,
    jobs: int = DEFAULT_JOBS,
    progress: bool = False,
) -> dict[str, Any]:
    """Stage, check and apply every row of ``stream``; return the summary."""
    if not 1 <= batch_size <= MAX_BATCH_SIZE:
        raise InputError(f"the batch size must be between 1 and {MAX_BATCH_SIZE}")
    if not 1 <= jobs <= MAX_JOBS:
        raise InputError(f"the number of jobs must be between 1 and {MAX_JOBS}")
    counter = _CountingRaw(stream)
    buffered = io.BufferedReader(counter, buffer_size=1 << 16)
    fmt = format_for(name, fmt, buffered.peek(64))
    parts = _parts(stream, fmt, jobs) or [(STAGERS[fmt](buffered), counter)]
    size = _stream_size(stream)
    if len(parts) == 1 and size is not None:
        parts[0][0].source = (stream.fileno(), 0, size, 1)
    summary = Summary(replayed=0 if idempotency_key else None)
    bar = _Progress(progress)
    with _INTEGERS_OF_ANY_LENGTH, connect(database_url) as conn:
        load = conn.execute(OPEN_STAGE, (None,)).fetchone()[0]
        conn.commit()  # the other sessions join the load
        sessions = [conn]
        try:
            while len(sessions) < len(parts):
                sessions.append(connect(database_url))
                sessions[-1].execute(OPEN_STAGE, (load,))
            bar.start("stage", _stream_size(stream))
            problems = _check_parts(sessions, load, parts, bar)
            checked = conn.execute(
                LOAD_STAGE, (load, batch_size, MAX_PROBLEMS, Jsonb(problems))
            ).fetchone()[0]
            conn.commit()
            summary.rows = int(checked["rows"])
            problems = checked["problems"]
            if problems:
                staged = [part for part, _ in parts]
                wanted: dict[int, set[int]] = {}
                for problem in problems:
                    for row in (problem["line"], problem.get("first_line")):
                        if row is not None:
                            part, number = _part_of(staged, int(row))
                            wanted.setdefault(id(part), set()).add(number)
                for part in staged:
                    look_up_lines(part, wanted.get(id(part), set()))
                rows = len({problem["line"] for problem in problems})
                more = f" (the first {MAX_PROBLEMS})" if rows >= MAX_PROBLEMS else ""
                raise InputError(
                    f"{name}: {rows} bad row{'s' if rows != 1 else ''}{more} listed above; "
                    "nothing was applied",
                    [_problem_line(problem, staged) for problem in problems],
                )
            bounds = checked["chunks"]
            chunks = list(zip(bounds, [*bounds[1:], None], strict=True)) if bounds else []
            while len(sessions) < min(jobs, len(chunks)):
                sessions.append(connect(database_url))
            bar.start("apply", len(chunks))
            _apply_chunks(sessions, load, chunks, idempotency_key, summary, bar)
        except BaseException:
            _close_load(sessions, load, quietly=True)
            raise
        finally:
            bar.close()
        # The total once every chunk committed (they commit in no particular order).
        summary.global_total_lbs = _close_load(sessions, load)["global_total_lbs"]
    return summary.as_json()


def _close_load(
    sessions: list[psycopg.Connection], load: str, *, quietly: bool = False
) -> dict[str, Any]:
    """End the load (its checked rows go) and close the sessions but the first; after a failure,
    ``quietly``: the first error is the one to report."""
    for session in sessions[1:]:
        session.close()
    conn = sessions[0]
    try:
        conn.rollback()
        closed = conn.execute(CLOSE_LOAD, (load,)).fetchone()[0]
        conn.commit()
    except psycopg.Error:
        if not quietly:
            raise
        return {}
    return closed


def _chunk_error(exc: psycopg.Error, number: int, total: int, committed: int) -> CliError:
    """An error while applying: say how many chunks committed, so that a rerun is clearly safe."""
    done = f"{committed} of {total} chunks committed" if committed else "no chunk committed"
    error = to_cli_error(exc, prefix=f"chunk {number} of {total}: ")
    state = getattr(exc, "sqlstate", None) or ""
    if state == "BS003":  # the same command would meet the same key
        error.message += f" ({done}; the key is another load's: pass another --idempotency-key)"
    elif state.startswith("22"):  # a value the database refuses, such as a total past the bound
        error.message += (
            f" ({done}; the committed chunks stand, and a rerun would fail the same way)"
        )
    else:
        error.message += f" ({done}; run the same command again to finish the load)"
    return error
