"""Dashboard read-side benchmark: analytics and the log on a big verification history.

    uv run python bench/insight.py                   # 5,000,000 events, 90 days, 200 groups
    uv run python bench/insight.py --events 500000   # a quicker look

Creates its own PostgreSQL database (kept with --keep, else dropped), fills it through the
ingestion code (ingest.ingest, the same path as POST /bot/verifications, so rollups and sketches
are built as in production), starts channelgate with one uvicorn worker, and times each endpoint
from a separate process next to the same answer computed by a plain SQL query over the raw
table, in the same run.
"""

import argparse
import asyncio
import os
import random
import statistics
import subprocess
import sys
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import httpx

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
sys.path.insert(0, str(ROOT))

from bench.run import running  # noqa: E402

SECRET = "bench-secret-bench-secret-bench-secret"


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


async def fill(url: str, events: int, groups: int, days: int, seed: int) -> None:
    from analytics import fold_everything
    from db import Database
    from ingest import ingest
    from models import Channel, Group, GroupChannel, VerificationIn
    from settings import Settings

    rng = random.Random(seed)
    db = Database(Settings(_env_file=None, database_url=url))  # pyrefly: ignore[unexpected-keyword]
    group_ids = [-1005000000000 - i for i in range(groups)]
    channel_ids = [-1006000000000 - i for i in range(groups // 2)]
    async with db.sessionmaker() as session:
        channels = [
            Channel.model_validate({"chat_id": c, "title": f"Channel {i}"})
            for i, c in enumerate(channel_ids)
        ]
        rows = [
            Group.model_validate({"chat_id": g, "title": f"Group {i}"})
            for i, g in enumerate(group_ids)
        ]
        session.add_all([*channels, *rows])
        await session.flush()
        for group in rows:
            for position, channel in enumerate(rng.sample(channels, rng.randint(1, 3))):
                assert group.id is not None and channel.id is not None
                session.add(
                    GroupChannel(group_id=group.id, channel_id=channel.id, position=position)
                )
        await session.commit()

    # Busy groups and quiet ones (Zipf-like), each with its own population of users.
    weights = [1 / (i + 1) ** 0.8 for i in range(groups)]
    populations = {g: [rng.randint(1, 2**40 - 1) for _ in range(3000)] for g in group_ids}
    now = datetime.now(UTC)
    done, batch_size, started = 0, 5000, time.perf_counter()
    # In time order, as bots report them: each batch covers a short slice of the 90 days.
    slice_seconds = days * 86400 * batch_size / events
    while done < events:
        batch = []
        slice_start = (
            now - timedelta(days=days) + timedelta(seconds=done / batch_size * slice_seconds)
        )
        for _ in range(min(batch_size, events - done)):
            group = rng.choices(group_ids, weights)[0]
            roll = rng.random()
            result = "error" if roll < 0.02 else "blocked" if roll < 0.22 else "passed"
            cached = result == "passed" and rng.random() < 0.5
            batch.append(
                VerificationIn.model_construct(
                    event_id=uuid.UUID(int=rng.getrandbits(128), version=4),
                    chat_id=group,
                    user_id=rng.choice(populations[group]),
                    result=result,
                    trigger="message",
                    missing_channel_ids=[rng.choice(channel_ids)] if result == "blocked" else [],
                    cached=cached,
                    latency_ms=2 if cached else int(rng.lognormvariate(4.5, 0.8)),
                    error="timeout" if result == "error" else None,
                    occurred_at=slice_start + timedelta(seconds=rng.random() * slice_seconds),
                )
            )
        async with db.sessionmaker() as session:
            await ingest(session, batch)
            await session.commit()
        done += len(batch)
        rate = done / (time.perf_counter() - started)
        print(f"\r{done:,}/{events:,} events ({rate:,.0f}/s)", end="", file=sys.stderr)
    print(file=sys.stderr)
    started = time.perf_counter()
    folded = await fold_everything(db)
    log(f"folded {folded:,} delta rows in {time.perf_counter() - started:.1f} s")
    await db.dispose()


def timed(call: Any, repeat: int) -> dict[str, float]:
    call()  # warm
    samples = []
    for _ in range(repeat):
        started = time.perf_counter()
        response = call()
        samples.append((time.perf_counter() - started) * 1000)
        if response.status_code != 200:  # a timed refusal would be no figure at all
            raise SystemExit(f"{response.request.url}: {response.status_code} {response.text}")
    samples.sort()
    return {
        "p50": statistics.median(samples),
        "p95": samples[min(len(samples) - 1, round(0.95 * (len(samples) - 1)))],
    }


BUSIEST = -1005000000000  # the first of fill()'s groups, the busiest (Zipf-like weights)
RAW_SQL = {
    "summary": """
        SELECT count(*), count(*) FILTER (WHERE result = 'passed'),
               count(*) FILTER (WHERE result = 'blocked'), count(*) FILTER (WHERE result = 'error'),
               count(*) FILTER (WHERE cached), count(DISTINCT user_id), count(DISTINCT chat_id),
               percentile_cont(0.5) WITHIN GROUP (ORDER BY latency_ms),
               percentile_cont(0.95) WITHIN GROUP (ORDER BY latency_ms)
        FROM verifications WHERE occurred_at >= $1 AND occurred_at < $2""",
    "timeseries_hour": """
        SELECT date_trunc('hour', occurred_at) AS t, count(*),
               count(*) FILTER (WHERE result = 'passed'),
               count(*) FILTER (WHERE result = 'blocked'),
               count(*) FILTER (WHERE result = 'error')
        FROM verifications WHERE occurred_at >= $1 AND occurred_at < $2 GROUP BY 1 ORDER BY 1""",
    "timeseries_day": """
        SELECT date_trunc('day', occurred_at) AS t, count(*),
               count(*) FILTER (WHERE result = 'passed'),
               count(*) FILTER (WHERE result = 'blocked'),
               count(*) FILTER (WHERE result = 'error')
        FROM verifications WHERE occurred_at >= $1 AND occurred_at < $2 GROUP BY 1 ORDER BY 1""",
    "top_groups": """
        SELECT chat_id, count(*) AS checks, count(*) FILTER (WHERE result = 'blocked')
        FROM verifications WHERE occurred_at >= $1 AND occurred_at < $2
        GROUP BY chat_id ORDER BY checks DESC LIMIT 10""",
    "log_first": """
        SELECT * FROM verifications ORDER BY occurred_at DESC, id DESC LIMIT 50""",
    "log_deep": """
        SELECT * FROM verifications ORDER BY occurred_at DESC, id DESC OFFSET 100000 LIMIT 50""",
    "log_group": f"""
        SELECT * FROM verifications WHERE chat_id = {BUSIEST}
        ORDER BY occurred_at DESC, id DESC LIMIT 50""",  # noqa: S608
    "log_window": """
        SELECT * FROM verifications WHERE occurred_at >= $1 AND occurred_at < $2
        ORDER BY occurred_at DESC, id DESC LIMIT 50""",
    "export_group_day": f"""
        SELECT * FROM verifications WHERE chat_id = {BUSIEST}
        AND occurred_at >= $1 AND occurred_at < $2 ORDER BY occurred_at DESC, id DESC""",  # noqa: S608
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--admin-url", default="postgresql://postgres@127.0.0.1:5432/postgres")
    parser.add_argument("--events", type=int, default=5_000_000)
    parser.add_argument("--groups", type=int, default=200)
    parser.add_argument("--days", type=int, default=90)
    parser.add_argument("--repeat", type=int, default=30, help="timed requests per endpoint")
    parser.add_argument("--raw-repeat", type=int, default=5, help="timed raw SQL runs")
    parser.add_argument("--database", help="reuse this database (already filled)")
    parser.add_argument("--keep", action="store_true", help="keep the database for reruns")
    args = parser.parse_args()
    RESULTS.mkdir(parents=True, exist_ok=True)

    from alembic import command

    from cli import mint_dev_token
    from db import alembic_config, encode_cursor
    from settings import Settings

    name = args.database or f"channelgate_bench_analytics_{os.getpid()}"
    dsn = args.admin_url.rsplit("/", 1)[0] + f"/{name}"
    url = dsn.replace("postgresql://", "postgresql+asyncpg://", 1)
    if not args.database:
        subprocess.run(["psql", args.admin_url, "-qc", f"CREATE DATABASE {name}"], check=True)
    try:
        if not args.database:
            command.upgrade(alembic_config(url), "head")
            started = time.perf_counter()
            asyncio.run(fill(url, args.events, args.groups, args.days, seed=7))
            log(f"filled in {time.perf_counter() - started:.0f} s")
            subprocess.run(["psql", dsn, "-qc", "VACUUM ANALYZE"], check=True)
        owner = "00000000-0000-4000-8000-0000000000be"
        settings = Settings(_env_file=None, supabase_jwt_secret=SECRET)  # pyrefly: ignore[unexpected-keyword]
        token = mint_dev_token(settings, uuid.UUID(owner), None, 2)
        env = {
            "DATABASE_URL": url,
            "LOG_LEVEL": "warning",
            "SUPABASE_JWT_SECRET": SECRET,
            "OWNER_USER_IDS": owner,
            # Counted but never reached: the read path is measured, not the staff limit.
            "RATE_LIMIT_STAFF": "1000000/second",
        }
        now = datetime.now(UTC).replace(minute=0, second=0, microsecond=0) + timedelta(hours=1)
        day = now.replace(hour=0) + timedelta(days=1)
        windows = {
            "7d": (now - timedelta(days=7), now),
            "90d": (now - timedelta(days=90), now),
            "day90": (day - timedelta(days=90), day),
            "old": (now - timedelta(days=60), now - timedelta(days=45)),  # an old page's filter
            "day": (now - timedelta(days=1), now),
        }

        async def deep_cursor() -> str:
            connection = await asyncpg.connect(dsn)
            row = await connection.fetchrow(
                "SELECT occurred_at, id FROM verifications ORDER BY occurred_at DESC, id DESC "
                "OFFSET 99999 LIMIT 1"
            )
            await connection.close()
            assert row is not None
            return encode_cursor("verifications:-occurred_at", [row["occurred_at"], row["id"]])

        cursor = asyncio.run(deep_cursor())

        def q(window: str) -> str:
            since, until = windows[window]
            return f"since={since:%Y-%m-%dT%H:%M:%SZ}&until={until:%Y-%m-%dT%H:%M:%SZ}"

        endpoints = {
            "summary 7 days": (f"/api/v1/analytics/summary?{q('7d')}", "summary", "7d"),
            "summary 90 days": (f"/api/v1/analytics/summary?{q('90d')}", "summary", "90d"),
            "timeseries hour, 7 days": (
                f"/api/v1/analytics/timeseries?bucket=hour&{q('7d')}", "timeseries_hour", "7d"),
            "timeseries day, 90 days": (
                f"/api/v1/analytics/timeseries?bucket=day&{q('day90')}", "timeseries_day", "day90"),
            "top-groups 7 days": (f"/api/v1/analytics/top-groups?{q('7d')}", "top_groups", "7d"),
            "top-groups 90 days": (f"/api/v1/analytics/top-groups?{q('90d')}", "top_groups", "90d"),
            "log, first page": ("/api/v1/verifications?limit=50", "log_first", None),
            "log, 100,000 rows deep": (
                f"/api/v1/verifications?limit=50&cursor={cursor}", "log_deep", None),
            "log, busiest group": (
                f"/api/v1/verifications?limit=50&group={BUSIEST}", "log_group", None),
            "log, 60 to 45 days ago": (
                f"/api/v1/verifications?limit=50&{q('old')}", "log_window", "old"),
            "CSV export, busiest group, last day": (
                f"/api/v1/verifications/export?group={BUSIEST}&{q('day')}",
                "export_group_day", "day"),
        }  # fmt: skip
        results: list[tuple[str, dict[str, float], dict[str, float]]] = []
        with running("channelgate", "uvicorn", 8303, env) as served:
            base = served.base
            client = httpx.Client(base_url=base, headers={"Authorization": f"Bearer {token}"})
            for label, (path, _, _) in endpoints.items():
                response = client.get(path)
                if response.status_code != 200:
                    raise SystemExit(f"{label}: {response.status_code} {response.text[:300]}")
            api = {label: timed(lambda p=path: client.get(p), args.repeat)
                   for label, (path, _, _) in endpoints.items()}  # fmt: skip
            estimated = {
                w: client.get(endpoints[f"summary {w} days"][0]).json() for w in ("7", "90")
            }

        async def raw() -> dict[str, dict[str, float]]:
            connection = await asyncpg.connect(dsn)
            out = {}
            for label, (_, sql_name, window) in endpoints.items():
                params = windows[window] if window else ()
                samples = []
                await connection.fetch(RAW_SQL[sql_name], *params)
                for _ in range(args.raw_repeat):
                    started = time.perf_counter()
                    await connection.fetch(RAW_SQL[sql_name], *params)
                    samples.append((time.perf_counter() - started) * 1000)
                samples.sort()
                out[label] = {"p50": statistics.median(samples), "p95": samples[-1]}
            await connection.close()
            return out

        raw_times = asyncio.run(raw())

        async def exact_counts() -> dict[str, tuple[int, int]]:
            connection = await asyncpg.connect(dsn)
            out = {}
            for w, window in (("7", "7d"), ("90", "90d")):
                row = await connection.fetchrow(RAW_SQL["summary"], *windows[window])
                assert row is not None
                out[w] = (row[0], row[5])  # checks, unique users
            await connection.close()
            return out

        exact = asyncio.run(exact_counts())
        results = [(label, api[label], raw_times[label]) for label in endpoints]
        accuracy = [
            f"- {w} days: checks {estimated[w]['checks']:,} (raw {exact[w][0]:,}); unique users "
            f"{estimated[w]['unique_users']:,} estimated vs {exact[w][1]:,} exact "
            f"({(estimated[w]['unique_users'] - exact[w][1]) / exact[w][1]:+.2%})"
            for w in ("7", "90")
        ]
        report(results, args, accuracy)
    finally:
        if not args.keep and not args.database:
            subprocess.run(
                ["psql", args.admin_url, "-qc", f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"]
            )
        elif not args.database:
            log(f"kept database {name}: rerun with --database {name}")


def report(
    results: list[tuple[str, dict[str, float], dict[str, float]]], args: Any, accuracy: list[str]
) -> None:
    import platform

    lines = [
        f"# bench/insight.py — {datetime.now(UTC):%Y-%m-%d %H:%M} UTC",
        f"machine: {platform.machine()}, {os.cpu_count()} cores, PostgreSQL 15, "
        f"{args.events:,} events over {args.days} days in {args.groups} groups",
        f"API: {args.repeat} sequential requests per endpoint over HTTP (one uvicorn worker); "
        f"raw SQL: {args.raw_repeat} runs over the raw table (asyncpg)",
        "",
        "| endpoint | API p50 ms | API p95 ms | raw SQL p50 ms | raw SQL p95 ms | speed-up (p50) |",
        "|---|---|---|---|---|---|",
    ]
    for label, api, raw in results:
        lines.append(
            f"| {label} | {api['p50']:.1f} | {api['p95']:.1f} | {raw['p50']:.1f} | "
            f"{raw['p95']:.1f} | {raw['p50'] / api['p50']:.1f}x |"
        )
    lines += ["", "Same answers? (API vs the raw-table query, same run)", *accuracy]
    text = "\n".join(lines) + "\n"
    (RESULTS / "insight-latest.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
