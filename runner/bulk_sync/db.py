"""Choosing the database, connecting to it, and turning its errors into CLI errors.

The database is ``--database-url``, else ``DATABASE_URL``, else the embedded default.
Errors map to exit codes: SQLSTATE class ``BS`` (the contract's input errors) and class
``22`` (data exceptions on our own casts) are bad input (2); a missing ``bulk_sync``
schema or function, a failed connection, or any other database error is 3.
"""

from __future__ import annotations

import os
import re
from typing import Any

import psycopg
from psycopg.types.json import set_json_loads

from bulk_sync import embedded
from bulk_sync.errors import EXIT_BAD_INPUT, EXIT_DATABASE, CliError
from bulk_sync.jsonutil import loads

APP_NAME = "bulk-sync"
# The largest values of the SQL parameter types: a wider number is bad input, refused before it
# reaches PostgreSQL as a type no function takes.
INT4_MAX = 2**31 - 1  # int: limits, offsets, seconds
INT8_MAX = 2**63 - 1  # bigint: event ids
MIGRATE_HINT = "run `bulk-sync migrate` to install the bulk_sync schema"
# Every session speaks UTF-8 whatever the database's encoding: files are read as UTF-8 and COPY
# sends their bytes as they are, so PostgreSQL converts text, and refuses (22P05, bad input) a
# character the database cannot hold.
CLIENT_ENCODING = "UTF8"

# json/jsonb values come back with exact decimals, never floats.
set_json_loads(loads)


def resolve_url(database_url: str | None = None) -> str:
    """``database_url``, else ``DATABASE_URL``, else the embedded default (started if needed)."""
    if database_url:
        return database_url
    from_env = os.environ.get("DATABASE_URL")
    if from_env:
        return from_env
    return embedded.ensure_running()


def connect(database_url: str, *, autocommit: bool = False, **kwargs: Any) -> psycopg.Connection:
    """Open a psycopg connection; a connection failure becomes a ``CliError`` (exit 3)."""
    kwargs.setdefault("application_name", APP_NAME)
    kwargs.setdefault("client_encoding", CLIENT_ENCODING)
    try:
        return psycopg.connect(database_url, autocommit=autocommit, **kwargs)
    except psycopg.OperationalError as exc:
        message = f"cannot connect to the database: {_one_line(str(exc))}"
        raise CliError(message, EXIT_DATABASE) from exc
    except psycopg.ProgrammingError as exc:  # a malformed URL / conninfo
        raise CliError(f"invalid database URL: {_one_line(str(exc))}", EXIT_BAD_INPUT) from exc


def _one_line(text: str) -> str:
    return re.sub(r"\s*\n\s*", "; ", text.strip())


def message_of(exc: psycopg.Error) -> str:
    """The server's primary message plus its DETAIL, on one line."""
    diag = exc.diag
    primary = diag.message_primary or str(exc) or type(exc).__name__
    text = _one_line(primary)
    if diag.message_detail:
        text += f" ({_one_line(diag.message_detail)})"
    return text


def _is_missing_schema(exc: psycopg.Error) -> bool:
    state = exc.sqlstate or ""
    if state == "3F000":  # invalid_schema_name
        return True
    if state in ("42883", "42P01"):  # undefined_function, undefined_table
        return "bulk_sync" in (exc.diag.message_primary or str(exc))
    return False


def to_cli_error(exc: psycopg.Error, prefix: str = "") -> CliError:
    """Map a psycopg error to the CLI's message and exit code."""
    state = exc.sqlstate or ""
    if _is_missing_schema(exc):
        return CliError(f"{prefix}{message_of(exc)}; {MIGRATE_HINT}", EXIT_DATABASE)
    if state.startswith("BS") or state.startswith("22"):
        return CliError(f"{prefix}{message_of(exc)}", EXIT_BAD_INPUT)
    if isinstance(exc, psycopg.OperationalError) and not state:
        return CliError(f"{prefix}database connection failed: {_one_line(str(exc))}", EXIT_DATABASE)
    return CliError(f"{prefix}{message_of(exc)}", EXIT_DATABASE)


def call_json(database_url: str, sql: str, params: tuple[Any, ...] = ()) -> Any:
    """Run one statement returning one jsonb value in its own transaction; return it parsed."""
    with connect(database_url) as conn:
        row = conn.execute(sql, params).fetchone()
    return None if row is None else row[0]


def call_text(database_url: str, sql: str, params: tuple[Any, ...] = ()) -> str | None:
    """Run one statement returning one text value in its own transaction; return it."""
    with connect(database_url) as conn:
        row = conn.execute(sql, params).fetchone()
    return None if row is None else row[0]
