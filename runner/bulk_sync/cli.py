"""The ``bulk-sync`` command line: one click group, one SQL call (or one COPY stream) per command.

Exit codes: 0 success; 1 out of sync under ``reconcile --dry-run``; 2 bad usage or bad input
(click's usage errors, SQLSTATE class BS, unreadable files); 3 database errors. Errors are
one line on stderr, ``bulk-sync: error: ...``; ``--verbose`` adds the traceback.
"""

from __future__ import annotations

import os
import re
import sys
import traceback
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import IO, Any, NoReturn

import click
import psycopg
from psycopg.conninfo import conninfo_to_dict

from bulk_sync import __version__, embedded, events, paths
from bulk_sync.backfill import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_JOBS,
    FORMATS,
    MAX_BATCH_SIZE,
    MAX_JOBS,
    backfill,
)
from bulk_sync.db import INT4_MAX, INT8_MAX, call_json, connect, resolve_url, to_cli_error
from bulk_sync.errors import EXIT_BAD_INPUT, EXIT_DATABASE, EXIT_OUT_OF_SYNC, CliError
from bulk_sync.jsonutil import dumps, loads
from bulk_sync.migrate import migrate as run_migrate

CRON_JOB = "bulk-sync-reconcile"
CRON_COMMAND = "SELECT bulk_sync.reconcile()"


# --------------------------------------------------------------------------- plumbing


@dataclass
class Settings:
    database_url: str | None
    verbose: bool
    _resolved: str | None = None

    def url(self) -> str:
        """The database URL; the embedded default is started only when a command needs it."""
        if self._resolved is None:
            self._resolved = resolve_url(self.database_url)
        return self._resolved


def _fail(ctx: click.Context, message: str, code: int, exc: BaseException | None) -> NoReturn:
    if ctx.params.get("verbose") and exc is not None:
        traceback.print_exception(exc, file=sys.stderr)
    one_line = re.sub(r"\s*\n\s*", " ", message.strip())
    click.echo(f"bulk-sync: error: {one_line}", err=True)
    ctx.exit(code)


def _usage_error(ctx: click.Context, exc: click.UsageError) -> NoReturn:
    """Bad usage, as one line (exit 2); ``bulk-sync`` alone still shows the help."""
    if isinstance(exc, _NO_ARGS_IS_HELP):
        raise exc
    where = exc.ctx.command_path if exc.ctx is not None else ctx.command_path
    _fail(ctx, f"{exc.format_message()} (see '{where} --help')", exc.exit_code, None)


# click >= 8.2 shows the help for a bare group by raising this usage error.
_NO_ARGS_IS_HELP: type[BaseException] = getattr(
    click.exceptions, "NoArgsIsHelpError", type("_Never", (BaseException,), {})
)


class BulkSyncGroup(click.Group):
    """Turns every error into one line on stderr and the contract's exit code."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        try:
            return super().parse_args(ctx, args)
        except click.UsageError as exc:
            _usage_error(ctx, exc)

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except click.UsageError as exc:  # a subcommand's options or arguments
            _usage_error(ctx, exc)
        except (click.ClickException, click.exceptions.Exit, click.Abort):
            raise
        except CliError as exc:
            for line in exc.details:
                click.echo(f"bulk-sync: {line}", err=True)
            _fail(ctx, exc.message, exc.exit_code, exc)
        except psycopg.Error as exc:
            error = to_cli_error(exc)
            _fail(ctx, error.message, error.exit_code, exc)
        except BrokenPipeError:
            # The reader went away (e.g. `bulk-sync listen | head`): stop quietly.
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            ctx.exit(0)
        except KeyboardInterrupt as exc:
            _fail(ctx, "interrupted", 130, exc)
        except Exception as exc:  # a bug: still one line, the traceback with --verbose
            _fail(ctx, f"internal error: {type(exc).__name__}: {exc}", EXIT_DATABASE, exc)


def _settings(ctx: click.Context) -> Settings:
    settings = ctx.find_object(Settings)
    if settings is None:  # a subcommand invoked on its own (tests, embedding)
        settings = Settings(database_url=None, verbose=False)
    return settings


def _exact_integers() -> None:
    """Let this process read and write integers of any length as JSON text: ``--metadata``'s
    JSON may hold one of more than the 4,300 digits Python converts by default, which metadata
    stores as it is. (``backfill()`` lifts the limit itself while it loads a file.)"""
    sys.set_int_max_str_digits(0)


def _print_json(value: Any, *, compact: bool = False) -> None:
    click.echo(dumps(value, indent=None if compact else 2))


def _iso_utc(value: datetime | None) -> str | None:
    if value is None:
        return None
    return value.astimezone(UTC).isoformat().replace("+00:00", "Z")


class Duration(click.ParamType):
    """``30s``, ``15m``, ``1h``, ``2h30m``: seconds, at most INT4_MAX (an int, as SQL takes)."""

    name = "duration"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int:
        if isinstance(value, int):
            seconds = value
        else:
            try:
                seconds = events.parse_duration(str(value))
            except ValueError as exc:
                self.fail(str(exc), param, ctx)
        if seconds > INT4_MAX:
            self.fail(f"{value!r} is longer than the maximum of {INT4_MAX}s", param, ctx)
        return seconds


# --------------------------------------------------------------------------- the group


@click.group(cls=BulkSyncGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--database-url",
    envvar="DATABASE_URL",
    metavar="URL",
    help="PostgreSQL URL (default: $DATABASE_URL, else the embedded default database).",
)
@click.option("--verbose", is_flag=True, help="Show tracebacks on errors.")
@click.version_option(__version__, prog_name="bulk-sync")
@click.pass_context
def main(ctx: click.Context, database_url: str | None, verbose: bool) -> None:
    """Exact, idempotent emission totals in PostgreSQL.

    Start with `bulk-sync demo`.
    """
    ctx.obj = Settings(database_url=database_url or None, verbose=verbose)


@main.command()
@click.option(
    "--lock-timeout",
    type=click.IntRange(1, 2000),
    default=2000,
    show_default=True,
    metavar="MS",
    help="Longest wait for any one lock; a writer never queues behind migrate for longer.",
)
@click.option(
    "--attempts",
    type=click.IntRange(1, 100),
    default=6,
    show_default=True,
    help="Tries (with backoff) before giving up with exit 3 when a lock is not granted.",
)
@click.pass_context
def migrate(ctx: click.Context, lock_timeout: int, attempts: int) -> None:
    """Install or upgrade the bulk_sync schema.

    Applies the pending yoyo migrations, then the db/ definitions unless they are already
    current; a second run is a no-op and takes no lock. Safe on a live database: see
    `--lock-timeout`.
    """
    _print_json(run_migrate(_settings(ctx).url(), lock_timeout_ms=lock_timeout, attempts=attempts))


@main.command()
@click.option("--action-id", required=True, help="The action's UUID (idempotency key).")
@click.option("--user-id", required=True, help="The user's UUID.")
@click.option("--lbs", required=True, help="Emissions saved, a decimal such as 10.2.")
@click.option("--logged-at", required=True, help="ISO 8601 timestamp with a zone offset.")
@click.option("--verified", is_flag=True, help="The action is verified (it counts).")
@click.option("--metadata", metavar="JSON", help="A JSON object stored with the action.")
@click.pass_context
def log(
    ctx: click.Context,
    action_id: str,
    user_id: str,
    lbs: str,
    logged_at: str,
    verified: bool,
    metadata: str | None,
) -> None:
    """Log one action; print the JSON response."""
    request: dict[str, Any] = {
        "action_id": action_id,
        "user_id": user_id,
        "lbs": lbs,  # a string, always: the SQL parses it as an exact numeric
        "logged_at": logged_at,
    }
    if verified:
        request["verified"] = True
    if metadata is not None:
        _exact_integers()
        try:
            request["metadata"] = loads(metadata)
        except ValueError as exc:
            raise click.BadParameter(f"not valid JSON: {exc}", param_hint="--metadata") from exc
    url = _settings(ctx).url()
    _print_json(call_json(url, "SELECT bulk_sync.log_action(%s::jsonb)", (dumps(request),)))


@main.command(name="backfill")
@click.argument("file", type=click.File("rb"))
@click.option("--format", "fmt", type=click.Choice(FORMATS), help="Default: from the extension.")
@click.option(
    "--batch-size",
    type=click.IntRange(1, MAX_BATCH_SIZE),
    default=DEFAULT_BATCH_SIZE,
    show_default=True,
    help="Rows per chunk: the checked file is applied in chunks of whole users, "
    "one transaction each.",
)
@click.option(
    "--idempotency-key",
    metavar="K",
    help="Chunk n is applied with the key K:n, so a rerun of the same file replays.",
)
@click.option(
    "--jobs",
    type=click.IntRange(1, MAX_JOBS),
    default=DEFAULT_JOBS,
    show_default=True,
    help="Database sessions that stage and check a large CSV or NDJSON file at once, "
    "one part each, and then apply its chunks side by side.",
)
@click.pass_context
def backfill_command(
    ctx: click.Context,
    file: IO[bytes],
    fmt: str | None,
    batch_size: int,
    idempotency_key: str | None,
    jobs: int,
) -> None:
    """Load a file of actions (CSV, NDJSON or JSON; - for stdin).

    The whole file is staged and checked first: a file with bad rows changes nothing, and every
    bad row (up to 100) is reported with its line number. It is then applied in chunks of whole
    users, each committed on its own; a failed or interrupted run can simply be run again.
    """
    summary = backfill(
        _settings(ctx).url(),
        file,
        name=getattr(file, "name", "-") or "-",
        fmt=fmt,
        batch_size=batch_size,
        idempotency_key=idempotency_key,
        jobs=jobs,
        progress=sys.stderr.isatty(),
    )
    _print_json(summary, compact=True)


@main.command()
@click.option("--dry-run", is_flag=True, help="Check only; exit 1 when out of sync.")
@click.option("--performed-by", metavar="NAME", help="Recorded on the run and its corrections.")
@click.pass_context
def reconcile(ctx: click.Context, dry_run: bool, performed_by: str | None) -> None:
    """Check (and fix) every total against the counted actions.

    Prints the JSON result of bulk_sync.reconcile. With --dry-run nothing is changed and the
    exit code is 1 when the totals are out of sync.
    """
    request: dict[str, Any] = {}
    if performed_by is not None:
        request["performed_by"] = performed_by
    if dry_run:
        request["auto_correct"] = False
    url = _settings(ctx).url()
    result = call_json(url, "SELECT bulk_sync.reconcile(%s::jsonb)", (dumps(request),))
    _print_json(result)
    if dry_run and not result.get("in_sync"):
        click.echo(
            f"bulk-sync: out of sync: global total {result.get('global_total')}, "
            f"source of truth {result.get('user_stats_sum')}, "
            f"{result.get('users_out_of_sync')} user(s) out of sync",
            err=True,
        )
        ctx.exit(EXIT_OUT_OF_SYNC)


LEADERBOARD_COLUMNS = "rank, user_id::text, total_lbs::text, action_count, last_action_at"


def _leaderboard_rows(url: str, limit: int, user: str | None) -> list[dict[str, Any]]:
    with connect(url) as conn:
        if user is None:
            cursor = conn.execute(
                f"SELECT {LEADERBOARD_COLUMNS} FROM bulk_sync.leaderboard(%s)", (limit,)
            )
        else:
            cursor = conn.execute(
                f"SELECT {LEADERBOARD_COLUMNS} FROM bulk_sync.leaderboard_around(%s::uuid, 2)",
                (user,),
            )
        rows = cursor.fetchall()
    return [
        {
            "rank": int(rank),
            "user_id": user_id,
            "total_lbs": total,
            "action_count": int(count),
            "last_action_at": _iso_utc(last),
        }
        for rank, user_id, total, count, last in rows
    ]


def _print_table(rows: list[dict[str, Any]]) -> None:
    if not rows:
        click.echo("(no users with counted actions)")
        return
    header = ("rank", "user_id", "total_lbs", "actions", "last_action_at")
    cells = [
        (str(r["rank"]), r["user_id"], r["total_lbs"], str(r["action_count"]), r["last_action_at"])
        for r in rows
    ]
    widths = [max(len(h), *(len(c[i] or "") for c in cells)) for i, h in enumerate(header)]
    right = (True, False, True, True, False)

    def line(values: tuple[str, ...]) -> str:
        parts = [
            (v or "").rjust(w) if r else (v or "").ljust(w)
            for v, w, r in zip(values, widths, right, strict=True)
        ]
        return "  ".join(parts).rstrip()

    click.echo(line(header))
    for row in cells:
        click.echo(line(row))


@main.command()
@click.option("--limit", type=click.IntRange(1, INT4_MAX), default=10, show_default=True)
@click.option("--user", type=click.UUID, help="Show this user's neighbourhood (2 above/below).")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON array.")
@click.pass_context
def leaderboard(ctx: click.Context, limit: int, user: Any, as_json: bool) -> None:
    """Show the leaderboard (a table, or --json)."""
    rows = _leaderboard_rows(_settings(ctx).url(), limit, None if user is None else str(user))
    if as_json:
        _print_json(rows)
    else:
        _print_table(rows)


@main.command()
@click.option(
    "--after",
    type=click.IntRange(0, INT8_MAX),
    default=0,
    show_default=True,
    metavar="EVENT_ID",
    help="Print events after this id, then follow live.",
)
@click.pass_context
def listen(ctx: click.Context, after: int) -> None:
    """Print events as JSON lines, then follow live.

    Catches up from --after (default 0), then follows bulk_sync_leaderboard notifications.
    """
    url = _settings(ctx).url()
    stopper = events.Stopper()
    with stopper.installed():
        events.listen(url, after, stopper=stopper)


@main.command()
@click.option(
    "--reconcile-every",
    type=Duration(),
    default=events.DEFAULT_RECONCILE_EVERY,
    show_default=True,
    metavar="DURATION",
    help="e.g. 30s, 15m, 1h, 2h30m.",
)
@click.option(
    "--event-retention",
    default=events.DEFAULT_EVENT_RETENTION,
    show_default=True,
    metavar="INTERVAL",
    help="Published events older than this are pruned.",
)
@click.option("--once", is_flag=True, help="One publish/reconcile-if-due/prune pass, then exit.")
@click.pass_context
def worker(ctx: click.Context, reconcile_every: int, event_retention: str, once: bool) -> None:
    """Publish events, reconcile and prune on schedule.

    Only one worker acts at a time; others wait as standbys. Logs JSON lines on stderr.
    """
    url = _settings(ctx).url()
    stopper = events.Stopper()
    with stopper.installed():
        events.Worker(
            url,
            reconcile_every_s=reconcile_every,
            event_retention=event_retention,
            stopper=stopper,
        ).run(once=once)


STATUS_LABELS = (
    ("global_total_lbs", "global total lbs"),
    ("users", "users"),
    ("counted_actions", "counted actions"),
    ("last_reconcile", "last reconcile"),
    ("events_pending", "events pending"),
    ("last_event_id", "last event id"),
    ("worker_alive", "worker alive"),
)


def _plain(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, dict):
        return ", ".join(f"{k}={_plain(v)}" for k, v in value.items()) or "-"
    if isinstance(value, list):
        return ", ".join(_plain(v) for v in value) or "-"
    return str(value)


def _last_run(run: Any) -> str:
    if not isinstance(run, dict):
        return "never" if run is None else _plain(run)
    when = run.get("finished_at") or run.get("timestamp") or "?"
    if run.get("in_sync"):
        state = "in sync"
    else:
        state = f"out of sync by {run.get('discrepancy')}"
        state += ", fixed" if run.get("fixed") else ", not fixed"
    return f"{when} by {run.get('performed_by') or '?'}: {state}"


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print the JSON from bulk_sync.status().")
@click.pass_context
def status(ctx: click.Context, as_json: bool) -> None:
    """Show the database, totals, the last reconcile and pending events."""
    settings = _settings(ctx)
    with connect(settings.url()) as conn:
        result = conn.execute("SELECT bulk_sync.status()").fetchone()[0]
        version = _server_version(conn)
    if as_json:
        _print_json(result)
        return
    width = max(len(label) for _, label in STATUS_LABELS) + 1
    click.echo(f"{'database:':<{width}} {_describe(settings, version)}")
    shown = set()
    for key, label in STATUS_LABELS:
        shown.add(key)
        value = result.get(key)
        text = _last_run(value) if key == "last_reconcile" else _plain(value)
        click.echo(f"{label + ':':<{width}} {text}")
    for key, value in result.items():
        if key not in shown:
            click.echo(f"{key.replace('_', ' ') + ':':<{width}} {_plain(value)}")


@main.command()
@click.option("--cron", default="0 * * * *", show_default=True, help="pg_cron schedule.")
@click.option("--unschedule", is_flag=True, help="Remove the job.")
@click.pass_context
def schedule(ctx: click.Context, cron: str, unschedule: bool) -> None:
    """Schedule reconcile with pg_cron (where installed)."""
    with connect(_settings(ctx).url()) as conn:
        has_cron = conn.execute(
            "SELECT 1 FROM pg_catalog.pg_extension WHERE extname = 'pg_cron'"
        ).fetchone()
        if not has_cron:
            raise CliError(
                "pg_cron is not installed in this database; run `bulk-sync worker` "
                "instead (it reconciles on schedule, hourly by default)",
                EXIT_BAD_INPUT,
            )
        if unschedule:
            conn.execute("SELECT cron.unschedule(%s)", (CRON_JOB,))
            click.echo(f"unscheduled {CRON_JOB}")
        else:
            job = conn.execute(
                "SELECT cron.schedule(%s, %s, %s)", (CRON_JOB, cron, CRON_COMMAND)
            ).fetchone()[0]
            click.echo(f"scheduled {CRON_JOB} (pg_cron job {job}): {cron} {CRON_COMMAND}")


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", type=click.IntRange(0, 65535), default=8080, show_default=True)
@click.option("--workers", type=click.IntRange(min=1), default=1, show_default=True)
@click.option(
    "--pool-size",
    type=click.IntRange(min=1),
    default=10,
    show_default=True,
    help="Database connections per worker.",
)
@click.option(
    "--access-log/--no-access-log",
    default=True,
    show_default=True,
    help="One line per request on stdout (tokens redacted). Errors are logged either way.",
)
@click.pass_context
def serve(
    ctx: click.Context, host: str, port: int, workers: int, pool_size: int, access_log: bool
) -> None:
    """Serve the HTTP API and the live leaderboard page.

    Tokens come from BULK_SYNC_READER_TOKEN, BULK_SYNC_WRITER_TOKEN and BULK_SYNC_ADMIN_TOKEN.
    With none set, only a loopback --host is allowed. Needs the serve extra.
    """
    try:
        from bulk_sync import serve as server
    except ImportError as exc:
        raise CliError(
            f"serve needs the serve extra ({exc.name} is missing): pip install 'bulk-sync[serve]'",
            EXIT_BAD_INPUT,
        ) from exc
    try:
        settings = server.Settings.from_env()
    except ValueError as exc:
        raise CliError(f"refusing to start: {exc}", EXIT_BAD_INPUT) from exc
    problem = server.startup_problem(settings, host)
    if problem:
        raise CliError(f"refusing to start: {problem}", EXIT_BAD_INPUT)
    server.run(_settings(ctx).url(), host, port, workers, pool_size, access_log)


@main.group()
def db() -> None:
    """The embedded default database."""


@db.command(name="url")
def db_url() -> None:
    """Print the embedded default's URL (starting it if needed)."""
    click.echo(embedded.ensure_running())


@db.command(name="stop")
def db_stop() -> None:
    """Stop the embedded default database."""
    stopped = embedded.stop()
    if stopped:
        click.echo(f"stopped the embedded database in {', '.join(map(str, stopped))}")
    else:
        click.echo(f"the embedded database in {embedded.home()} is not running")


def _server_version(conn: psycopg.Connection) -> str:
    """The connected server's version as it reports it (``18.6``)."""
    reported = conn.info.parameter_status("server_version") or "unknown"
    return reported.split()[0]


def _describe(settings: Settings, version: str) -> str:
    """Which database a command used, and which PostgreSQL serves it."""
    running = embedded.current()
    if running is not None and settings.url() == embedded.url():
        server = running.server
        return (
            f"embedded default in {running.datadir}: PostgreSQL {version} {server.source}"
            f" ({server.bindir})"
        )
    info = conninfo_to_dict(settings.url())
    host = info.get("host") or "localhost"
    return f"{info.get('dbname') or '(default)'} on {host}: PostgreSQL {version}"


@main.command()
@click.pass_context
def demo(ctx: click.Context) -> None:
    """Run the seed's example: totals and leaderboard.

    Migrates, loads the seed's three example actions (idempotent by action_id), and prints
    the global total, each seed user's total and the leaderboard.
    """
    settings = _settings(ctx)
    url = settings.url()
    seed = paths.seed_actions_file()
    run_migrate(url)
    with open(seed, "rb") as handle:
        loaded = backfill(url, handle, name=str(seed), fmt="json")
    with open(seed, "rb") as handle:
        users = sorted({action["user_id"] for action in loads(handle.read())["actions"]})
    with connect(url) as conn:
        version = _server_version(conn)
        total = conn.execute(
            "SELECT total_lbs_saved::text FROM bulk_sync.global_emissions WHERE id = 1"
        ).fetchone()[0]
        per_user = dict(
            conn.execute(
                "SELECT user_id::text, total_emissions_lbs::text FROM bulk_sync.user_stats"
                " WHERE user_id = ANY(%s::uuid[])",
                (users,),
            ).fetchall()
        )
    click.echo(f"database: {_describe(settings, version)}")
    click.echo(f"loaded {loaded['rows']} seed actions from {seed.name} (idempotent by action_id)")
    click.echo("")
    click.echo(f"global total lbs: {total}")
    click.echo("user totals:")
    for user in users:
        click.echo(f"  {user}  {per_user.get(user, '0.000000')}")
    click.echo("")
    click.echo("leaderboard:")
    _print_table(_leaderboard_rows(url, 10, None))


if __name__ == "__main__":  # pragma: no cover
    main(prog_name="bulk-sync")
