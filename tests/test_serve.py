"""The HTTP API (contract §7): ``bulk-sync serve`` started for real, spoken to over a socket.

- the seed's three requests, verbatim with real uuids, give the seed's responses;
- every status of §7, with the contract's error body, and a bad request changes nothing;
- tokens: missing, unknown, underprivileged, the access_token query parameter, open reads, the
  loopback-only rule, and no token in the request log;
- Server-Sent Events: catch-up, an event within 1 s of a POST, resume by Last-Event-ID;
- 503 with Retry-After while the database refuses connections, and recovery without a restart;
- the page in headless Chromium changes after a POST, without a reload.

Every response seen here is checked against the server's own OpenAPI document.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import json
import logging
import os
import queue
import re
import resource
import shutil
import socket
import subprocess
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import port_for
import pytest
from psycopg import sql
from uvicorn.logging import AccessFormatter

from bulk_sync import serve
from helpers import LineReader, cli_command, cli_env, connect, new_id, stop_process, wait_for

TOKENS = {
    "reader": "reader-3c1f0e5a9b7d4e21",
    "writer": "writer-8d2a6b4f1c9e0731",
    "admin": "admin-5e7b9c1d3f2a4860",
}
TOKEN_ENV = {f"BULK_SYNC_{name.upper()}_TOKEN": value for name, value in TOKENS.items()}
SSE_DEADLINE_S = 1.0  # the contract's bound from commit to event
OPENAPI = json.loads(
    (Path(serve.__file__).parent / "static" / "openapi.json").read_text(), parse_float=Decimal
)

# The seed's placeholder ids, made real.
USER1, USER2, USER3 = (str(uuid.uuid4()) for _ in range(3))
A1, A2, A3 = (str(uuid.uuid4()) for _ in range(3))


def seed_log_body() -> str:
    return f"""{{
  "action_id": "{A1}",
  "user_id": "{USER1}",
  "lbs": "10.2",
  "logged_at": "2025-11-05T10:00:00Z",
  "verified": true,
  "metadata": {{}}
}}"""


def seed_backfill_body() -> str:
    return f"""{{
  "actions": [
    {{
      "action_id": "{A1}",
      "user_id": "{USER1}",
      "lbs": "10.2",
      "logged_at": "2025-11-05T10:00:00Z",
      "verified": true
    }},
    {{
      "action_id": "{A2}",
      "user_id": "{USER2}",
      "lbs": "10.3",
      "logged_at": "2025-11-05T10:05:00Z",
      "verified": true
    }},
    {{
      "action_id": "{A3}",
      "user_id": "{USER3}",
      "lbs": "10.4",
      "logged_at": "2025-11-05T10:10:00Z",
      "verified": true
    }}
  ],
  "idempotency_key": "optional-key"
}}"""


SEED_RECONCILE_BODY = """{
  "performed_by": "system",
  "auto_correct": true
}"""


def action_body(
    action_id: str | None = None,
    user_id: str | None = None,
    lbs: str = "1.000000",
    at: str = "2025-11-05T10:00:00Z",
) -> dict[str, Any]:
    return {
        "action_id": action_id or new_id(),
        "user_id": user_id or new_id(),
        "lbs": lbs,
        "logged_at": at,
        "verified": True,
    }


# --------------------------------------------------------------------------- OpenAPI checks


def _template_regex(template: str) -> re.Pattern[str]:
    return re.compile("^" + re.sub(r"\\\{[a-z_]+\\\}", "[^/]+", re.escape(template)) + "$")


PATH_TEMPLATES = [(_template_regex(t), t) for t in OPENAPI["paths"]]


def _resolve(node: dict[str, Any]) -> dict[str, Any]:
    while "$ref" in node:
        target: Any = OPENAPI
        for part in node["$ref"].removeprefix("#/").split("/"):
            target = target[part]
        node = target
    return node


def _validate(instance: Any, schema: dict[str, Any]) -> None:
    # The components ride along so that "#/components/..." references resolve.
    jsonschema.Draft202012Validator(
        {**schema, "components": OPENAPI["components"]},
        format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER,
    ).validate(instance)


def check_openapi(response: httpx.Response) -> None:
    """The response's status, content type and body are the ones the document describes."""
    request = response.request
    template = next((t for rx, t in PATH_TEMPLATES if rx.match(request.url.path)), None)
    operation = OPENAPI["paths"].get(template, {}).get(request.method.lower()) if template else None
    ctype = response.headers.get("content-type", "").split(";")[0]
    if operation is None:  # an unknown path or method: always the error body
        assert response.status_code in (404, 405), (request.method, request.url, response.text)
        documented: dict[str, Any] = _resolve({"$ref": "#/components/responses/NotFound"})
    else:
        assert str(response.status_code) in operation["responses"], (
            f"{request.method} {template} answered an undocumented {response.status_code}: "
            f"{response.text[:300]}"
        )
        documented = _resolve(operation["responses"][str(response.status_code)])
    assert ctype in documented["content"], (ctype, documented)
    if ctype == "application/json":
        body = json.loads(response.content, parse_float=Decimal)
        _validate(body, documented["content"][ctype]["schema"])


class Client:
    """httpx over a real socket; every response is checked against the OpenAPI document."""

    def __init__(self, base_url: str) -> None:
        self.http = httpx.Client(base_url=base_url, timeout=30)

    def request(
        self, method: str, path: str, *, token: str | None = None, **kwargs: Any
    ) -> httpx.Response:
        headers = dict(kwargs.pop("headers", {}))
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        response = self.http.request(method, path, headers=headers, **kwargs)
        check_openapi(response)
        return response

    def get(self, path: str, **kwargs: Any) -> httpx.Response:
        return self.request("GET", path, **kwargs)

    def post(self, path: str, body: Any = None, **kwargs: Any) -> httpx.Response:
        """POST a JSON body: a str is sent verbatim, anything else as JSON."""
        if body is not None:
            text = body if isinstance(body, str) else json.dumps(body)
            kwargs.setdefault("content", text.encode())
            kwargs.setdefault("headers", {}).setdefault("Content-Type", "application/json")
        return self.request("POST", path, **kwargs)

    def close(self) -> None:
        self.http.close()


def json_of(response: httpx.Response) -> Any:
    return json.loads(response.content, parse_float=Decimal)


def assert_error(response: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    error = json_of(response)["error"]
    assert error["code"] == code, response.text
    assert "Traceback" not in response.text
    return error


# --------------------------------------------------------------------------- the server


class Server:
    """``python -m bulk_sync serve`` on 127.0.0.1 and a free port; its log is collected."""

    def __init__(
        self, url: str, env: dict[str, str], host: str = "127.0.0.1", args: tuple[str, ...] = ()
    ) -> None:
        self.port = port_for.get_port(None)
        self.base = f"http://127.0.0.1:{self.port}"
        full_env = {k: v for k, v in cli_env().items() if not k.startswith("BULK_SYNC_")}
        full_env["BULK_SYNC_PG_BIN"] = os.environ.get("BULK_SYNC_PG_BIN", "")
        full_env.update(env)
        self.proc = subprocess.Popen(
            cli_command(
                url, "serve", "--host", host, "--port", str(self.port), "--pool-size", "4", *args
            ),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=full_env,
        )
        self.log = LineReader(self.proc.stdout)
        self.api = Client(self.base)

    def wait_ready(self, timeout: float = 30) -> None:
        def healthy() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(f"serve exited {self.proc.returncode}: {self.output()}")
            try:
                return httpx.get(f"{self.base}/healthz", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        wait_for(healthy, timeout, 0.1, "the server to answer /healthz")

    def output(self) -> str:
        deadline = time.monotonic() + 0.5
        while time.monotonic() < deadline:
            try:
                if self.log.next(0.05) is None:
                    break
            except queue.Empty:
                break
        return "\n".join(self.log.seen)

    def stop(self) -> None:
        self.api.close()
        stop_process(self.proc)
        with contextlib.suppress(Exception):
            self.log.rest(5)


@pytest.fixture
def start_server() -> Iterator[Callable[..., Server]]:
    started: list[Server] = []

    def factory(url: str, env: dict[str, str] | None = None, args: tuple[str, ...] = ()) -> Server:
        server = Server(url, env or {}, args=args)
        started.append(server)
        server.wait_ready()
        return server

    yield factory
    for server in started:
        server.stop()


# --------------------------------------------------------------------------- the seed


def test_seed_log_request_gives_the_seed_response(
    db_url: str, start_server: Callable[..., Server]
) -> None:
    api = start_server(db_url, TOKEN_ENV).api
    response = api.post("/api/actions/log", seed_log_body(), token=TOKENS["writer"])
    assert response.status_code == 200, response.text
    body = json_of(response)
    assert body["success"] is True
    assert (body["action_id"], body["user_id"]) == (A1, USER1)
    assert (
        body["emissions_lbs"] == body["user_total_lbs"] == body["global_total_lbs"] == "10.200000"
    )
    assert body["is_duplicate"] is False
    assert body["message"] == "Emission logged successfully"
    assert body["status"] == "inserted"


def test_seed_backfill_leaderboard_and_reconcile(
    db_url: str, start_server: Callable[..., Server]
) -> None:
    api = start_server(db_url, TOKEN_ENV).api
    response = api.post("/api/actions/bulk_backfill", seed_backfill_body(), token=TOKENS["writer"])
    assert response.status_code == 200, response.text
    body = json_of(response)
    assert body["success"] is True
    assert (body["inserted_count"], body["skipped_count"], body["affected_users"]) == (3, 0, 3)
    assert body["global_total_lbs"] == "30.900000"
    assert body["message"] == "Bulk backfill completed: 3 inserted, 0 skipped"

    board = json_of(api.get("/api/leaderboard", token=TOKENS["reader"]))
    assert board == [
        {"rank": 1, "user_id": USER3, "total_lbs": "10.400000"},
        {"rank": 2, "user_id": USER2, "total_lbs": "10.300000"},
        {"rank": 3, "user_id": USER1, "total_lbs": "10.200000"},
    ]
    user1 = json_of(api.get(f"/api/users/{USER1}", token=TOKENS["reader"]))
    assert (user1["rank"], user1["total_lbs"], user1["action_count"]) == (3, "10.200000", 1)
    around = json_of(api.get(f"/api/leaderboard/around/{USER2}?radius=1", token=TOKENS["reader"]))
    assert [item["rank"] for item in around] == [1, 2, 3]

    with connect(db_url) as conn:
        conn.execute("UPDATE bulk_sync.global_emissions SET total_lbs_saved = 30.5 WHERE id = 1")
    totals = json_of(api.get("/api/totals", token=TOKENS["reader"]))
    assert totals == {"global_total_lbs": "30.500000", "as_of": None}

    response = api.post("/api/actions/reconcile", SEED_RECONCILE_BODY, token=TOKENS["admin"])
    assert response.status_code == 200, response.text
    result = json_of(response)
    assert result["in_sync"] is False
    assert result["user_stats_sum"] == "30.900000"
    assert result["global_total"] == "30.500000"
    assert result["discrepancy"] == "0.400000"
    assert result["fixed"] is True
    uuid.UUID(result["correction_id"])
    assert json_of(api.get("/api/totals", token=TOKENS["reader"]))["global_total_lbs"] == (
        "30.900000"
    )


def test_user_as_of_counts_the_actions_logged_by_then(
    db_url: str, start_server: Callable[..., Server]
) -> None:
    api = start_server(db_url).api
    api.post("/api/actions/bulk_backfill", seed_backfill_body())
    user = new_id()
    api.post("/api/actions/log", action_body(user_id=user, lbs="1.5", at="2025-11-05T10:00:00Z"))
    api.post("/api/actions/log", action_body(user_id=user, lbs="2.5", at="2025-11-05T11:00:00Z"))
    then = json_of(api.get(f"/api/users/{user}?as_of=2025-11-05T10:30:00%2B00:00"))
    assert then["total_lbs"] == "1.500000"
    assert (then["rank"], then["action_count"]) == (4, 2)  # rank and count are current
    now = json_of(api.get(f"/api/users/{user}"))
    assert (now["total_lbs"], now["last_action_at"]) == ("4.000000", "2025-11-05T11:00:00Z")


def test_totals_as_of(db_url: str, start_server: Callable[..., Server]) -> None:
    api = start_server(db_url).api
    api.post("/api/actions/bulk_backfill", seed_backfill_body())
    response = api.get("/api/totals?as_of=2025-11-05T10:05:00Z")
    assert json_of(response) == {
        "global_total_lbs": "20.500000",
        "as_of": "2025-11-05T10:05:00Z",
    }


def test_amounts_are_exact_strings_whatever_the_body_carries(
    db_url: str, start_server: Callable[..., Server]
) -> None:
    api = start_server(db_url).api
    user = new_id()
    # A JSON number goes to SQL as the client wrote it: 0.1 + 0.2 is exactly 0.3 here.
    api.post(
        "/api/actions/log",
        f'{{"action_id": "{new_id()}", "user_id": "{user}", '
        '"lbs": 0.1, "logged_at": "2025-11-05T10:00:00Z", "verified": true}',
    )
    body = json_of(api.post("/api/actions/log", action_body(user_id=user, lbs="0.2")))
    assert body["user_total_lbs"] == "0.300000"
    big = json_of(api.post("/api/actions/log", action_body(lbs="123456789012345678.123456")))
    assert big["global_total_lbs"] == "123456789012345678.423456"


def test_bodies_postgresql_reads_are_not_refused_by_the_server(
    db_url: str, start_server: Callable[..., Server]
) -> None:
    """The server checks that a body is one JSON object without converting its numbers, so a
    number of any size reaches PostgreSQL as written."""
    api = start_server(db_url).api
    digits = "9" * 5000
    action_id = new_id()
    doc = json.dumps(action_body(action_id))
    text = doc[:-1] + f', "metadata": {{"n": {digits}}}}}'
    response = api.post("/api/actions/log", text)
    assert response.status_code == 200, response.text
    with connect(db_url) as conn:
        stored = conn.execute(
            "SELECT metadata ->> 'n' FROM bulk_sync.user_actions WHERE action_id = %s",
            [action_id],
        ).fetchone()
    assert stored == (digits,)
    deep = api.post("/api/actions/log", '{"metadata": ' + "[" * 5000 + "]" * 5000 + "}")
    assert assert_error(deep, 400, "BS001")["message"] == "the body is nested too deeply to read"


def test_text_in_a_database_of_another_encoding_is_stored_or_refused_as_bad_input(
    make_db: Callable[..., str], start_server: Callable[..., Server]
) -> None:
    """A LATIN1 database: metadata LATIN1 holds is stored as sent; a character it cannot hold is
    the client's bad input (400 BS001, naming the encoding), never a 500, and changes nothing."""
    from bulk_sync.migrate import migrate

    url = make_db(template="template0", encoding="LATIN1")
    migrate(url)
    api = start_server(url).api
    kept = new_id()
    accented = api.post(
        "/api/actions/log",
        json.dumps({**action_body(kept), "metadata": {"n": "café"}}, ensure_ascii=False),
    )
    assert accented.status_code == 200, accented.text
    euro = api.post(
        "/api/actions/log",
        json.dumps({**action_body(), "metadata": {"n": "5 €"}}, ensure_ascii=False),
    )
    assert "LATIN1" in assert_error(euro, 400, "BS001")["message"]
    with connect(url) as conn:
        stored = conn.execute(
            "SELECT action_id::text, metadata ->> 'n' FROM bulk_sync.user_actions"
        ).fetchall()
    assert stored == [(kept, "café")]


def test_idempotency_key_header_stands_in_for_a_null_key(
    db_url: str, start_server: Callable[..., Server]
) -> None:
    api = start_server(db_url).api
    request = json.dumps({"actions": [action_body()], "idempotency_key": None})
    headers = {"Idempotency-Key": "header-key"}
    first = json_of(api.post("/api/actions/bulk_backfill", request, headers=headers))
    again = json_of(api.post("/api/actions/bulk_backfill", request, headers=headers))
    assert (first["idempotency_key"], first["replayed"]) == ("header-key", False)
    assert (again["idempotency_key"], again["replayed"]) == ("header-key", True)


def test_event_ids_past_int4_are_read_by_page_and_stream(
    db_url: str, start_server: Callable[..., Server]
) -> None:
    with connect(db_url) as conn:
        conn.execute("SELECT setval('bulk_sync.event_id_seq', 2147483650)")
    server = start_server(db_url)
    api = server.api
    api.post("/api/actions/log", action_body())
    api.post("/api/actions/log", action_body())
    first = 2147483651
    wait_for(
        lambda: json_of(api.get(f"/api/events?after={first}"))["last_event_id"] == first + 1,
        10,
        0.1,
        "the second event past int4",
    )
    stream = SseReader(f"{server.base}/api/events/stream?after={first}")
    try:
        assert stream.next(5)[0] == first + 1
    finally:
        stream.close()


# --------------------------------------------------------------------------- statuses


@pytest.fixture(scope="module")
def shared_db(admin_url: str, template_url: str) -> Iterator[str]:
    name = f"t_serve_{uuid.uuid4().hex[:8]}"
    with connect(admin_url) as admin:
        admin.execute(
            sql.SQL("CREATE DATABASE {} TEMPLATE bulk_sync_template").format(sql.Identifier(name))
        )
    yield template_url.rsplit("/", 1)[0] + "/" + name
    with connect(admin_url) as admin:
        admin.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
        )


MAX_BODY = 2**20
STORED_USER, STORED, REVOKED, KEYED = new_id(), new_id(), new_id(), new_id()


@pytest.fixture(scope="module")
def shared_server(shared_db: str) -> Iterator[Server]:
    """Tokens set and a 1 MiB body limit; a stored, a revoked and a keyed action."""
    server = Server(shared_db, {**TOKEN_ENV, "BULK_SYNC_MAX_BODY_BYTES": str(MAX_BODY)})
    try:
        server.wait_ready()
        writer = TOKENS["writer"]
        for action_id in (STORED, REVOKED):
            response = server.api.post(
                "/api/actions/log", action_body(action_id, STORED_USER, "10.2"), token=writer
            )
            assert response.status_code == 200, response.text
        response = server.api.post(
            f"/api/actions/{REVOKED}/revoke", {"reason": "test"}, token=writer
        )
        assert response.status_code == 200, response.text
        response = server.api.post(
            "/api/actions/bulk_backfill",
            {"actions": [action_body(KEYED)], "idempotency_key": "the-key"},
            token=writer,
        )
        assert response.status_code == 200, response.text
        yield server
    finally:
        server.stop()


def fingerprint(url: str) -> tuple[Any, ...]:
    with connect(url) as conn:
        return conn.execute(
            "SELECT (SELECT count(*) FROM bulk_sync.user_actions),"
            " (SELECT count(*) FROM bulk_sync.user_actions WHERE verified AND NOT revoked),"
            " (SELECT total_lbs_saved FROM bulk_sync.global_emissions WHERE id = 1)::text,"
            " (SELECT count(*) FROM bulk_sync.action_transitions),"
            " (SELECT count(*) FROM bulk_sync.emissions_corrections),"
            " (SELECT count(*) FROM bulk_sync.idempotency_keys)"
        ).fetchone()


def _chunks(size: int) -> Iterator[bytes]:
    yield b'{"actions": ['
    for _ in range(size // 4096):
        yield b" " * 4096
    yield b"]}"


JSON = {"Content-Type": "application/json"}
W, R, A = TOKENS["writer"], TOKENS["reader"], TOKENS["admin"]
BIG = 6 * 10**23  # two of these overflow NUMERIC(30,6)
TINY = "1e-20000"  # a JSON number PostgreSQL's numeric cannot hold (too many decimals)

# id, method, path, token, request kwargs (json= is a body sent verbatim), status, code
STATUS_CASES: list[tuple[str, str, str, str | None, dict[str, Any], int, str]] = [
    ("malformed JSON", "POST", "/api/actions/log", W, {"json": '{"action_id": '}, 400, "BS001"),
    (
        "JSON array body",
        "POST",
        "/api/actions/log",
        W,
        {"json": f"[{json.dumps(action_body())}]"},
        400,
        "BS001",
    ),
    ("JSON string body", "POST", "/api/actions/log", W, {"json": '"hello"'}, 400, "BS001"),
    (
        "not UTF-8",
        "POST",
        "/api/actions/log",
        W,
        {"content": b'{"a": "\xff"}', "headers": JSON},
        400,
        "BS001",
    ),
    ("empty body", "POST", "/api/actions/log", W, {"headers": JSON}, 400, "BS001"),
    (
        "a typo key (SQL rule)",
        "POST",
        "/api/actions/log",
        W,
        {"json": json.dumps({**action_body(), "verifed": True})},
        400,
        "BS001",
    ),
    (
        "NaN (SQL rule)",
        "POST",
        "/api/actions/log",
        W,
        {"json": json.dumps({**action_body(), "lbs": "NaN"})},
        400,
        "BS001",
    ),
    (
        "empty reason (SQL rule)",
        "POST",
        f"/api/actions/{STORED}/revoke",
        W,
        {"json": '{"reason": ""}'},
        400,
        "BS001",
    ),
    ("bad uuid in path", "POST", "/api/actions/not-a-uuid/verify", W, {}, 400, "BS001"),
    ("bad uuid in user path", "GET", "/api/users/12345", R, {}, 400, "BS001"),
    ("as_of not a time", "GET", "/api/totals?as_of=yesterday", R, {}, 400, "BS001"),
    ("as_of without zone", "GET", "/api/totals?as_of=2025-11-05T10:00:00", R, {}, 400, "BS001"),
    (
        "as_of before year 1 in UTC",
        "GET",
        "/api/totals?as_of=0001-01-01T00:00:00%2B01:00",
        R,
        {},
        400,
        "BS001",
    ),
    (
        "as_of after 9999 in UTC",
        "GET",
        f"/api/users/{STORED_USER}?as_of=9999-12-31T23:59:59-01:00",
        R,
        {},
        400,
        "BS001",
    ),
    ("after over bigint", "GET", "/api/events?after=9223372036854775808", R, {}, 400, "BS001"),
    (
        "Last-Event-ID not ASCII digits",
        "GET",
        "/api/events/stream",
        R,
        {"headers": {"Last-Event-ID": b"\xb2"}},
        400,
        "BS001",
    ),
    (
        "Last-Event-ID over bigint",
        "GET",
        "/api/events/stream",
        R,
        {"headers": {"Last-Event-ID": "99999999999999999999"}},
        400,
        "BS001",
    ),
    (
        "verify with a typo key",
        "POST",
        f"/api/actions/{STORED}/verify",
        W,
        {"json": '{"performd_by": "alice"}'},
        400,
        "BS001",
    ),
    (
        "revoke with an unknown key",
        "POST",
        f"/api/actions/{uuid.uuid4()}/revoke",
        W,
        {"json": '{"reason": "a duplicate", "extra": 1}'},
        400,
        "BS001",
    ),
    (
        "revoke with a NUL in the reason",
        "POST",
        f"/api/actions/{uuid.uuid4()}/revoke",
        W,
        {"json": '{"reason": "a\\u0000b"}'},
        400,
        "BS001",
    ),
    (
        "verify by a lone surrogate",
        "POST",
        f"/api/actions/{uuid.uuid4()}/verify",
        W,
        {"json": '{"performed_by": "\\ud800"}'},
        400,
        "BS001",
    ),
    (
        "revoke with a reason not a string",
        "POST",
        f"/api/actions/{uuid.uuid4()}/revoke",
        W,
        {"json": '{"reason": false}'},
        400,
        "BS001",
    ),
    (
        "a misspelt query parameter",
        "GET",
        "/api/totals?as_off=2025-11-05T10:00:00Z",
        R,
        {},
        400,
        "BS001",
    ),
    ("a misspelt limit", "GET", "/api/leaderboard?limt=5", R, {}, 400, "BS001"),
    ("an unknown parameter on the stream", "GET", "/api/events/stream?from=3", R, {}, 400, "BS001"),
    ("a parameter given twice", "GET", "/api/leaderboard?limit=1&limit=2", R, {}, 400, "BS001"),
    ("given twice on the stream", "GET", "/api/events/stream?after=1&after=2", R, {}, 400, "BS001"),
    ("limit not an integer", "GET", "/api/leaderboard?limit=ten", R, {}, 400, "BS001"),
    ("limit over the SQL's", "GET", "/api/leaderboard?limit=100000", R, {}, 400, "BS001"),
    ("after negative", "GET", "/api/events?after=-1", R, {}, 400, "BS001"),
    (
        "missing token",
        "POST",
        "/api/actions/log",
        None,
        {"json": json.dumps(action_body())},
        401,
        "unauthorized",
    ),
    (
        "unknown token",
        "POST",
        "/api/actions/log",
        "nope",
        {"json": json.dumps(action_body())},
        401,
        "unauthorized",
    ),
    (
        "not a bearer header",
        "GET",
        "/api/status",
        None,
        {"headers": {"Authorization": f"Basic {R}"}},
        401,
        "unauthorized",
    ),
    ("reader endpoint without token", "GET", "/api/status", None, {}, 401, "unauthorized"),
    (
        "access_token on a POST",
        "POST",
        f"/api/actions/log?access_token={W}",
        None,
        {"json": json.dumps(action_body())},
        401,
        "unauthorized",
    ),
    ("page without token", "GET", "/", None, {}, 401, "unauthorized"),
    (
        "reader token writes",
        "POST",
        "/api/actions/log",
        R,
        {"json": json.dumps(action_body())},
        403,
        "forbidden",
    ),
    ("writer token reconciles", "POST", "/api/actions/reconcile", W, {}, 403, "forbidden"),
    ("reader token verifies", "POST", f"/api/actions/{STORED}/verify", R, {}, 403, "forbidden"),
    ("unknown path", "GET", "/api/nothing", R, {}, 404, "not_found"),
    ("unknown path under a known one", "POST", "/api/actions/log/more", W, {}, 404, "not_found"),
    ("a known path with a slash", "GET", "/api/totals/", R, {}, 404, "not_found"),
    ("unknown action", "POST", f"/api/actions/{uuid.uuid4()}/verify", W, {}, 404, "BS004"),
    ("unknown user", "GET", f"/api/users/{uuid.uuid4()}", R, {}, 404, "BS004"),
    (
        "unknown user's neighbourhood",
        "GET",
        f"/api/leaderboard/around/{uuid.uuid4()}",
        R,
        {},
        404,
        "BS004",
    ),
    ("GET on a POST path", "GET", "/api/actions/log", W, {}, 405, "method_not_allowed"),
    ("DELETE on a GET path", "DELETE", "/api/totals", R, {}, 405, "method_not_allowed"),
    (
        "other facts",
        "POST",
        "/api/actions/log",
        W,
        {"json": json.dumps(action_body(STORED, STORED_USER, "99"))},
        409,
        "BS002",
    ),
    ("verify a revoked action", "POST", f"/api/actions/{REVOKED}/verify", W, {}, 409, "BS006"),
    (
        "declared body over the limit",
        "POST",
        "/api/actions/bulk_backfill",
        W,
        {"content": b"{" + b" " * MAX_BODY + b"}", "headers": JSON},
        413,
        "too_large",
    ),
    (
        "streamed body over the limit",
        "POST",
        "/api/actions/bulk_backfill",
        W,
        {"content": _chunks(MAX_BODY + 8192), "headers": JSON},
        413,
        "too_large",
    ),
    (
        "batch over the limit",
        "POST",
        "/api/actions/bulk_backfill",
        W,
        {"json": '{"actions": [' + ",".join(["{}"] * 50_001) + "]}"},
        413,
        "BS005",
    ),
    (
        "text/plain",
        "POST",
        "/api/actions/log",
        W,
        {"content": json.dumps(action_body()).encode(), "headers": {"Content-Type": "text/plain"}},
        415,
        "unsupported_media_type",
    ),
    (
        "form",
        "POST",
        "/api/actions/log",
        W,
        {"data": {"action_id": new_id()}},
        415,
        "unsupported_media_type",
    ),
    (
        "a compressed body",
        "POST",
        "/api/actions/log",
        W,
        {
            "content": gzip.compress(json.dumps(action_body()).encode()),
            "headers": {**JSON, "Content-Encoding": "gzip"},
        },
        415,
        "unsupported_media_type",
    ),
    (
        "JSON in another charset",
        "POST",
        "/api/actions/log",
        W,
        {"content": b"{}", "headers": {"Content-Type": "application/json; charset=latin-1"}},
        415,
        "unsupported_media_type",
    ),
    (
        "no content type",
        "POST",
        "/api/actions/log",
        W,
        {"content": json.dumps(action_body())},
        415,
        "unsupported_media_type",
    ),
    (
        "key reused with other actions",
        "POST",
        "/api/actions/bulk_backfill",
        W,
        {"json": json.dumps({"actions": [action_body()], "idempotency_key": "the-key"})},
        422,
        "BS003",
    ),
    (
        "Idempotency-Key header reused",
        "POST",
        "/api/actions/bulk_backfill",
        W,
        {
            "json": json.dumps({"actions": [action_body()]}),
            "headers": {**JSON, "Idempotency-Key": "the-key"},
        },
        422,
        "BS003",
    ),
    (
        "a number PostgreSQL cannot hold",
        "POST",
        "/api/actions/log",
        W,
        {"json": json.dumps(action_body())[:-1] + ', "metadata": {"x": 1e200000}}'},
        400,
        "BS001",
    ),
    (
        "an amount PostgreSQL cannot hold",
        "POST",
        "/api/actions/bulk_backfill",
        W,
        {"json": json.dumps({"actions": [{**action_body(), "lbs": "@"}]}).replace('"@"', TINY)},
        400,
        "BS001",
    ),
    (
        "a total over NUMERIC(30,6)",
        "POST",
        "/api/actions/bulk_backfill",
        W,
        {
            "json": json.dumps(
                {
                    "actions": [
                        action_body(user_id=STORED_USER, lbs=str(BIG)),
                        action_body(user_id=STORED_USER, lbs=str(BIG)),
                    ]
                }
            )
        },
        422,
        "22003",
    ),
]


@pytest.mark.parametrize(
    ("method", "path", "token", "kwargs", "status", "code"),
    [pytest.param(*case[1:], id=case[0]) for case in STATUS_CASES],
)
def test_status_and_error_body_and_nothing_changes(
    shared_server: Server,
    shared_db: str,
    method: str,
    path: str,
    token: str | None,
    kwargs: dict[str, Any],
    status: int,
    code: str,
) -> None:
    kwargs = dict(kwargs)
    if "json" in kwargs:
        kwargs["content"] = kwargs.pop("json").encode()
        kwargs["headers"] = {**JSON, **kwargs.get("headers", {})}
    before = fingerprint(shared_db)
    response = shared_server.api.request(method, path, token=token, **kwargs)
    error = assert_error(response, status, code)
    assert set(error) == {"code", "message", "detail", "hint"}
    assert error["message"]
    if status == 401:
        assert response.headers["WWW-Authenticate"].startswith("Bearer")
    if status == 405:
        assert response.headers["Allow"]
    assert fingerprint(shared_db) == before


def test_tokens_grant_their_level_and_below(shared_server: Server) -> None:
    api = shared_server.api
    for token in (R, W, A):
        assert api.get("/api/status", token=token).status_code == 200
        assert api.get(f"/api/status?access_token={token}").status_code == 200
    assert api.get(f"/?access_token={R}").status_code == 200
    assert api.post("/api/actions/log", action_body(), token=A).status_code == 200
    verify = api.post(f"/api/actions/{STORED}/verify", {"performed_by": "ann"}, token=W)
    assert json_of(verify)["status"] == "already_verified"
    reconcile = api.post("/api/actions/reconcile", token=A)  # an empty body means {}
    assert json_of(reconcile)["in_sync"] is True
    events = json_of(api.get("/api/events?after=0&limit=2", token=R))
    assert [e["event_id"] for e in events["events"]] == [1, 2]
    assert events["last_event_id"] == 2
    assert events["events"][0]["user_id"] == STORED_USER


def test_reads_are_open_without_a_reader_token_and_everything_without_any(
    db_url: str, start_server: Callable[..., Server]
) -> None:
    env = {k: v for k, v in TOKEN_ENV.items() if "READER" not in k}
    api = start_server(db_url, env).api
    assert api.get("/api/status").status_code == 200
    assert api.get("/").status_code == 200
    assert_error(api.post("/api/actions/log", action_body()), 401, "unauthorized")

    api = start_server(db_url).api  # no token at all (loopback)
    assert api.post("/api/actions/log", action_body()).status_code == 200
    assert api.post("/api/actions/reconcile").status_code == 200


def test_a_proxys_basic_credentials_are_not_taken_for_a_token(
    db_url: str, start_server: Callable[..., Server]
) -> None:
    """Behind a reverse proxy that asks for HTTP Basic credentials, browsers send them with every
    request. They are no bearer token: open endpoints answer, a GET's access_token still counts,
    and an endpoint that needs a token says it wants a Bearer one."""
    basic = {"Authorization": "Basic dXNlcjpzZWNyZXQ="}
    env = {k: v for k, v in TOKEN_ENV.items() if "READER" not in k}
    api = start_server(db_url, env).api
    assert api.get("/api/status", headers=basic).status_code == 200
    assert api.get("/", headers=basic).status_code == 200
    error = assert_error(
        api.post("/api/actions/log", action_body(), headers=basic), 401, "unauthorized"
    )
    assert "Bearer <token>" in error["message"], error

    api = start_server(db_url, TOKEN_ENV).api
    assert api.get(f"/api/status?access_token={R}", headers=basic).status_code == 200
    assert_error(api.get("/api/status", headers=basic), 401, "unauthorized")


@pytest.mark.parametrize(
    "env",
    [
        pytest.param({}, id="no token"),
        pytest.param({"BULK_SYNC_WRITER_TOKEN": W}, id="no admin"),
        pytest.param(
            {
                "BULK_SYNC_WRITER_TOKEN": W,
                "BULK_SYNC_ADMIN_TOKEN": A,
                "BULK_SYNC_MAX_BODY_BYTES": "64MiB",
            },
            id="a body limit with a unit",
        ),
    ],
)
def test_refuses_a_public_host_without_writer_and_admin_tokens(
    db_url: str, env: dict[str, str]
) -> None:
    full_env = {k: v for k, v in cli_env().items() if not k.startswith("BULK_SYNC_")}
    done = subprocess.run(
        cli_command(db_url, "serve", "--host", "0.0.0.0", "--port", str(port_for.get_port(None))),
        capture_output=True,
        text=True,
        env={**full_env, **env},
        timeout=60,
    )
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("bulk-sync: error: refusing to start"), lines


def test_request_log_never_contains_a_token(
    db_url: str, start_server: Callable[..., Server]
) -> None:
    server = start_server(db_url, TOKEN_ENV)
    api = server.api
    assert api.get(f"/api/status?access_token={R}").status_code == 200
    assert api.get(f"/api/leaderboard?limit=1&access%5Ftoken={R}&offset=0").status_code == 200
    assert api.get("/api/status", token=W).status_code == 200
    assert api.post("/api/actions/log", action_body(), token="wrong-" + A).status_code == 401
    assert api.post(f"/api/actions/log?access_token={W}", action_body()).status_code == 401
    server.stop()
    log = server.output()
    assert '"GET /api/status?access_token=[redacted] HTTP/1.1" 200' in log, log
    assert "limit=1&access%5Ftoken=[redacted]&offset=0" in log, log
    for token in TOKENS.values():
        assert token not in log, log


def test_no_access_log_leaves_requests_out_of_the_log(
    db_url: str, start_server: Callable[..., Server]
) -> None:
    quiet = start_server(db_url, TOKEN_ENV, args=("--no-access-log",))
    loud = start_server(db_url, TOKEN_ENV)
    for server in (quiet, loud):
        assert server.api.get("/api/status", token=R).status_code == 200
        assert server.api.get("/no-such-path").status_code == 404
    quiet.stop()
    loud.stop()
    assert '"GET /api/status HTTP/1.1" 200' in loud.output()
    assert '"GET /no-such-path HTTP/1.1" 404' in loud.output()
    log = quiet.output()
    assert "HTTP/1.1" not in log, log
    assert "Application startup complete" in log, log  # the rest of the log is still there


def test_openapi_document_describes_every_route(
    db_url: str, start_server: Callable[..., Server]
) -> None:
    api = start_server(db_url).api
    document = json_of(api.get("/openapi.json"))
    assert document["openapi"].startswith("3.1")
    served = {(a.method.lower(), a.path) for a in serve.ROUTES} | {
        ("get", path) for path in ("/api/events/stream", "/healthz", "/openapi.json", "/")
    }
    described = {(m, p) for p, ops in document["paths"].items() for m in ops}
    assert described == served
    for schema in document["components"]["schemas"].values():
        jsonschema.Draft202012Validator.check_schema(schema)


# --------------------------------------------------------------------------- events


class SseReader:
    """Reads a text/event-stream on a thread; events arrive as (id, data, time received)."""

    def __init__(self, url: str, headers: dict[str, str] | None = None) -> None:
        self.events: queue.Queue[tuple[int, dict[str, Any], float]] = queue.Queue()
        self.client = httpx.Client(timeout=httpx.Timeout(30, read=None))
        self.response = self.client.send(
            self.client.build_request("GET", url, headers=headers), stream=True
        )
        check_openapi(self.response)
        assert self.response.headers["content-type"].startswith("text/event-stream")
        self.thread = threading.Thread(target=self._pump, daemon=True)
        self.thread.start()

    def _pump(self) -> None:
        event_id, data = None, []
        try:
            for line in self.response.iter_lines():
                if line.startswith("id: "):
                    event_id = int(line[4:])
                elif line.startswith("data: "):
                    data.append(line[6:])
                elif line == "" and data:
                    payload = json.loads("\n".join(data), parse_float=Decimal)
                    self.events.put((event_id, payload, time.monotonic()))
                    event_id, data = None, []
        except httpx.HTTPError:
            pass

    def next(self, timeout: float) -> tuple[int, dict[str, Any], float]:
        return self.events.get(timeout=timeout)

    def close(self) -> None:
        self.response.close()
        self.client.close()


def test_stream_catches_up_then_delivers_within_a_second_and_resumes(
    db_url: str, start_server: Callable[..., Server]
) -> None:
    server = start_server(db_url)
    api = server.api
    users = [new_id(), new_id()]
    for user in users:
        assert api.post("/api/actions/log", action_body(user_id=user)).status_code == 200

    stream = SseReader(f"{server.base}/api/events/stream?after=0")
    try:
        caught_up = [stream.next(10) for _ in users]
        assert [(e[0], e[1]["user_id"]) for e in caught_up] == [(1, users[0]), (2, users[1])]

        user = new_id()
        response = api.post("/api/actions/log", action_body(user_id=user, lbs="2.5"))
        assert response.status_code == 200
        committed = time.monotonic()
        event_id, payload, received = stream.next(SSE_DEADLINE_S)
        assert event_id == 3
        assert payload["user_id"] == user
        assert payload["user_total_lbs"] == "2.500000"
        assert payload["global_total_lbs"] == "4.500000"
        assert received - committed < SSE_DEADLINE_S
    finally:
        stream.close()

    # A reconnect carries Last-Event-ID, which wins over ?after: nothing again, nothing missed.
    api.post("/api/actions/log", action_body())
    resumed = SseReader(f"{server.base}/api/events/stream?after=0", {"Last-Event-ID": "2"})
    try:
        assert [resumed.next(10)[0] for _ in range(2)] == [3, 4]
        with pytest.raises(queue.Empty):
            resumed.next(0.7)
    finally:
        resumed.close()


def test_unreachable_database_is_503_with_retry_after_then_recovers(
    db_url: str, admin_url: str, start_server: Callable[..., Server]
) -> None:
    server = start_server(db_url)
    api = server.api
    dbname = db_url.rsplit("/", 1)[1]
    assert api.get("/api/status").status_code == 200
    with connect(admin_url) as admin:
        admin.execute(
            sql.SQL("ALTER DATABASE {} ALLOW_CONNECTIONS false").format(sql.Identifier(dbname))
        )
        admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s", (dbname,)
        )
    try:
        for _ in range(2):  # a dead pooled connection, then no connection at all
            response = api.get("/api/status")
            assert_error(response, 503, "unavailable")
            assert int(response.headers["Retry-After"]) > 0
        assert_error(api.post("/api/actions/log", action_body()), 503, "unavailable")
        assert_error(api.get("/healthz"), 503, "unavailable")
    finally:
        with connect(admin_url) as admin:
            admin.execute(
                sql.SQL("ALTER DATABASE {} ALLOW_CONNECTIONS true").format(sql.Identifier(dbname))
            )
    wait_for(lambda: api.get("/api/status").status_code == 200, 30, 0.2, "recovery")
    assert api.post("/api/actions/log", action_body()).status_code == 200
    assert fingerprint(db_url)[0] == 1  # the 503 POST stored nothing
    assert "Traceback" not in server.output()


def test_killed_pool_connections_are_replaced_before_a_request_gets_one(
    db_url: str, admin_url: str, start_server: Callable[..., Server]
) -> None:
    """The database stays up while every pooled backend is killed (as a restart or an
    administrator would): the next requests get new connections, never a 503."""
    server = start_server(db_url)
    api = server.api
    for _ in range(8):
        assert api.get("/api/status").status_code == 200
    with connect(admin_url) as admin:
        (killed,) = admin.execute(
            "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid, 5000)) FROM pg_stat_activity"
            " WHERE datname = %s AND application_name = 'bulk-sync serve'",
            [db_url.rsplit("/", 1)[1]],
        ).fetchone()
    assert killed >= 2
    statuses = [api.get("/api/status").status_code for _ in range(8)]
    statuses.append(api.post("/api/actions/log", action_body()).status_code)
    assert statuses == [200] * 9
    assert fingerprint(db_url)[0] == 1


# --------------------------------------------------------------------------- the page


class Chromium:
    """Headless Chromium driven over the DevTools protocol (Runtime.evaluate)."""

    def __init__(self, url: str) -> None:
        self.profile = tempfile.mkdtemp(prefix="bulk-sync-chromium-")
        binary = shutil.which("chromium") or shutil.which("chromium-browser")
        assert binary, "chromium is not installed; scripts/test installs it"
        self.proc = subprocess.Popen(
            [
                binary,
                "--headless=new",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--no-first-run",
                "--no-default-browser-check",
                f"--user-data-dir={self.profile}",
                "--remote-debugging-port=0",
                "--remote-allow-origins=*",
                url,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.log = LineReader(self.proc.stderr)
        line = ""
        deadline = time.monotonic() + 60
        while "DevTools listening on" not in line:
            line = self.log.next(max(0.1, deadline - time.monotonic())) or ""
        port = int(re.search(r"ws://[^:]+:(\d+)/", line).group(1))
        pages = wait_for(
            lambda: [
                t
                for t in httpx.get(f"http://127.0.0.1:{port}/json/list").json()
                if t["type"] == "page"
            ],
            30,
            0.1,
            "a page target",
        )
        from websockets.sync.client import connect as ws_connect

        self.stack = contextlib.ExitStack()
        self.ws = self.stack.enter_context(
            ws_connect(pages[0]["webSocketDebuggerUrl"], max_size=None)
        )
        self.next_id = 0

    def evaluate(self, expression: str) -> Any:
        self.next_id += 1
        self.ws.send(
            json.dumps(
                {
                    "id": self.next_id,
                    "method": "Runtime.evaluate",
                    "params": {"expression": expression, "returnByValue": True},
                }
            )
        )
        while True:
            message = json.loads(self.ws.recv(timeout=30))
            if message.get("id") == self.next_id:
                return message["result"]["result"].get("value")

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.stack.close()
        stop_process(self.proc)
        shutil.rmtree(self.profile, ignore_errors=True)


BOARD_JS = (
    "JSON.stringify({total: document.getElementById('total').textContent,"
    " state: document.getElementById('state').textContent, marker: window.__marker || null,"
    " rows: [...document.querySelectorAll('#board tr')].map(tr =>"
    " [...tr.children].map(td => td.textContent))})"
)


def test_page_shows_the_leaderboard_and_follows_it_live_in_chromium(
    db_url: str, start_server: Callable[..., Server]
) -> None:
    server = start_server(db_url, TOKEN_ENV)
    server.api.post("/api/actions/bulk_backfill", seed_backfill_body(), token=W)
    browser = Chromium(f"{server.base}/?access_token={R}")
    try:

        def board() -> dict[str, Any]:
            return json.loads(browser.evaluate(BOARD_JS) or "{}")

        first = wait_for(lambda: (b := board()).get("state") == "live" and b, 30, 0.1, "live")
        assert first["total"] == "30.900000"
        assert first["rows"] == [
            ["1", USER3, "10.400000"],
            ["2", USER2, "10.300000"],
            ["3", USER1, "10.200000"],
        ]
        browser.evaluate("window.__marker = 'same page'")

        leader = new_id()
        server.api.post("/api/actions/log", action_body(user_id=leader, lbs="11"), token=W)
        after = wait_for(
            lambda: (b := board()).get("rows", [[None]])[0][1] == leader and b,
            10,
            0.1,
            "the page to show the new leader",
        )
        assert after["total"] == "41.900000"
        assert after["rows"][0] == ["1", leader, "11.000000"]
        assert [row[0] for row in after["rows"]] == ["1", "2", "3", "4"]
        assert after["marker"] == "same page"  # no reload happened
    finally:
        browser.close()


class RecordingTransport:
    """What GatheredWrites hands on, in order."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, bytes]] = []
        self.closing = False

    def write(self, data: bytes) -> None:
        self.calls.append(("write", data))

    def close(self) -> None:
        self.calls.append(("close", b""))
        self.closing = True

    def abort(self) -> None:
        self.calls.append(("abort", b""))
        self.closing = True

    def is_closing(self) -> bool:
        return self.closing

    def get_write_buffer_size(self) -> int:
        return 5

    def get_extra_info(self, name: str) -> str:
        return f"extra {name}"


def test_gathered_writes_send_one_turns_writes_as_one() -> None:
    async def scenario() -> None:
        under = RecordingTransport()
        gathered = serve.GatheredWrites(under, asyncio.get_running_loop())  # type: ignore[arg-type]
        gathered.write(b"HTTP/1.1 200 OK\r\n\r\n")
        gathered.write(bytearray(b"{}"))
        assert under.calls == []  # nothing is sent before the turn ends
        assert gathered.get_write_buffer_size() == 5 + 21
        await asyncio.sleep(0)
        assert under.calls == [("write", b"HTTP/1.1 200 OK\r\n\r\n{}")]
        gathered.writelines([b"a", b"", b"b"])
        gathered.write(b"c")
        gathered.write(b"")
        await asyncio.sleep(0)
        assert under.calls[1:] == [("write", b"abc")]
        gathered.write(b"")  # nothing to send, as with asyncio's transports
        await asyncio.sleep(0)
        assert under.calls[2:] == []
        assert gathered.get_extra_info("peername") == "extra peername"

        gathered.write(b"last")
        gathered.close()  # what is pending goes out before the close
        await asyncio.sleep(0)
        assert under.calls[2:] == [("write", b"last"), ("close", b"")]
        gathered.write(b"after the close")
        await asyncio.sleep(0)
        assert under.calls[4:] == []

        under = RecordingTransport()
        gathered = serve.GatheredWrites(under, asyncio.get_running_loop())  # type: ignore[arg-type]
        gathered.write(b"dropped")
        gathered.abort()
        await asyncio.sleep(0)
        assert under.calls == [("abort", b"")]

    asyncio.run(scenario())


def test_default_body_limit_is_64_mib() -> None:
    assert serve.Settings.from_env({"DATABASE_URL": "x"}).max_body_bytes == 64 * 2**20
    assert serve.redact("/p?access_token=s3cret&x=1") == "/p?access_token=[redacted]&x=1"


@pytest.mark.parametrize("use_colors", [False, True], ids=["plain", "coloured"])
def test_access_line_is_uvicorns_line(use_colors: bool) -> None:
    ours = serve.AccessLine(serve.ACCESS_FORMAT, use_colors=use_colors)
    uvicorns = AccessFormatter(serve.ACCESS_FORMAT, use_colors=use_colors)
    for level in (logging.INFO, logging.WARNING):
        for status in (200, 201, 304, 401, 404, 413, 422, 503, 599):
            for path in ("/api/actions/log", "/api/status?access_token=[redacted]&a=%C3%A9"):
                record = logging.LogRecord(
                    "uvicorn.access",
                    level,
                    __file__,
                    1,
                    '%s - "%s %s HTTP/%s" %d',
                    ("192.0.2.7:50123", "POST", path, "1.1", status),
                    None,
                )
                assert ours.format(record) == uvicorns.format(record)
    if not use_colors:
        assert ours.format(record) == (
            'WARNING:  192.0.2.7:50123 - "POST /api/status?access_token=[redacted]&a=%C3%A9'
            ' HTTP/1.1" 599 '
        )


def test_a_readable_connection_is_seen_above_fd_setsize() -> None:
    """The pool's check polls a connection's socket; a server with many clients holds
    descriptors above 1024, which select() refuses."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 2048:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 4096), hard))
    ours, theirs = socket.socketpair()
    high = os.dup2(ours.fileno(), 2000)
    try:
        assert serve._readable(high) is False
        theirs.send(b"E")  # what a server's last message looks like to an idle connection
        assert serve._readable(high) is True
    finally:
        os.close(high)
        ours.close()
        theirs.close()
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
