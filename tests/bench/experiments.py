#!/usr/bin/env python3
"""What bounds the targets that run.py reports as not met: the experiments of docs/PERFORMANCE.md.

    python3 tests/bench/experiments.py [--quick] [--only 1,2,3,4]

Like run.py it creates its own throwaway cluster (same settings) and measures every variant beside
its baseline in the same run. Nothing here changes the project: variants live in a scratch schema
``lab`` of a throwaway database, or differ only by a session setting.

    E1  log_action's cost per call (backend CPU ms, and pgbench TPS at 1 and 32 clients) against a
        plain INSERT: as shipped; as shipped with plan_cache_mode=force_generic_plan; and "lean", a
        PL/pgSQL function that does the same writes directly (action row, user_stats upsert, one
        slot, the slots' sum, one outbox event, the JSON response) on LIKE-copies of the tables,
        without the statement trigger and its arrays.
    E2  file backfill: a typed COPY stage applied with INSERT ... SELECT through the same triggers
        (10,000 and 50,000 rows per statement) against psql \\copy of the same file; the cost of
        each statement inside one 10,000-action bulk_backfill call on that ledger (auto_explain);
        bulk_backfill with custom and with generic plans.
    E3  a resubmitted 10,000-action batch (a backfill run again) on ledgers of 1,000,000 and
        5,000,000 actions: the known-facts check as a plain join and as one index lookup per
        action (LATERAL ... LIMIT 1).
    E4  reconcile's one-snapshot scan with a hash full join, with a merge join, and as one
        aggregate over actions UNION ALL user_stats, against the bare SELECT sum with and without
        parallel workers; the shipped check (eight user_id ranges under a Parallel Append); and
        bulk_sync.reconcile() itself.

Exactness is checked after each experiment that writes to the ledger, as in run.py.
"""

from __future__ import annotations

import argparse
import os
import random
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import run as bench  # tests/bench/run.py: the cluster, the data, the checks

LEAN_SQL = """
CREATE SCHEMA lab;
CREATE TABLE lab.user_actions (LIKE bulk_sync.user_actions INCLUDING ALL);
CREATE TABLE lab.user_stats (LIKE bulk_sync.user_stats INCLUDING ALL);
CREATE TABLE lab.slots (LIKE bulk_sync._global_slots INCLUDING ALL) WITH (fillfactor = 20);
CREATE TABLE lab.outbox (LIKE bulk_sync._event_outbox INCLUDING ALL);
INSERT INTO lab.user_actions SELECT * FROM bulk_sync.user_actions;
INSERT INTO lab.user_stats
       (user_id, total_emissions_lbs, action_count, last_action_at, last_updated)
SELECT user_id, total_emissions_lbs, action_count, last_action_at, last_updated
  FROM bulk_sync.user_stats;
INSERT INTO lab.slots SELECT * FROM bulk_sync._global_slots;

-- The same checks, writes and response as bulk_sync.log_action for a new action, written
-- directly: no statement trigger, no arrays, no second read of the slots.
CREATE FUNCTION lab.log_action(p_action_id uuid, p_user_id uuid, p_lbs numeric,
                               p_logged_at timestamptz, p_verified boolean DEFAULT false,
                               p_metadata jsonb DEFAULT '{}')
RETURNS jsonb
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = bulk_sync, pg_catalog, pg_temp
AS $$
DECLARE
    v_lbs     numeric(30,6);
    v_total   numeric;
    v_count   integer;
    v_global  numeric;
BEGIN
    IF p_action_id IS NULL OR p_user_id IS NULL OR p_verified IS NULL THEN
        RAISE EXCEPTION 'log_action: a required argument is null' USING ERRCODE = 'BS001';
    END IF;
    IF jsonb_typeof(coalesce(p_metadata, '{}')) <> 'object' THEN
        RAISE EXCEPTION 'log_action: metadata must be a JSON object' USING ERRCODE = 'BS001';
    END IF;
    IF bulk_sync._lbs_problem(p_lbs) IS NOT NULL
       OR bulk_sync._logged_at_problem(p_logged_at) IS NOT NULL THEN
        RAISE EXCEPTION 'log_action: invalid lbs or logged_at' USING ERRCODE = 'BS001';
    END IF;
    v_lbs := p_lbs;
    INSERT INTO lab.user_actions AS a
           (action_id, user_id, emissions_saved_lbs, verified, logged_at, metadata, verified_at)
    VALUES (p_action_id, p_user_id, v_lbs, p_verified, p_logged_at, coalesce(p_metadata, '{}'),
            CASE WHEN p_verified THEN now() END)
        ON CONFLICT (action_id) DO NOTHING;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'lab.log_action only measures new actions';
    END IF;
    IF p_verified THEN
        INSERT INTO lab.user_stats AS s
               (user_id, total_emissions_lbs, action_count, last_action_at, last_updated)
        VALUES (p_user_id, v_lbs, 1, p_logged_at, now())
            ON CONFLICT (user_id) DO UPDATE
           SET total_emissions_lbs = s.total_emissions_lbs + excluded.total_emissions_lbs,
               action_count        = s.action_count + 1,
               last_action_at      = greatest(s.last_action_at, excluded.last_action_at),
               last_updated        = excluded.last_updated
        RETURNING s.total_emissions_lbs, s.action_count INTO v_total, v_count;
        UPDATE lab.slots SET total_lbs = total_lbs + v_lbs, last_updated = now()
         WHERE slot = pg_backend_pid() % 64;
    ELSE
        SELECT s.total_emissions_lbs, s.action_count INTO v_total, v_count
          FROM lab.user_stats AS s WHERE s.user_id = p_user_id;
    END IF;
    SELECT sum(g.total_lbs) INTO v_global FROM lab.slots AS g;
    IF p_verified THEN
        INSERT INTO lab.outbox (events, event_count, global_total)
        VALUES (ARRAY[('logged', p_user_id, p_action_id, v_total, v_count)::bulk_sync._user_event],
                1, v_global);
    END IF;
    RETURN jsonb_build_object(
        'success', true, 'status', 'inserted', 'action_id', p_action_id, 'user_id', p_user_id,
        'emissions_lbs', bulk_sync._amount(v_lbs),
        'user_total_lbs', bulk_sync._amount(coalesce(v_total, 0)),
        'global_total_lbs', bulk_sync._amount(v_global),
        'is_duplicate', false, 'message', 'Emission logged successfully',
        'timestamp', bulk_sync._iso(now()));
END
$$;
"""


def backend_cpu_ms(url: str, sql: str, calls: int, setting: str | None = None) -> float:
    """CPU time (user + system) the server backend spends per statement, from /proc."""
    with bench.connect(url) as conn:
        if setting:
            conn.execute(setting)
        pid = conn.execute("SELECT pg_backend_pid()").fetchone()[0]
        tick = os.sysconf("SC_CLK_TCK")

        def cpu() -> float:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            return (int(fields[11]) + int(fields[12])) / tick

        for _ in range(50):
            conn.execute(sql)
        start = cpu()
        for _ in range(calls):
            conn.execute(sql)
        return 1000 * (cpu() - start) / calls


def e1(cluster: bench.Cluster, sizes: bench.Sizes, report: bench.Report, calls: int) -> None:
    bench.say(f"\n== E1 log_action's cost per call ({sizes.t1_users:,} users)")
    url = bench.create_db(cluster, "e1")
    users = sizes.t1_users
    bench.execute(
        url,
        f"""
        INSERT INTO bulk_sync.user_actions
               (action_id, user_id, emissions_saved_lbs, verified, verified_at, logged_at)
        SELECT gen_random_uuid(), {bench.user_sql("u")}, 1.000001, true, now(),
               now() - interval '1 day'
          FROM generate_series(1, {users}) AS u
        """,
        "CREATE SCHEMA bench",
        "CREATE TABLE bench.plain_actions (LIKE bulk_sync.user_actions INCLUDING ALL)",
        "INSERT INTO bench.plain_actions SELECT * FROM bulk_sync.user_actions",
        LEAN_SQL,
        "VACUUM ANALYZE",
    )
    user = bench.user_sql("(random() * 99999)::int % " + str(users) + " + 1")
    columns = "(action_id, user_id, emissions_saved_lbs, verified, logged_at, verified_at)"
    args = f"(gen_random_uuid(), {user}, 12.345678, now(), true)"
    single = {
        "plain INSERT": f"INSERT INTO bench.plain_actions {columns} VALUES "
        f"(gen_random_uuid(), {user}, 12.345678, true, now(), now())",
        "log_action": f"SELECT bulk_sync.log_action{args}",
        "log_action, session generic plans": f"SELECT bulk_sync.log_action{args}",
        "lean log_action (lab)": f"SELECT lab.log_action{args}",
    }
    generic = "SET plan_cache_mode = force_generic_plan"
    cpu = {
        name: backend_cpu_ms(url, sql, calls, generic if "generic" in name else None)
        for name, sql in single.items()
    }
    sent_calls = (calls + 50) * 2  # log_action, as shipped and with generic plans

    scripts = bench.pgbench_scripts("12.345678")
    paths = {
        "plain INSERT": scripts["plain INSERT"],
        "log_action": scripts["log_action"],
        "log_action, session generic plans": scripts["log_action"],
        "lean log_action (lab)": scripts["log_action"].replace(
            "bulk_sync.log_action", "lab.log_action"
        ),
    }
    files = {}
    for i, (name, text) in enumerate(paths.items()):
        files[name] = cluster.workdir / f"e1-{i}.sql"
        files[name].write_text(text)
    tps: dict[tuple[str, int], list[float]] = {}
    pgbench_calls = 0
    for clients in (1, max(sizes.clients)):
        for _ in range(sizes.pgbench_rounds):
            for name, path in files.items():
                bench.execute(url, "CHECKPOINT")
                env = (
                    {"PGOPTIONS": "-c plan_cache_mode=force_generic_plan"}
                    if "generic" in name
                    else {}
                )
                result = run_pgbench_env(
                    cluster, "e1", path, clients, sizes.pgbench_seconds, users, env
                )
                tps.setdefault((name, clients), []).append(result.tps)
                if name.startswith("log_action"):
                    pgbench_calls += result.transactions
                bench.say(f"  {clients:>2} clients: {name:<28} {result.tps:>10,.0f} tps")
    # log_action's ledger: the preloaded actions (1.000001 each) plus every call (12.345678).
    sent = users * 1_000_001 + (sent_calls + pgbench_calls) * 12_345_678
    bench.check_ledger(
        report, url, "E1 log_action", bench.amount(sent), users + sent_calls + pgbench_calls
    )

    plain_cpu = cpu["plain INSERT"]
    for name in single:
        row = [f"{cpu[name]:.3f} ms CPU/call ({cpu[name] / plain_cpu:.1f}x plain)"]
        for clients in (1, max(sizes.clients)):
            ours = statistics.median(tps[(name, clients)])
            plain = statistics.median(tps[("plain INSERT", clients)])
            row.append(f"{clients} clients {ours:,.0f} tps (ratio {ours / plain:.2f})")
        report.add(bench.Row("E1", name, "; ".join(row)))


def run_pgbench_env(
    cluster: bench.Cluster,
    dbname: str,
    script: Path,
    clients: int,
    seconds: int,
    users: int,
    env: dict[str, str],
) -> bench.PgbenchResult:
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        return bench.run_pgbench(cluster, dbname, script, clients, seconds, users)
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def statement_durations(
    url: str, body: str, call: str = bench.CALL_BATCH
) -> list[tuple[float, str]]:
    """(ms, first line) of every statement auto_explain logged inside one bulk_backfill call."""
    with bench.connect(url, autocommit=False) as conn:
        collector = bench.PlanCollector(conn)
        conn.execute(call, (body,)).fetchone()
        conn.commit()
        plans = collector.take()
    out = []
    for plan in plans:
        match = re.match(r"duration: ([0-9.]+) ms", plan)
        text = re.search(r"Query Text: (.*)", plan)
        if match and text:
            first = " ".join(text.group(1).split())[:90]
            out.append((float(match.group(1)), first))
    return out


def typed_stage(cluster: bench.Cluster, name: str, csv: Path, rows: int, batch: int) -> float:
    """COPY the CSV into a typed stage, then INSERT ... SELECT it through the triggers; seconds."""
    url = bench.create_db(cluster, name)
    bench.execute(
        url,
        """CREATE UNLOGGED TABLE public.stage (
               n bigint GENERATED ALWAYS AS IDENTITY, action_id uuid, user_id uuid,
               lbs numeric, logged_at timestamptz, verified boolean)""",
        "CHECKPOINT",
    )
    columns = "(action_id, user_id, lbs, logged_at, verified)"
    start = time.perf_counter()
    bench.run_copy(cluster, name, "public.stage", csv, columns)
    with bench.connect(url, autocommit=False) as conn:
        for first in range(1, rows + 1, batch):
            conn.execute(
                """
                INSERT INTO bulk_sync.user_actions
                       (action_id, user_id, emissions_saved_lbs, verified, verified_at, logged_at)
                SELECT s.action_id, s.user_id, s.lbs, s.verified,
                       CASE WHEN s.verified THEN now() END, s.logged_at
                  FROM public.stage AS s
                 WHERE s.n BETWEEN %s AND %s
                 ORDER BY s.action_id
                    ON CONFLICT (action_id) DO NOTHING
                """,
                (first, first + batch - 1),
            )
            conn.commit()
    return time.perf_counter() - start


def e2(cluster: bench.Cluster, sizes: bench.Sizes, report: bench.Report) -> None:
    bench.say(
        f"\n== E2 file backfill: a typed COPY stage; where one batch's time goes "
        f"({sizes.csv_rows:,} rows)"
    )
    csv = cluster.workdir / "e2.csv"
    rows = sizes.csv_rows
    micro, counted, every = bench.write_csv(csv, rows, sizes.csv_users, 2)
    url = bench.create_db(cluster, "e2_copy")
    bench.execute(
        url,
        "CREATE TABLE public.copy_actions (LIKE bulk_sync.user_actions INCLUDING ALL)",
        "CHECKPOINT",
    )
    copy_rate = rows / bench.run_copy(cluster, "e2_copy", "public.copy_actions", csv)
    bench.check_table(report, url, "E2 \\copy", "public.copy_actions", bench.amount(every), rows)
    for batch in (10_000, 50_000):
        name = f"e2_stage_{batch}"
        seconds = typed_stage(cluster, name, csv, rows, batch)
        bench.check_ledger(
            report, cluster.url(name), f"E2 typed stage {batch:,}", bench.amount(micro), counted
        )
        report.add(
            bench.Row(
                "E2",
                f"typed COPY stage + INSERT ... SELECT per {batch:,} rows (same triggers)",
                f"{rows / seconds:,.0f} rows/s",
                f"\\copy {copy_rate:,.0f} rows/s",
                rows / seconds / copy_rate,
            )
        )

    # One bulk_backfill call on this ledger, statement by statement; then generic plans.
    url = cluster.url("e2_stage_10000")
    bench.execute(url, "VACUUM ANALYZE")
    rng = random.Random(5)
    body, sent = bench.make_batch(rng, sizes.batch_actions, sizes.csv_users)
    durations = statement_durations(url, body)
    bench.say(
        f"  one {sizes.batch_actions:,}-action bulk_backfill call on a ledger of {rows:,}: "
        "statements over 5 ms (auto_explain, nested; the last is the call itself)"
    )
    for ms, text in durations:
        if ms >= 5:
            bench.say(f"    {ms:>9.1f} ms  {text}")
    calls = 1
    times: dict[str, list[float]] = {"custom": [], "generic": []}
    with bench.connect(url, autocommit=False) as default, bench.connect(url, False) as generic:
        generic.execute("SET plan_cache_mode = force_generic_plan")
        generic.commit()
        for _ in range(sizes.batch_repeats + 1):
            for label, conn in (("custom", default), ("generic", generic)):
                body, micro_batch = bench.make_batch(rng, sizes.batch_actions, sizes.csv_users)
                seconds, _ = bench.timed(
                    lambda conn=conn, body=body: (
                        conn.execute(bench.CALL_BATCH, (body,)).fetchone(),
                        conn.commit(),
                    )
                )
                times[label].append(seconds)
                sent += micro_batch
                calls += 1
    for label, values in times.items():
        report.add(
            bench.Row(
                "E2",
                f"bulk_backfill {sizes.batch_actions:,} actions, plan_cache_mode {label} "
                "(first call dropped)",
                bench.fmt_ms(statistics.median(values[1:])),
                ", ".join(bench.fmt_ms(t) for t in values),
            )
        )
    bench.check_ledger(
        report,
        url,
        "E2 after the bulk_backfill calls",
        bench.amount(micro + sent),
        counted + calls * sizes.batch_actions,
    )


FACTS_JOIN = "JOIN bulk_sync.user_actions AS a ON a.action_id = r.action_id"
FACTS_LATERAL = (
    "CROSS JOIN LATERAL (SELECT x.user_id, x.emissions_saved_lbs, x.logged_at"
    " FROM bulk_sync.user_actions AS x WHERE x.action_id = r.action_id LIMIT 1) AS a"
)


def e3(cluster: bench.Cluster, sizes: bench.Sizes, report: bench.Report) -> None:
    """A resubmitted batch (a backfill run again): every action is known, so bulk_backfill
    compares the batch's facts with the stored ones: with a plain join (which the planner may
    turn into a hash join over all of user_actions) and with one index lookup per action
    (LATERAL ... LIMIT 1). Whichever of the two db/220 ships is "as shipped"; the other is
    installed as lab.bulk_backfill in the throwaway database."""
    source = (bench.REPO_ROOT / "db" / "220_bulk_backfill.sql").read_text()
    header = "CREATE OR REPLACE FUNCTION bulk_sync.bulk_backfill("
    lateral = re.search(r"CROSS JOIN LATERAL \(SELECT x\.user_id.*?LIMIT 1\) AS a", source, re.S)
    if header not in source or not (lateral or FACTS_JOIN in source):
        raise RuntimeError("db/220_bulk_backfill.sql changed: the known-facts check is not found")
    if lateral:
        other, other_label = source.replace(lateral.group(0), FACTS_JOIN), "plain JOIN"
        shipped_label = "as shipped (LATERAL ... LIMIT 1)"
    else:
        other, other_label = source.replace(FACTS_JOIN, FACTS_LATERAL), "LATERAL ... LIMIT 1"
        shipped_label = "as shipped (plain JOIN)"
    variant = other.replace(header, "CREATE OR REPLACE FUNCTION lab.bulk_backfill(").replace(
        "COMMENT ON FUNCTION bulk_sync.bulk_backfill(", "COMMENT ON FUNCTION lab.bulk_backfill("
    )
    calls = {
        shipped_label: bench.CALL_BATCH,
        other_label: "SELECT lab.bulk_backfill(%s::jsonb)",
    }
    for actions, users in (
        (sizes.csv_rows, sizes.csv_users),
        (sizes.ledger_actions, sizes.ledger_users),
    ):
        bench.say(
            f"\n== E3 a resubmitted {sizes.batch_actions:,}-action batch on a ledger of "
            f"{actions:,}: {shipped_label} vs {other_label}"
        )
        name = f"e3_{actions}"
        url = bench.create_db(cluster, name)
        micro, counted = bench.load_ledger(url, actions, users)
        bench.execute(url, "CREATE SCHEMA lab", variant)
        rng = random.Random(7)
        batches = []
        with bench.connect(url, autocommit=False) as conn:
            for _ in range(sizes.batch_repeats + 1):
                body, batch_micro = bench.make_batch(rng, sizes.batch_actions, users)
                conn.execute(bench.CALL_BATCH, (body,)).fetchone()
                conn.commit()
                batches.append(body)
                micro += batch_micro
                counted += sizes.batch_actions
        bench.execute(url, "VACUUM ANALYZE", "CHECKPOINT")
        times: dict[str, list[float]] = {}
        with bench.connect(url, autocommit=False) as conn:
            for i, body in enumerate(batches):  # interleaved; the first round is a warm-up
                for label, call in calls.items():
                    seconds, result = bench.timed(
                        lambda conn=conn, body=body, call=call: (
                            conn.execute(call, (body,)).fetchone()[0],
                            conn.commit(),
                        )[0]
                    )
                    if result["skipped_count"] != sizes.batch_actions:
                        raise RuntimeError(f"expected a batch of duplicates: {result}")
                    if i:
                        times.setdefault(label, []).append(seconds)
        facts: dict[str, list[float]] = {}
        for label, call in calls.items():
            facts[label] = [
                ms
                for ms, text in statement_durations(url, batches[0], call)
                if "r.idx, r.action_id, r.user_id, r.lbs, r.logged_at" in text
            ]
            alone = ", ".join(f"{ms:.1f} ms" for ms in facts[label])
            bench.say(
                f"  {label}: {', '.join(bench.fmt_ms(t) for t in times[label])}; the known-facts "
                f"statement alone (auto_explain): {alone}"
            )
        base = statistics.median(times[shipped_label])
        for label, values in times.items():
            report.add(
                bench.Row(
                    "E3",
                    f"resubmitted {sizes.batch_actions:,} on {actions:,}: {label}",
                    f"{bench.fmt_ms(statistics.median(values))} (facts check "
                    f"{', '.join(f'{ms:.0f} ms' for ms in facts[label])})",
                    f"as shipped {bench.fmt_ms(base)}",
                    statistics.median(values) / base,
                )
            )
        bench.check_ledger(report, url, f"E3 ledger of {actions:,}", bench.amount(micro), counted)
        bench.execute(cluster.url("postgres"), f"DROP DATABASE {name}")


def e4(cluster: bench.Cluster, sizes: bench.Sizes, report: bench.Report) -> None:
    bench.say(
        f"\n== E4 reconcile's scan ({sizes.ledger_actions:,} actions, {sizes.ledger_users:,} users)"
    )
    url = bench.create_db(cluster, "e4")
    micro, counted = bench.load_ledger(url, sizes.ledger_actions, sizes.ledger_users)
    bench.execute(url, "VACUUM ANALYZE", "CHECKPOINT")
    bench.check_ledger(report, url, "E4 ledger", bench.amount(micro), counted)
    bare = (
        "SELECT sum(emissions_saved_lbs) FROM bulk_sync.user_actions WHERE verified AND NOT revoked"
    )
    scan = """
        WITH truth AS (
            SELECT a.user_id, sum(a.emissions_saved_lbs) AS total, count(*) AS n,
                   max(a.logged_at) AS last_at
              FROM bulk_sync.user_actions AS a
             WHERE a.verified AND NOT a.revoked
             GROUP BY a.user_id
        ), compared AS (
            SELECT coalesce(t.user_id, s.user_id) AS user_id, coalesce(t.total, 0) AS total,
                   (coalesce(t.total, 0), coalesce(t.n, 0), t.last_at) IS DISTINCT FROM
                   (coalesce(s.total_emissions_lbs, 0), coalesce(s.action_count, 0),
                    s.last_action_at) AS drifted
              FROM truth AS t
              FULL JOIN bulk_sync.user_stats AS s ON s.user_id = t.user_id
        )
        SELECT coalesce(sum(c.total), 0),
               array_agg(c.user_id ORDER BY c.user_id) FILTER (WHERE c.drifted)
          FROM compared AS c
    """
    one_pass = """
        SELECT coalesce(sum(g.a_total), 0),
               array_agg(g.user_id ORDER BY g.user_id) FILTER (WHERE g.drifted)
          FROM (
              SELECT u.user_id,
                     sum(u.lbs) FILTER (WHERE u.is_action) AS a_total,
                     (coalesce(sum(u.lbs) FILTER (WHERE u.is_action), 0),
                      count(*) FILTER (WHERE u.is_action),
                      max(u.at) FILTER (WHERE u.is_action))
                     IS DISTINCT FROM
                     (coalesce(sum(u.lbs) FILTER (WHERE NOT u.is_action), 0),
                      coalesce(sum(u.n) FILTER (WHERE NOT u.is_action), 0),
                      max(u.at) FILTER (WHERE NOT u.is_action)) AS drifted
                FROM (SELECT a.user_id, a.emissions_saved_lbs AS lbs, 1 AS n, a.logged_at AS at,
                             true AS is_action
                        FROM bulk_sync.user_actions AS a
                       WHERE a.verified AND NOT a.revoked
                      UNION ALL
                      SELECT s.user_id, s.total_emissions_lbs, s.action_count, s.last_action_at,
                             false
                        FROM bulk_sync.user_stats AS s) AS u
               GROUP BY u.user_id
          ) AS g
    """
    aggregate_only = (
        "SELECT count(*) FROM (SELECT a.user_id, sum(a.emissions_saved_lbs), count(*),"
        " max(a.logged_at) FROM bulk_sync.user_actions AS a"
        " WHERE a.verified AND NOT a.revoked GROUP BY a.user_id) AS g"
    )
    variants: list[tuple[str, str, list[str]]] = [
        ("bare SELECT sum (parallel allowed)", bare, []),
        ("bare SELECT sum, no parallel workers", bare, ["SET max_parallel_workers_per_gather = 0"]),
        (
            "per-user GROUP BY only (sum, count, max), serial",
            aggregate_only,
            ["SET max_parallel_workers_per_gather = 0"],
        ),
        (
            "reconcile's scan, hash full join, serial",
            scan,
            ["SET max_parallel_workers_per_gather = 0", "SET enable_hashjoin = on"],
        ),
        (
            "reconcile's scan, merge join, serial",
            scan,
            ["SET max_parallel_workers_per_gather = 0", "SET enable_hashjoin = off"],
        ),
        (
            "one aggregate over actions UNION ALL user_stats, serial",
            one_pass,
            ["SET max_parallel_workers_per_gather = 0"],
        ),
        ("one aggregate over actions UNION ALL user_stats, parallel allowed", one_pass, []),
        ("reconcile's scan, hash full join, parallel allowed", scan, ["SET enable_hashjoin = on"]),
        ("reconcile's scan, merge join, parallel allowed", scan, ["SET enable_hashjoin = off"]),
        (
            "the shipped check: eight user_id ranges, Parallel Append",
            "SELECT * FROM bulk_sync._compare_all_users()",
            [],
        ),
        ("bulk_sync.reconcile() itself", "SELECT bulk_sync.reconcile('{}')", []),
    ]
    times: dict[str, float] = {}
    for name, sql, settings in variants:
        with bench.connect(url) as conn:
            for setting in settings:
                conn.execute(setting)
            conn.execute(sql).fetchall()
            runs = [
                bench.timed(lambda sql=sql, conn=conn: conn.execute(sql).fetchall())[0]
                for _ in range(sizes.query_repeats)
            ]
            plan = "\n".join(r[0] for r in conn.execute("EXPLAIN (ANALYZE, COSTS OFF) " + sql))
        times[name] = statistics.median(runs)
        bench.say(f"  {name}: {', '.join(bench.fmt_ms(t) for t in runs)}")
        bench.say(bench.indent(plan, "      "))
    base = times["bare SELECT sum (parallel allowed)"]
    for name, seconds in times.items():
        report.add(
            bench.Row(
                "E4", name, bench.fmt_ms(seconds), f"bare sum {bench.fmt_ms(base)}", seconds / base
            )
        )
    bench.check_ledger(report, url, "E4 after reconcile", bench.amount(micro), counted)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--scale", type=float, default=1.0)
    parser.add_argument("--only", default="1,2,3,4")
    parser.add_argument("--calls", type=int, default=3000, help="E1: calls per CPU measurement")
    args = parser.parse_args(argv)
    sizes = (bench.QUICK if args.quick else bench.Sizes()).scaled(args.scale)
    only = {int(x) for x in args.only.split(",") if x.strip()}
    report = bench.Report()

    def interrupted(signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    import signal

    signal.signal(signal.SIGTERM, interrupted)
    signal.signal(signal.SIGINT, interrupted)
    try:
        with bench.cluster_for(bench.SERVER_SETTINGS, keep=False) as cluster:
            bench.say(f"experiments on {os.cpu_count()} CPUs, load average {bench.loadavg()}")
            bench.execute(cluster.url("postgres"), "CREATE DATABASE bench_template")
            bench.migrate(cluster.url("bench_template"))
            if 1 in only:
                e1(cluster, sizes, report, 300 if args.quick else args.calls)
            if 2 in only:
                e2(cluster, sizes, report)
            if 3 in only:
                e3(cluster, sizes, report)
            if 4 in only:
                e4(cluster, sizes, report)
    except KeyboardInterrupt:
        print("interrupted; the cluster was stopped", file=sys.stderr)
        return 130
    except (RuntimeError, subprocess.CalledProcessError, bench.psycopg.Error) as exc:
        print(f"experiments failed: {exc}", file=sys.stderr)
        return 3
    bench.say(f"\n== experiments (load average at the end {bench.loadavg()})")
    bench.say(report.table())
    bench.say(f"exact: {'yes' if report.exact else 'NO'} ({len(report.checks)} checks)")
    return 0 if report.exact else 1


if __name__ == "__main__":
    sys.exit(main())
