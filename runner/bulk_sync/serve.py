"""``bulk-sync serve``: the HTTP API of the contract (§7), a thin layer over the SQL functions.

- ``ROUTES`` maps each path to one SQL statement calling one function of ``bulk_sync``; the
  function's jsonb comes back as text and is the response body, unchanged (amounts stay strings).
- The request body goes to SQL as the client sent it (``::jsonb``). Python checks only what
  HTTP owns: the token, the content type, the size, that the body is a JSON object, and the
  uuids, integers and timestamps in the path and query. Every other rule is the SQL's.
- ``STATUS_BY_SQLSTATE`` maps SQLSTATEs to statuses; ``database_error`` is the one place that
  turns a psycopg error into the error body ``{"error": {"code", "message", "detail", "hint"}}``.
- Each request is one transaction that first runs ``SET LOCAL ROLE`` to the endpoint's
  ``bulk_sync_*`` role (``bulk_sync_admin`` for an admin token), so PostgreSQL checks the
  boundary a second time. The login role must be a member of the three roles.
- ``POST /api/actions/log`` goes through ``Coalescer``: requests that arrive while a batch is in
  flight are sent together as one ``log_actions`` call when it returns, or as soon as they fill
  one (see that class).
- ``GET /api/events/stream`` is fed by one ``events.follow`` per process (``EventHub``) in a
  thread; each client first catches up from the database through the pool.
"""

from __future__ import annotations

import asyncio
import collections
import copy
import hmac
import http
import ipaddress
import logging
import os
import re
import select
import threading
import uuid
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib import resources
from typing import Any, ClassVar, cast
from urllib.parse import quote, unquote_plus

import psycopg
from psycopg import AsyncClientCursor
from psycopg_pool import AsyncConnectionPool, PoolTimeout
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route
from uvicorn.config import LOGGING_CONFIG
from uvicorn.logging import AccessFormatter
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from bulk_sync import events
from bulk_sync.db import APP_NAME, CLIENT_ENCODING, INT4_MAX, INT8_MAX, MIGRATE_HINT, connect
from bulk_sync.jsonutil import JsonNumber, dumps, loads_unconverted

log = logging.getLogger("bulk_sync.serve")

DEFAULT_MAX_BODY_BYTES = 64 * 2**20
DEFAULT_POOL_SIZE = 10
DEFAULT_BATCH_MAX = 500  # log requests per log_actions call; 1 turns coalescing off
BATCH_MAX_BYTES = 4 * 2**20  # a batch also closes at this much request text
BATCH_ATTEMPTS = 3  # a batch rolled back by a deadlock or a serialization failure is retried
POOL_TIMEOUT_S = 5.0  # waiting longer for a connection than this answers 503
RETRY_AFTER_S = "2"
EVENT_PAGE = 1000
HUB_POLL_S = 0.5  # the server publishes and reads events itself at least this often
HEARTBEAT_S = 15.0
MAX_PENDING_PAGES = 1000  # a stream client this far behind is dropped; it resumes on reconnect

READER, WRITER, ADMIN = 1, 2, 3
ROLE = {READER: "bulk_sync_reader", WRITER: "bulk_sync_writer", ADMIN: "bulk_sync_admin"}
ROLE_HINT = (
    "PostgreSQL refused a privilege of the request's role: the login role of bulk-sync serve "
    "must be a member of bulk_sync_reader, bulk_sync_writer and bulk_sync_admin"
)
SET_ROLE = {level: f"SET LOCAL ROLE {role}" for level, role in ROLE.items()}


# --------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class Settings:
    database_url: str
    reader_token: str | None = None
    writer_token: str | None = None
    admin_token: str | None = None
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    pool_size: int = DEFAULT_POOL_SIZE
    batch_max: int = DEFAULT_BATCH_MAX

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        """DATABASE_URL, BULK_SYNC_{READER,WRITER,ADMIN}_TOKEN, BULK_SYNC_MAX_BODY_BYTES,
        BULK_SYNC_POOL_SIZE and BULK_SYNC_BATCH_MAX (how ``bulk-sync serve`` hands its options
        to every worker)."""
        env = os.environ if environ is None else environ
        return cls(
            database_url=env.get("DATABASE_URL", ""),
            reader_token=env.get("BULK_SYNC_READER_TOKEN") or None,
            writer_token=env.get("BULK_SYNC_WRITER_TOKEN") or None,
            admin_token=env.get("BULK_SYNC_ADMIN_TOKEN") or None,
            max_body_bytes=_positive(env, "BULK_SYNC_MAX_BODY_BYTES", DEFAULT_MAX_BODY_BYTES),
            pool_size=_positive(env, "BULK_SYNC_POOL_SIZE", DEFAULT_POOL_SIZE),
            batch_max=_positive(env, "BULK_SYNC_BATCH_MAX", DEFAULT_BATCH_MAX),
        )

    @property
    def any_token(self) -> bool:
        return any((self.reader_token, self.writer_token, self.admin_token))


def _positive(env: Mapping[str, str], name: str, default: int) -> int:
    """A positive integer setting, or ValueError naming it."""
    text = env.get(name) or str(default)
    if not re.fullmatch(r"[0-9]{1,18}", text.strip()) or int(text) < 1:
        raise ValueError(f"{name} must be a positive integer (bytes or a count), not {text!r}")
    return int(text)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def startup_problem(settings: Settings, host: str) -> str | None:
    """Why the server must not start on ``host`` with these tokens, or None."""
    if is_loopback(host):
        return None
    if not settings.any_token:
        return (
            f"no token is set, so serve listens only on a loopback host, not {host}; set "
            "BULK_SYNC_WRITER_TOKEN and BULK_SYNC_ADMIN_TOKEN (and BULK_SYNC_READER_TOKEN "
            "to protect reads)"
        )
    missing = [
        name
        for name, value in (
            ("BULK_SYNC_WRITER_TOKEN", settings.writer_token),
            ("BULK_SYNC_ADMIN_TOKEN", settings.admin_token),
        )
        if not value
    ]
    if missing:
        return f"serving on {host} needs {' and '.join(missing)}"
    return None


# --------------------------------------------------------------------------- errors


class ApiError(Exception):
    """An answer other than 2xx, in the contract's error body."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        detail: str | None = None,
        hint: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.detail = detail
        self.hint = hint
        self.headers = dict(headers or {})

    def response(self) -> Response:
        body = {
            "error": {
                "code": self.code,
                "message": self.message,
                "detail": self.detail,
                "hint": self.hint,
            }
        }
        return Response(
            dumps(body), self.status, headers=self.headers, media_type="application/json"
        )


def bad_input(message: str, detail: str | None = None) -> ApiError:
    return ApiError(400, "BS001", message, detail)


def unavailable(message: str, hint: str | None = None) -> ApiError:
    return ApiError(503, "unavailable", message, None, hint, {"Retry-After": RETRY_AFTER_S})


# SQLSTATE (or its two-character class) -> HTTP status.
STATUS_BY_SQLSTATE: dict[str, int] = {
    "BS001": 400,  # invalid input
    "BS002": 409,  # the same action_id with other facts
    "BS003": 422,  # an idempotency key reused with other actions
    "BS004": 404,  # an unknown action
    "BS005": 413,  # a batch over the per-call limit
    "BS006": 409,  # not allowed in the action's state
    "22003": 422,  # numeric_value_out_of_range: a total would overflow NUMERIC(30,6)
    "22": 400,  # any other data exception (a body PostgreSQL cannot read as jsonb)
    "08": 503,  # connection exceptions
    "53300": 503,  # too_many_connections
    "57P01": 503,  # admin_shutdown
    "57P02": 503,  # crash_shutdown
    "57P03": 503,  # cannot_connect_now
    "40001": 503,  # serialization_failure: retry
    "40P01": 503,  # deadlock_detected: retry
    "3F000": 503,  # invalid_schema_name: not migrated
    "42883": 503,  # undefined_function: not migrated (or an older schema)
    "42P01": 503,  # undefined_table: not migrated
}
CODE_BY_STATUS = {400: "BS001", 403: "forbidden", 404: "not_found", 503: "unavailable"}
CONTRACT_CODES = {"22003"}  # SQLSTATEs outside class BS that the contract names as codes


def database_error(exc: psycopg.Error | PoolTimeout) -> ApiError:
    """The one translation of a database failure into the contract's status and error body."""
    state = getattr(exc, "sqlstate", None) or ""
    if isinstance(exc, PoolTimeout) or (isinstance(exc, psycopg.OperationalError) and not state):
        return unavailable("the database cannot be reached")
    diag = exc.diag
    if state == "22003" and not diag.context:
        # Raised outside every function: the body's cast to jsonb met a number PostgreSQL cannot
        # hold. Bad input, not a total that would overflow.
        state = "22"
    status = STATUS_BY_SQLSTATE.get(state) or STATUS_BY_SQLSTATE.get(state[:2]) or 500
    if state.startswith("BS") or state in CONTRACT_CODES:
        code = state
    else:
        code = CODE_BY_STATUS.get(status, "internal")
    message = diag.message_primary or str(exc).strip() or type(exc).__name__
    hint = diag.message_hint
    if state in ("3F000", "42883", "42P01"):
        hint = MIGRATE_HINT
    elif state == "42501":  # the HTTP layer allowed what PostgreSQL refused: a setup problem
        hint = ROLE_HINT
    if status == 500:
        log.error("database error %s: %s", state, message)
        message = f"database error {state}: {message}"
    headers = {"Retry-After": RETRY_AFTER_S} if status == 503 else None
    return ApiError(status, code, message, diag.message_detail, hint, headers)


# --------------------------------------------------------------------------- request inputs

_UUID = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")

Param = Callable[[Request], dict[str, Any]]


def path_uuid(name: str) -> Param:
    def read(request: Request) -> dict[str, Any]:
        value = request.path_params[name]
        if not _UUID.fullmatch(value):
            raise bad_input(f"{name} must be a uuid", f"{name}: {value}")
        return {name: uuid.UUID(value)}

    return read


def integer(name: str, text: str, maximum: int = INT4_MAX) -> int:
    """``text`` as an integer of at most ``maximum`` in absolute value, else BS001."""
    if not re.fullmatch(r"-?[0-9]{1,19}", text) or abs(int(text)) > maximum:
        raise bad_input(f"{name} must be an integer", f"{name}: {text}")
    return int(text)


def query_int(name: str, default: int, maximum: int = INT4_MAX) -> Param:
    def read(request: Request) -> dict[str, Any]:
        text = request.query_params.get(name)
        return {name: default if text is None else integer(name, text, maximum)}

    read.query = name  # type: ignore[attr-defined]
    return read


def query_time(name: str) -> Param:
    """An optional ISO 8601 timestamp with a zone offset; also ``{name}_text``, in UTC with a Z."""

    def read(request: Request) -> dict[str, Any]:
        text = request.query_params.get(name)
        if text is None:
            return {name: None, f"{name}_text": None}
        try:
            value = datetime.fromisoformat(text)
        except ValueError:
            raise bad_input(f"{name} must be an ISO 8601 timestamp", f"{name}: {text}") from None
        if value.tzinfo is None:
            raise bad_input(f"{name} must have a zone offset (Z or +hh:mm)", f"{name}: {text}")
        try:
            iso = value.astimezone(UTC).isoformat().replace("+00:00", "Z")
        except OverflowError:  # before year 1 or after 9999 once in UTC
            raise bad_input(f"{name} is out of range", f"{name}: {text}") from None
        return {name: value, f"{name}_text": iso}

    read.query = name  # type: ignore[attr-defined]
    return read


def check_query(request: Request, names: set[str]) -> None:
    """BS001 for a query parameter the endpoint does not take (a typo such as ``as_off`` would
    otherwise be ignored, and the default answered as if it were what was asked), and for one
    given twice (only one of the two values could be answered)."""
    if not request.scope["query_string"]:  # nothing to check; parsing "" cost each request 6 µs
        return
    unknown = sorted(set(request.query_params) - names - {"access_token"})
    if unknown:
        allowed = ", ".join(sorted(names)) or "none"
        raise bad_input(f"unknown query parameter {unknown[0]!r}", f"it takes: {allowed}")
    repeated = sorted(
        k for k in set(request.query_params) if len(request.query_params.getlist(k)) > 1
    )
    if repeated:
        raise bad_input(f"query parameter {repeated[0]!r} is given more than once")


def header(name: str, key: str) -> Param:
    def read(request: Request) -> dict[str, Any]:
        return {key: request.headers.get(name)}

    return read


# --------------------------------------------------------------------------- the route table

NO_BODY, BODY, OPTIONAL_BODY = "none", "required", "optional"

# to_char for a timestamptz as the functions format one (bulk_sync._iso is not granted).
ISO = (
    "CASE WHEN date_trunc('second', {0}) = {0}"
    " THEN to_char({0} AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"')"
    " ELSE to_char({0} AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"') END"
)


@dataclass(frozen=True)
class Api:
    """One endpoint: a method and path, the level it needs, and the one statement it runs.

    The statement returns one text column (the JSON body). ``missing`` is the 404 message
    when it returns no row (or an empty array). ``fields`` are the keys of a body that maps to
    text arguments: each becomes the parameter of its name (NULL when absent), and any other key
    is BS001, so that a typo never silently becomes a default.
    """

    method: str
    path: str
    needs: int
    sql: str
    body: str = NO_BODY
    params: tuple[Param, ...] = ()
    missing: str | None = None
    coalesce: bool = False  # the statement is LOG_SQL; concurrent calls may share a log_actions
    fields: tuple[str, ...] = ()


LOG_SQL = "SELECT bulk_sync.log_action(%(body)s::jsonb)::text"


ROUTES: tuple[Api, ...] = (
    Api(
        "POST",
        "/api/actions/log",
        WRITER,
        LOG_SQL,
        BODY,
        coalesce=True,
    ),
    Api(
        "POST",
        "/api/actions/bulk_backfill",
        WRITER,
        # The Idempotency-Key header is used when the body has no idempotency_key (or null).
        "SELECT bulk_sync.bulk_backfill(CASE WHEN %(key)s::text IS NULL"
        " OR b ->> 'idempotency_key' IS NOT NULL"
        " THEN b ELSE b || jsonb_build_object('idempotency_key', %(key)s::text) END)::text"
        " FROM (SELECT %(body)s::jsonb AS b) AS r",
        BODY,
        (header("Idempotency-Key", "key"),),
    ),
    Api(
        "POST",
        "/api/actions/reconcile",
        ADMIN,
        "SELECT bulk_sync.reconcile(%(body)s::jsonb)::text",
        OPTIONAL_BODY,
    ),
    Api(
        "POST",
        "/api/actions/{action_id}/verify",
        WRITER,
        "SELECT bulk_sync.verify_action(%(action_id)s, %(performed_by)s)::text",
        OPTIONAL_BODY,
        (path_uuid("action_id"),),
        fields=("performed_by",),
    ),
    Api(
        "POST",
        "/api/actions/{action_id}/revoke",
        WRITER,
        "SELECT bulk_sync.revoke_action(%(action_id)s, %(reason)s, %(performed_by)s)::text",
        OPTIONAL_BODY,
        (path_uuid("action_id"),),
        fields=("reason", "performed_by"),
    ),
    Api(
        "GET",
        "/api/totals",
        READER,
        "SELECT jsonb_build_object('global_total_lbs', bulk_sync.global_total(%(as_of)s)::text,"
        " 'as_of', %(as_of_text)s::text)::text",
        params=(query_time("as_of"),),
    ),
    Api(
        "GET",
        "/api/users/{user_id}",
        READER,
        # With as_of, total_lbs is the total as of then; rank, action_count and
        # last_action_at are the user's current ones.
        "SELECT jsonb_build_object('user_id', r.user_id,"
        " 'total_lbs', (CASE WHEN %(as_of)s::timestamptz IS NULL THEN r.total_lbs"
        " ELSE bulk_sync.user_total(r.user_id, %(as_of)s) END)::text,"
        " 'action_count', r.action_count, 'rank', r.rank,"
        f" 'last_action_at', {ISO.format('r.last_action_at')})::text"
        " FROM bulk_sync.user_rank(%(user_id)s) AS r",
        params=(path_uuid("user_id"), query_time("as_of")),
        missing="unknown user: no counted action",
    ),
    Api(
        "GET",
        "/api/leaderboard",
        READER,
        "SELECT bulk_sync.leaderboard_json(%(limit)s, %(offset)s)::text",
        params=(query_int("limit", 10), query_int("offset", 0)),
    ),
    Api(
        "GET",
        "/api/leaderboard/around/{user_id}",
        READER,
        "SELECT jsonb_agg(jsonb_build_object('rank', a.rank, 'user_id', a.user_id,"
        " 'total_lbs', a.total_lbs::text) ORDER BY a.rank)::text"
        " FROM bulk_sync.leaderboard_around(%(user_id)s, %(radius)s) AS a",
        params=(path_uuid("user_id"), query_int("radius", 2)),
        missing="unknown user: no counted action",
    ),
    Api(
        "GET",
        "/api/events",
        READER,
        "SELECT jsonb_build_object("
        " 'events', coalesce(jsonb_agg(e.payload || jsonb_build_object('event_id', e.event_id)"
        " ORDER BY e.event_id), '[]'),"
        " 'last_event_id', coalesce(max(e.event_id), %(after)s))::text"
        " FROM bulk_sync.events_since(%(after)s, %(limit)s) AS e",
        params=(query_int("after", 0, INT8_MAX), query_int("limit", EVENT_PAGE)),
    ),
    Api("GET", "/api/status", READER, "SELECT bulk_sync.status()::text"),
)

EVENTS_PAGE_SQL = "SELECT event_id, payload::text FROM bulk_sync.events_since(%(after)s, %(limit)s)"
HEALTH_SQL = "SELECT to_regprocedure('bulk_sync.status()') IS NOT NULL"


# --------------------------------------------------------------------------- tokens


def presented_token(request: Request) -> str | None:
    """The bearer token of the request: a Bearer Authorization header, or on a GET the
    ``access_token`` query parameter (RFC 6750 §2.3). Credentials of another scheme (the Basic
    ones a reverse proxy asks browsers for, and which they then send everywhere) are no token."""
    scheme, _, token = request.headers.get("authorization", "").strip().partition(" ")
    if scheme.lower() == "bearer":
        if not token.strip():
            raise ApiError(
                401,
                "unauthorized",
                "the Authorization header must be 'Bearer <token>'",
                headers={"WWW-Authenticate": 'Bearer error="invalid_request"'},
            )
        return token.strip()
    if request.method in ("GET", "HEAD"):
        return request.query_params.get("access_token")
    return None


def token_level(settings: Settings, token: str) -> int:
    """The highest level whose token equals ``token`` (constant-time compares), else 0."""
    given = token.encode()
    level = 0
    for candidate, value in (
        (READER, settings.reader_token),
        (WRITER, settings.writer_token),
        (ADMIN, settings.admin_token),
    ):
        if value is not None and hmac.compare_digest(given, value.encode()):
            level = candidate
    return level


def authorize(settings: Settings, request: Request, needs: int) -> int:
    """The level whose role the request runs under, or 401/403."""
    token = presented_token(request)
    level = token_level(settings, token) if token else 0
    is_open = not settings.any_token or (needs == READER and not settings.reader_token)
    if not is_open:
        challenge = {"WWW-Authenticate": "Bearer"}
        if token is None:
            raise ApiError(
                401,
                "unauthorized",
                "a bearer token is required ('Authorization: Bearer <token>')",
                headers=challenge,
            )
        if level == 0:
            raise ApiError(401, "unauthorized", "unknown token", headers=challenge)
        if level < needs:
            raise ApiError(
                403, "forbidden", f"this token may not use {request.method} {request.url.path}"
            )
    return ADMIN if level == ADMIN else needs


# --------------------------------------------------------------------------- request bodies


def check_content_type(request: Request) -> None:
    ctype = request.headers.get("content-type")
    if ctype is None:
        if request.headers.get("content-length", "0") in ("0", "") and (
            "chunked" not in request.headers.get("transfer-encoding", "")
        ):
            return  # no body at all
        raise ApiError(415, "unsupported_media_type", "the body must be application/json")
    media, *params = (part.strip().lower() for part in ctype.split(";"))
    charset = next(
        (p.split("=", 1)[1].strip('" ') for p in params if p.startswith("charset=")), None
    )
    if media != "application/json" or charset not in (None, "utf-8", "utf8"):
        raise ApiError(
            415,
            "unsupported_media_type",
            "the body must be application/json (UTF-8)",
            f"Content-Type: {ctype}",
        )
    encoding = request.headers.get("content-encoding", "identity").strip().lower()
    if encoding != "identity":
        raise ApiError(
            415,
            "unsupported_media_type",
            "the body must be sent as it is, not compressed",
            f"Content-Encoding: {encoding}",
        )


async def read_body(request: Request, limit: int) -> bytes:
    too_large = ApiError(
        413, "too_large", f"the body is over the limit of {limit} bytes", hint="Send less."
    )
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise too_large
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_large
        chunks.append(chunk)
    return b"".join(chunks)


JSON_KIND = {dict: "object", list: "array", str: "string", bool: "boolean", JsonNumber: "number"}


def json_object(body: bytes, optional: bool) -> tuple[str, dict[str, Any]]:
    """The body as the text that goes to SQL, once it is known to be one JSON object, and that
    object (its numbers as text)."""
    if not body.strip() and optional:
        return "{}", {}
    try:
        text = body.decode("utf-8")
        value = loads_unconverted(text)  # PostgreSQL reads the numbers
    except RecursionError:
        raise bad_input("the body is nested too deeply to read") from None
    except (UnicodeDecodeError, ValueError) as exc:
        raise bad_input("the body is not valid JSON", str(exc)[:200]) from None
    if not isinstance(value, dict):
        kind = JSON_KIND.get(type(value), "null")
        raise bad_input("the body must be a JSON object", f"got a JSON {kind}")
    return text, value


def text_fields(value: dict[str, Any], names: tuple[str, ...]) -> dict[str, str | None]:
    """The body's keys ``names`` as text arguments (None when absent or null)."""
    unknown = sorted(set(value) - set(names))
    if unknown:
        raise bad_input(
            f"unknown key {unknown[0]!r}", f"the body may have {', '.join(names)}; got {unknown}"
        )
    wrong = [name for name in names if not isinstance(value.get(name), str | None)]
    if wrong:
        kind = JSON_KIND[type(value[wrong[0]])]
        raise bad_input(f"{wrong[0]} must be a string", f"{wrong[0]}: a JSON {kind}")
    for name in names:
        if not _storable(value.get(name)):
            raise bad_input(
                f"{name} must be text PostgreSQL can store", f"{name}: a NUL or a lone surrogate"
            )
    return {name: value.get(name) for name in names}


def _storable(text: str | None) -> bool:
    """Whether ``text`` can be a PostgreSQL text value: no NUL, and UTF-8 (no lone surrogate,
    which a JSON escape such as \\ud800 can give)."""
    if text is None:
        return True
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return "\x00" not in text


# --------------------------------------------------------------------------- database calls


async def closed_by_server(conn: psycopg.AsyncConnection[Any]) -> None:
    """The pool's check of a connection before a request gets it: one the server closed while it
    sat idle (a restart, a killed backend) is replaced rather than answered with 503. An idle
    connection has nothing to read, so anything readable (the server's last message, or the end
    of the stream) means it is gone: a poll of the socket, not a round trip, which on the log
    path would cost every batch one."""
    if conn.closed or _readable(conn.fileno()):
        await conn.close()  # so that the pool drops it, and does not hand it out again
        raise psycopg.OperationalError("the server closed this connection")


def _readable(fd: int) -> bool:
    """Whether ``fd`` has something to read, now. poll, where there is one: select refuses a
    descriptor above FD_SETSIZE (1024), which a server with many clients reaches."""
    if not hasattr(select, "poll"):
        return bool(select.select([fd], [], [], 0)[0])
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    return bool(poller.poll(0))


async def run_json(
    pool: AsyncConnectionPool, level: int, sql: str, params: Mapping[str, Any]
) -> Any:
    """``SET LOCAL ROLE`` and the statement in one round trip: the statement's first column."""
    rows = await _run(pool, level, sql, params)
    return rows[0][0] if rows else None


async def events_page(pool: AsyncConnectionPool, level: int, after: int) -> list[tuple[int, str]]:
    rows = await _run(pool, level, EVENTS_PAGE_SQL, {"after": after, "limit": EVENT_PAGE})
    return [(int(event_id), payload) for event_id, payload in rows]


async def _run(
    pool: AsyncConnectionPool, level: int, sql: str, params: Mapping[str, Any]
) -> list[tuple[Any, ...]]:
    try:
        return await _execute(pool, level, sql, params)
    except (psycopg.Error, PoolTimeout) as exc:
        raise database_error(exc) from exc


async def _execute(
    pool: AsyncConnectionPool, level: int, sql: str, params: Mapping[str, Any]
) -> list[tuple[Any, ...]]:
    """Both statements go as one simple query, which PostgreSQL runs as one transaction (so
    SET LOCAL holds for the call and ends with it). The client-side cursor binds the values
    as quoted literals; the body stays the text the client sent."""
    async with pool.connection() as conn:
        cursor = AsyncClientCursor(conn)
        await cursor.execute(f"{SET_ROLE[level]}; {sql}", params)
        cursor.nextset()
        return await cursor.fetchall()


# --------------------------------------------------------------------------- coalescing

# One row per action, in request order: whether log_actions answered it with an error, and its
# result as jsonb text (log_action's response, byte for byte, when it is not an error).
BATCH_SQL = (
    "SELECT e.r ? 'error', e.r::text"
    " FROM jsonb_array_elements(bulk_sync.log_actions(%(body)s::jsonb) -> 'results')"
    " WITH ORDINALITY AS e(r, n) ORDER BY e.n"
)
RETRY_BATCH = frozenset({"40001", "40P01"})  # rolled back for certain, and worth another try


@dataclass
class _Waiter:
    level: int
    body: str
    # The response text, or None: answer through the unbatched path (``Coalescer.log``).
    future: asyncio.Future[str | None]

    @property
    def size(self) -> int:
        """What its body adds to a batch's text: the body and a separator."""
        return len(self.body) + 2


class Coalescer:
    """Gathers concurrent ``POST /api/actions/log`` bodies into ``log_actions`` calls.

    A request that arrives while a batch is in flight waits; when the batch returns, everything
    waiting (up to ``max_actions`` requests and ``max_bytes`` of text) goes out at once. A batch
    that fills up goes out at once too, beside those in flight (at most ``max_full`` of them), so
    that under more concurrent requests than one batch holds, PostgreSQL works on one batch
    while this process reads and answers the requests of another. Nothing ever waits on a
    timer: an idle server sends a lone request straight away, through the unbatched path.

    Each request is answered only after its batch committed, and always with what the unbatched
    path answers:

    - a success is ``log_actions``' result for it, which is ``log_action``'s response;
    - an action that failed inside the batch changed nothing, so it is sent again alone through
      the unbatched path, and the client gets that path's status and error body (hint included);
    - a batch that failed as a whole: rolled back by a deadlock or a serialization failure, it is
      retried (``BATCH_ATTEMPTS``); with its outcome unknown (the connection was lost, the pool
      was exhausted, the server is shutting down) or out of retries, every request gets the 503
      that error means; any other failure (one body PostgreSQL cannot read as jsonb, an older
      schema) sends each request alone through the unbatched path.
    """

    def __init__(
        self,
        pool: AsyncConnectionPool,
        max_actions: int,
        max_bytes: int = BATCH_MAX_BYTES,
        max_full: int = 1,
    ) -> None:
        self.pool = pool
        self.max_actions = max_actions
        self.max_bytes = max_bytes
        self.max_full = max_full
        self.waiting: collections.deque[_Waiter] = collections.deque()
        self.waiting_bytes = 0
        self.task: asyncio.Task[None] | None = None
        self.full: set[asyncio.Task[None]] = set()

    async def log(self, level: int, body: str) -> str:
        """The response text for one log request, or its ``ApiError``."""
        waiter = _Waiter(level, body, asyncio.get_running_loop().create_future())
        self.waiting.append(waiter)
        self.waiting_bytes += waiter.size
        if self.task is None:
            self.task = asyncio.create_task(self._drain())
        elif self._filled() and len(self.full) < self.max_full:
            task = asyncio.create_task(self._send_full())
            self.full.add(task)
            task.add_done_callback(self.full.discard)
        text = await waiter.future
        if text is None:
            text = await run_json(self.pool, level, LOG_SQL, {"body": body})
        return text

    async def _drain(self) -> None:
        try:
            while self.waiting:
                await self._flush(self._take())
        except BaseException:  # cancelled: the server is stopping
            for waiter in self.waiting:
                waiter.future.cancel()
            raise
        finally:
            self.task = None

    def _filled(self) -> bool:
        return len(self.waiting) >= self.max_actions or self.waiting_bytes >= self.max_bytes

    async def _send_full(self) -> None:
        while self._filled():
            await self._flush(self._take())

    async def _flush(self, batch: list[_Waiter]) -> None:
        try:
            await self._send(batch)
        except Exception as exc:  # a bug: the requests get the internal error
            log.exception("log batch failed", exc_info=exc)
            for waiter in batch:
                if not waiter.future.done():
                    waiter.future.set_exception(exc)
        except BaseException:  # cancelled: the server is stopping
            for waiter in batch:
                waiter.future.cancel()
            raise

    def _take(self) -> list[_Waiter]:
        batch: list[_Waiter] = []
        size = 0
        while self.waiting and len(batch) < self.max_actions:
            waiter = self.waiting[0]
            if batch and size + len(waiter.body) > self.max_bytes:
                break
            if batch and waiter.level != batch[0].level:  # a batch runs under one role
                break
            self.waiting.popleft()
            self.waiting_bytes -= waiter.size
            if waiter.future.done():  # its client went away before it was sent: drop it
                continue
            batch.append(waiter)
            size += waiter.size
        return batch

    async def _send(self, batch: list[_Waiter]) -> None:
        if not batch:
            return
        if len(batch) == 1:
            waiter = batch[0]
            try:
                text = await run_json(self.pool, waiter.level, LOG_SQL, {"body": waiter.body})
            except ApiError as exc:
                _settle(waiter, exc)
            else:
                _settle(waiter, text)
            return
        body = '{"actions": [' + ", ".join(w.body for w in batch) + "]}"
        for attempt in range(1, BATCH_ATTEMPTS + 1):
            try:
                rows = await _execute(self.pool, batch[0].level, BATCH_SQL, {"body": body})
                break
            except (psycopg.Error, PoolTimeout) as exc:
                error = database_error(exc)
                state = getattr(exc, "sqlstate", None) or ""
                if state in RETRY_BATCH and attempt < BATCH_ATTEMPTS:
                    continue
                if error.status == 503 and state not in ("3F000", "42883", "42P01"):
                    for waiter in batch:
                        _settle(waiter, _copy(error))
                else:
                    log.warning(
                        "log batch: %s; sending its %d requests alone", error.message, len(batch)
                    )
                    for waiter in batch:
                        _settle(waiter, None)
                return
        if len(rows) != len(batch):  # committed, so it cannot be sent again
            error = ApiError(
                500, "internal", f"log_actions gave {len(rows)} results for {len(batch)} actions"
            )
            for waiter in batch:
                _settle(waiter, _copy(error))
            return
        for waiter, (failed, text) in zip(batch, rows, strict=True):
            _settle(waiter, None if failed else text)


def _settle(waiter: _Waiter, outcome: str | ApiError | None) -> None:
    if waiter.future.done():  # the client went away; the action stands all the same
        return
    if isinstance(outcome, ApiError):
        waiter.future.set_exception(outcome)
    else:
        waiter.future.set_result(outcome)


def _copy(error: ApiError) -> ApiError:
    return ApiError(
        error.status, error.code, error.message, error.detail, error.hint, error.headers
    )


# --------------------------------------------------------------------------- endpoints


def json_response(text: str, status: int = 200) -> Response:
    return Response(text, status, media_type="application/json")


def endpoint(api: Api) -> Callable[[Request], Any]:
    async def handle(request: Request) -> Response:
        state = request.app.state
        level = authorize(state.settings, request, api.needs)
        check_query(request, {getattr(read, "query", "") for read in api.params} - {""})
        params: dict[str, Any] = {}
        for read in api.params:
            params.update(read(request))
        if api.body != NO_BODY:
            check_content_type(request)
            body = await read_body(request, state.settings.max_body_bytes)
            params["body"], value = json_object(body, optional=api.body == OPTIONAL_BODY)
            if api.fields:
                params.update(text_fields(value, api.fields))
        if api.coalesce and state.coalescer is not None:
            text = await state.coalescer.log(level, params["body"])
        else:
            text = await run_json(state.pool, level, api.sql, params)
        if text is None:
            if api.missing is None:
                raise ApiError(500, "internal", "the function returned nothing")
            ids = ", ".join(f"{k}: {v}" for k, v in params.items() if k.endswith("_id"))
            raise ApiError(404, "BS004", api.missing, ids or None)
        return json_response(text)

    handle.__name__ = f"{api.method.lower()}_{api.path}"
    return handle


async def health(request: Request) -> Response:
    state = request.app.state
    try:
        migrated = await _migrated(state.pool)
    except ApiError as exc:
        return exc.response()
    if not migrated:
        return unavailable("the bulk_sync schema is not installed", MIGRATE_HINT).response()
    if not state.hub.ready:
        return unavailable("the event stream is not following yet").response()
    return json_response('{"ok": true}')


async def _migrated(pool: AsyncConnectionPool) -> bool:
    try:
        async with pool.connection() as conn:
            cursor = await conn.execute(HEALTH_SQL)
            row = await cursor.fetchone()
    except (psycopg.Error, PoolTimeout) as exc:
        raise database_error(exc) from exc
    return bool(row and row[0])


def sse_frame(event_id: int, data: str) -> str:
    return f"id: {event_id}\ndata: {data}\n\n"


async def stream(request: Request) -> Response:
    """Server-Sent Events: everything after ``after`` (or Last-Event-ID), then live."""
    state = request.app.state
    level = authorize(state.settings, request, READER)
    check_query(request, {"after"})
    resume = (request.headers.get("last-event-id") or "").strip()
    if resume:
        after = integer("Last-Event-ID", resume, INT8_MAX)
    else:
        after = query_int("after", 0, INT8_MAX)(request)["after"]
    if after < 0:
        raise bad_input("after must be 0 or a previous event_id", f"after: {after}")
    hub: EventHub = state.hub
    if not hub.ready:
        raise unavailable("the event stream is not following yet")
    queue = hub.subscribe()
    try:
        first = await events_page(state.pool, level, after)
    except BaseException:
        hub.unsubscribe(queue)
        raise

    async def frames() -> AsyncIterator[str]:
        last = after
        page = first
        try:
            yield "retry: 1000\n\n"
            while True:  # catch up from the database, then hand over to the hub
                for event_id, payload in page:
                    yield sse_frame(event_id, payload)
                    last = event_id
                if len(page) < EVENT_PAGE:
                    break
                page = await events_page(state.pool, level, last)
            while True:
                try:
                    rows = await asyncio.wait_for(queue.get(), HEARTBEAT_S)
                except TimeoutError:
                    yield ": keep-alive\n\n"
                    continue
                if rows is None:  # too far behind, or shutting down: the client resumes
                    return
                for event_id, payload in rows:
                    if event_id > last:
                        yield sse_frame(event_id, payload)
                        last = event_id
        except ApiError as exc:  # the database went away mid-stream: end it, the client resumes
            log.warning("event stream ended after event %s: %s", last, exc.message)
        finally:
            hub.unsubscribe(queue)

    return StreamingResponse(
        frames(),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


def static_file(name: str) -> bytes:
    return (resources.files("bulk_sync") / "static" / name).read_bytes()


async def page(request: Request) -> Response:
    authorize(request.app.state.settings, request, READER)
    return Response(
        request.app.state.page,
        media_type="text/html",
        headers={"Referrer-Policy": "no-referrer", "Cache-Control": "no-store"},
    )


async def openapi(request: Request) -> Response:
    return Response(request.app.state.openapi, media_type="application/json")


# --------------------------------------------------------------------------- live events


@dataclass
class EventHub:
    """One ``events.follow`` per server process, in a thread, fanned out to stream clients.

    It starts from the newest event (clients catch up from the database themselves) and, being
    the shared follower, resumes after the last event it handed on across reconnects. A client
    that subscribes before it reads from the database therefore misses nothing in between.
    """

    database_url: str
    loop: asyncio.AbstractEventLoop
    ready: bool = False
    last: int | None = None
    subscribers: set[asyncio.Queue[list[events.Row] | None]] = field(default_factory=set)
    stopper: events.Stopper = field(default_factory=events.Stopper)
    thread: threading.Thread | None = None

    def start(self) -> None:
        self.thread = threading.Thread(target=self._run, name="bulk-sync events", daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.stopper.stopped = True
        if self.thread is not None:
            self.thread.join(timeout=10)
        for queue in list(self.subscribers):
            queue.put_nowait(None)

    def subscribe(self) -> asyncio.Queue[list[events.Row] | None]:
        queue: asyncio.Queue[list[events.Row] | None] = asyncio.Queue()
        self.subscribers.add(queue)
        return queue

    def unsubscribe(self, queue: asyncio.Queue[list[events.Row] | None]) -> None:
        self.subscribers.discard(queue)

    # -- the follower thread

    def _run(self) -> None:
        attempt = 0
        while not self.stopper.stopped:
            try:
                if self.last is None:
                    self.last = self._newest_event()
                    self.loop.call_soon_threadsafe(setattr, self, "ready", True)
                events.follow(
                    self.database_url,
                    self.last,
                    self._emit,
                    stopper=self.stopper,
                    notice=lambda message: log.warning("event follower: %s", message),
                    poll_every_s=HUB_POLL_S,
                    role=ROLE[READER],
                    retry_first=True,
                    payload_text=True,  # streamed as PostgreSQL writes it, like the catch-up pages
                )
            except RuntimeError:  # the event loop is closed: the server is stopping
                return
            except Exception as exc:
                delay = events._backoff(attempt)
                log.warning("event follower: %s; retrying in %gs", _one_line(exc), delay)
                self.stopper.sleep(delay)
                attempt += 1

    def _newest_event(self) -> int:
        with connect(self.database_url, application_name=f"{APP_NAME} serve") as conn:
            conn.execute(f"SET ROLE {ROLE[READER]}")
            row = conn.execute("SELECT coalesce(max(event_id), 0) FROM bulk_sync.events").fetchone()
        return int(row[0])

    def _emit(self, rows: list[events.Row]) -> None:
        self.last = rows[-1][0]
        self.loop.call_soon_threadsafe(self._dispatch, rows)

    def _dispatch(self, rows: list[events.Row]) -> None:
        for queue in list(self.subscribers):
            if queue.qsize() >= MAX_PENDING_PAGES:
                self.subscribers.discard(queue)
                queue.put_nowait(None)
            else:
                queue.put_nowait(rows)


def _one_line(exc: BaseException) -> str:
    return re.sub(r"\s*\n\s*", "; ", str(exc).strip()) or type(exc).__name__


# --------------------------------------------------------------------------- the app


async def http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    if exc.status_code == 404:
        error = ApiError(404, "not_found", f"no such path: {request.url.path}")
    elif exc.status_code == 405:
        error = ApiError(
            405,
            "method_not_allowed",
            f"{request.method} is not allowed on {request.url.path}",
            headers=exc.headers,
        )
    else:
        error = ApiError(exc.status_code, "http_error", str(exc.detail))
    return error.response()


async def api_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ApiError)
    return exc.response()


async def internal_error(request: Request, exc: Exception) -> Response:
    log.exception("internal error on %s %s", request.method, request.url.path, exc_info=exc)
    return ApiError(500, "internal", "internal error").response()


def create_app(settings: Settings | None = None) -> Starlette:
    """The ASGI application (``uvicorn --factory bulk_sync.serve:create_app``)."""
    settings = settings or Settings.from_env()
    if not settings.database_url:
        raise RuntimeError("DATABASE_URL is not set")

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        pool = AsyncConnectionPool(
            settings.database_url,
            min_size=min(2, settings.pool_size),
            max_size=settings.pool_size,
            kwargs={
                "autocommit": True,
                "application_name": f"{APP_NAME} serve",
                "client_encoding": CLIENT_ENCODING,
            },
            timeout=POOL_TIMEOUT_S,
            check=closed_by_server,
            open=False,
        )
        await pool.open(wait=False)
        hub = EventHub(settings.database_url, asyncio.get_running_loop())
        hub.start()
        app.state.pool, app.state.hub = pool, hub
        coalesce = settings.batch_max > 1
        # Full batches in flight at once: half the pool, leaving the rest to other requests.
        app.state.coalescer = (
            Coalescer(pool, settings.batch_max, max_full=max(1, settings.pool_size // 2))
            if coalesce
            else None
        )
        try:
            yield
        finally:
            await asyncio.to_thread(hub.stop)
            await pool.close()

    routes = [Route(api.path, endpoint(api), methods=[api.method]) for api in ROUTES]
    routes += [
        Route("/api/events/stream", stream, methods=["GET"]),
        Route("/healthz", health, methods=["GET"]),
        Route("/openapi.json", openapi, methods=["GET"]),
        Route("/", page, methods=["GET"]),
    ]
    app = Starlette(
        routes=routes,
        lifespan=lifespan,
        exception_handlers={
            HTTPException: http_error,
            ApiError: api_error,
            Exception: internal_error,
        },
    )
    app.router.redirect_slashes = False  # /api/totals/ is an unknown path, not a redirect
    app.state.settings = settings
    app.state.page = static_file("index.html")
    app.state.openapi = static_file("openapi.json")
    return app


# --------------------------------------------------------------------------- uvicorn

# The access line AccessLine writes itself; with any other format uvicorn's formatter does.
ACCESS_FORMAT = LOGGING_CONFIG["formatters"]["access"]["fmt"]


class RedactTokens(logging.Filter):
    """Replaces the value of any ``access_token`` query parameter in uvicorn's access log."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if isinstance(args, tuple) and len(args) >= 3 and "?" in str(args[2]):
            record.args = (*args[:2], redact(str(args[2])), *args[3:])
        return True


class AccessLine(AccessFormatter):
    """uvicorn's access line, the same text, built in one step when it is not coloured.

    uvicorn's formatter copies each record twice and looks the status phrase up in the
    ``HTTPStatus`` enum: about half of the server CPU the access log cost a request.
    """

    PHRASES: ClassVar[dict[int, str]] = {status.value: status.phrase for status in http.HTTPStatus}

    def __init__(self, fmt: str | None = None, *args: Any, **kwargs: Any) -> None:
        super().__init__(fmt, *args, **kwargs)
        self.own_line = fmt == ACCESS_FORMAT and not self.use_colors

    def formatMessage(self, record: logging.LogRecord) -> str:
        if not self.own_line or not isinstance(record.args, tuple):
            return super().formatMessage(record)
        client_addr, method, full_path, http_version, status_code = record.args
        level = record.levelname
        phrase = self.PHRASES.get(int(status_code), "")
        return (
            f"{level}:{' ' * (8 - len(level))} {client_addr} - "
            f'"{method} {full_path} HTTP/{http_version}" {status_code} {phrase}'
        )


def redact(path: str) -> str:
    """``/x?access_token=secret&a=1`` -> ``/x?access_token=[redacted]&a=1``."""
    base, sep, query = path.partition("?")
    if not sep:
        return path
    parts = []
    for part in query.split("&"):
        key = part.split("=", 1)[0]
        if unquote_plus(key).strip() == "access_token":
            part = f"{key}={quote('[redacted]', safe='[]')}"
        parts.append(part)
    return base + "?" + "&".join(parts)


class GatheredWrites:
    """A transport that sends what one turn of the event loop wrote to it as one write.

    uvicorn writes a response's status line and headers, then its body, and uvloop sends each
    write at once: two ``send()`` calls a response, each waking the client. The coalescer
    answers a whole batch in one turn, so gathering them halves the calls; server CPU per
    logged action fell by about 7 % (docs/PERFORMANCE.md). Anything but writing and closing
    is the transport's own.
    """

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self._transport = transport
        self._loop = loop
        self._pending: list[bytes] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)

    def write(self, data: bytes) -> None:
        if not data:  # as asyncio's transports: nothing to send
            return
        if not self._pending:
            self._loop.call_soon(self._flush)
        self._pending.append(bytes(data))

    def writelines(self, chunks: Iterable[bytes]) -> None:
        for chunk in chunks:
            self.write(chunk)

    def get_write_buffer_size(self) -> int:
        return self._transport.get_write_buffer_size() + sum(map(len, self._pending))

    def write_eof(self) -> None:
        self._flush()
        self._transport.write_eof()

    def close(self) -> None:
        self._flush()
        self._transport.close()

    def abort(self) -> None:
        self._pending.clear()
        self._transport.abort()

    def _flush(self) -> None:
        if not self._pending:
            return
        data = b"".join(self._pending)
        self._pending.clear()
        if not self._transport.is_closing():
            self._transport.write(data)


class HttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol, writing through ``GatheredWrites``."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        gathered = GatheredWrites(cast(asyncio.Transport, transport), self.loop)
        super().connection_made(cast(asyncio.Transport, gathered))


def log_config() -> dict[str, Any]:
    config = copy.deepcopy(LOGGING_CONFIG)
    config["filters"] = {"redact_tokens": {"()": "bulk_sync.serve.RedactTokens"}}
    config["formatters"]["access"]["()"] = "bulk_sync.serve.AccessLine"
    config["handlers"]["access"]["filters"] = ["redact_tokens"]
    config["loggers"]["bulk_sync"] = {"handlers": ["default"], "level": "INFO", "propagate": False}
    config["loggers"]["psycopg"] = {"handlers": ["default"], "level": "WARNING", "propagate": False}
    return config


def run(
    database_url: str, host: str, port: int, workers: int, pool_size: int, access_log: bool = True
) -> None:  # pragma: no cover - exercised through the CLI in tests
    """Serve until SIGINT/SIGTERM. The workers read their settings from the environment."""
    import uvicorn

    os.environ["DATABASE_URL"] = database_url
    os.environ["BULK_SYNC_POOL_SIZE"] = str(pool_size)
    uvicorn.run(
        "bulk_sync.serve:create_app",
        factory=True,
        host=host,
        port=port,
        workers=workers,
        log_config=log_config(),
        http=HttpProtocol,
        server_header=False,
        access_log=access_log,
        timeout_graceful_shutdown=3,
    )
