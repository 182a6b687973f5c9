"""Bot hot-path benchmark: policy reads and verification ingestion, each next to its ceiling.

    uv run python bench/run.py            # needs PostgreSQL on 127.0.0.1:5432 and wrk

Creates its own database (dropped at the end), starts channelgate with one uvicorn worker and
a bare Starlette app with the same settings, and drives them from separate processes on
loopback: wrk for the policy endpoint, an asyncio httpx client for ingestion. Every load is
bounded in time or request count.
"""

import argparse
import asyncio
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import httpx

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
sys.path.insert(0, str(ROOT))

GROUP = -1001000000001
CHANNELS = [-1002000000001, -1002000000002, -1002000000003]


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


@contextmanager
def scratch_database(admin: str, prefix: str) -> Iterator[str]:
    """A PostgreSQL database of the benchmark's own (its libpq URL), dropped at the end."""
    name = f"{prefix}_{os.getpid()}"
    subprocess.run(["psql", admin, "-qc", f"CREATE DATABASE {name}"], check=True)
    try:
        yield admin.rsplit("/", 1)[0] + f"/{name}"
    finally:
        drop = f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"
        subprocess.run(["psql", admin, "-qc", drop], check=False)


@contextmanager
def server(module: str, port: int, env: dict[str, str]):
    """uvicorn serving `module` ("app:create_app" is called as a factory)."""
    factory = ["--factory"] if module.endswith(":create_app") else []
    command = [
        sys.executable, "-m", "uvicorn", *factory, module, "--port", str(port), "--workers", "1",
        "--loop", "uvloop", "--http", "httptools", "--log-level", "warning", "--no-access-log",
    ]  # fmt: skip
    process = subprocess.Popen(command, cwd=ROOT, env={**os.environ, **env})
    try:
        for _ in range(200):
            try:
                httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=0.5)
                break
            except httpx.HTTPError:
                time.sleep(0.1)
        yield f"http://127.0.0.1:{port}"
    finally:
        process.terminate()
        process.wait(10)


def wrk(url: str, key: str, seconds: int, connections: int) -> dict[str, float]:
    command = [
        "wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--latency",
        "-H", f"Authorization: Bearer {key}", url,
    ]  # fmt: skip
    out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # pyrefly: ignore[missing-attribute]
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if errors:
        raise SystemExit(f"wrk saw {errors.group(1)} error responses:\n{out}")

    def percentile(p: str) -> float:
        value, unit = re.search(rf"\s{p}%\s+([\d.]+)(us|ms|s)", out).groups()  # pyrefly: ignore[missing-attribute]
        return float(value) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]

    return {"rps": rps, "p50_ms": percentile("50"), "p99_ms": percentile("99")}


def make_events(n: int, start: datetime) -> list[dict[str, Any]]:
    events = []
    for i in range(n):
        result = "blocked" if i % 5 == 0 else "passed"
        events.append(
            {
                "event_id": str(uuid.uuid4()),
                "chat_id": GROUP - (i % 50),
                "user_id": 10_000 + (i * 7919) % 200_000,
                "result": result,
                "trigger": "message",
                "missing_channel_ids": [CHANNELS[0]] if result == "blocked" else [],
                "cached": i % 3 == 0,
                "latency_ms": 20 + i % 300,
                "occurred_at": (start + timedelta(milliseconds=i)).isoformat(),
            }
        )
    return events


async def ingest_load(base: str, key: str, batches: list[bytes], clients: int) -> dict[str, float]:
    queue = list(reversed(batches))
    latencies: list[float] = []
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}

    async def worker() -> None:
        async with httpx.AsyncClient(base_url=base, timeout=60) as client:
            while queue:
                body = queue.pop()
                started = time.perf_counter()
                response = await client.post(
                    "/api/v1/bot/verifications", content=body, headers=headers
                )
                latencies.append((time.perf_counter() - started) * 1000)
                if response.status_code != 200:
                    raise SystemExit(
                        f"ingestion failed: {response.status_code} {response.text[:300]}"
                    )

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(clients)))
    elapsed = time.perf_counter() - started
    return {"batch_p50_ms": statistics.median(latencies), "seconds": elapsed}


async def driver_ceiling(dsn: str, batches: list[list[dict[str, Any]]], clients: int) -> float:
    columns = (
        "event_id, chat_id, user_id, result, trigger, missing_channel_ids, cached, latency_ms, "
        "error, occurred_at, received_at"
    )
    sql = f"INSERT INTO verifications ({columns}) VALUES ($1,$2,$3,$4,$5,$6,$7,$8,$9,$10,$11)"  # noqa: S608
    prepared = [
        [
            (
                uuid.UUID(e["event_id"]),
                e["chat_id"],
                e["user_id"],
                e["result"],
                e["trigger"],
                json.dumps(e["missing_channel_ids"]),
                e["cached"],
                e["latency_ms"],
                None,
                datetime.fromisoformat(e["occurred_at"]),
                datetime.now(UTC),
            )
            for e in batch
        ]
        for batch in batches
    ]
    queue = list(reversed(prepared))
    connections = [await asyncpg.connect(dsn) for _ in range(clients)]

    async def worker(connection: asyncpg.Connection) -> None:
        while queue:
            rows = queue.pop()
            async with connection.transaction():
                await connection.executemany(sql, rows)

    started = time.perf_counter()
    await asyncio.gather(*(worker(c) for c in connections))
    elapsed = time.perf_counter() - started
    for c in connections:
        await c.close()
    return elapsed


async def setup(url: str) -> str:
    from sqlalchemy import insert

    from auth import Principal, issue_bot_key
    from db import Database
    from models import Channel, Group, GroupChannel
    from settings import Settings

    db = Database(Settings(_env_file=None, database_url=url))  # pyrefly: ignore[unexpected-keyword]
    async with db.sessionmaker() as session:
        group = Group.model_validate({"chat_id": GROUP, "title": "Benchmark group"})
        session.add(group)
        channels = [
            Channel.model_validate(
                {"chat_id": c, "title": f"Channel {i}", "username": f"bench_channel_{i}",
                 "invite_link": f"https://t.me/+bench{i}"}
            )
            for i, c in enumerate(CHANNELS)
        ]  # fmt: skip
        session.add_all(channels)
        await session.flush()
        await session.execute(
            insert(GroupChannel),
            [
                {"group_id": group.id, "channel_id": c.id, "position": i}
                for i, c in enumerate(channels)
            ],
        )
        await session.commit()
        bench = Principal(kind="staff", id="bench", name="bench")
        key = (await issue_bot_key(session, bench, "bench")).key
        await session.commit()
    await db.dispose()
    return key


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--admin-url", default="postgresql://postgres@127.0.0.1:5432/postgres")
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--batches", type=int, default=160, help="ingestion batches of 500")
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--limiter-rounds", type=int, default=3, help="limiter on/off pairs")
    args = parser.parse_args()
    RESULTS.mkdir(parents=True, exist_ok=True)

    from alembic import command

    from db import alembic_config

    with scratch_database(args.admin_url, "channelgate_bench") as dsn:
        url = dsn.replace("postgresql://", "postgresql+asyncpg://", 1)
        command.upgrade(alembic_config(url), "head")
        key = asyncio.run(setup(url))
        # The bot limit counts every call but is never reached here (as in production).
        unreached = "1000000000/second;1000000000/minute"
        env = {"DATABASE_URL": url, "LOG_LEVEL": "warning", "ENVIRONMENT": "development",
               "RATE_LIMIT_BOT": unreached}  # fmt: skip
        results: dict[str, Any] = {}
        # The limiter's cost: the same server without it, alternated with it, medians.
        runs: dict[str, list[dict[str, float]]] = {"policy": [], "policy_unlimited": []}
        for _ in range(args.limiter_rounds):
            for label, extra in (("policy_unlimited", {"RATE_LIMIT_BOT": ""}), ("policy", {})):
                with server("app:create_app", 8303, {**env, **extra}) as base:
                    url_ = f"{base}/api/v1/bot/groups/{GROUP}/policy"
                    wrk(url_, key, 2, args.connections)  # warm-up
                    runs[label].append(wrk(url_, key, args.seconds, args.connections))
                    log(f"{label}: {runs[label][-1]}")
        for label, measured in runs.items():
            results[label] = {
                k: statistics.median(m[k] for m in measured) for k in ("rps", "p50_ms", "p99_ms")
            }
        with server("app:create_app", 8301, env) as base:
            policy_url = f"{base}/api/v1/bot/groups/{GROUP}/policy"
            body = httpx.get(policy_url, headers={"Authorization": f"Bearer {key}"}).content
            (RESULTS / "policy.json").write_bytes(body)
            log(f"policy body: {len(body)} bytes")

            start = datetime.now(UTC) - timedelta(hours=1)
            events = make_events(args.batches * 500, start)
            batches = [events[i : i + 500] for i in range(0, len(events), 500)]
            warm = [json.dumps({"events": b}).encode() for b in make_events_batches(4)]
            asyncio.run(ingest_load(base, key, warm, args.clients))
            bodies = [json.dumps({"events": b}).encode() for b in batches]
            load = asyncio.run(ingest_load(base, key, bodies, args.clients))
            results["ingest"] = {
                "events_per_s": len(events) / load["seconds"],
                "batch_p50_ms": load["batch_p50_ms"],
            }
            log(f"ingest: {results['ingest']}")
        ceiling_env = {"CEILING_BODY_FILE": str(RESULTS / "policy.json")}
        with server("bench.ceiling:app", 8302, ceiling_env) as base:
            ceiling_url = f"{base}/api/v1/bot/groups/{GROUP}/policy"
            wrk(ceiling_url, key, 2, args.connections)
            results["ceiling"] = wrk(ceiling_url, key, args.seconds, args.connections)
            log(f"ceiling: {results['ceiling']}")
        driver_events = make_events(args.batches * 500, start)
        driver_batches = [driver_events[i : i + 500] for i in range(0, len(driver_events), 500)]
        seconds = asyncio.run(driver_ceiling(dsn, driver_batches, args.clients))
        results["driver"] = {"events_per_s": len(driver_events) / seconds}
        log(f"driver: {results['driver']}")
    report(results, args)


def make_events_batches(n: int) -> list[list[dict[str, Any]]]:
    events = make_events(n * 500, datetime.now(UTC) - timedelta(hours=2))
    return [events[i : i + 500] for i in range(0, len(events), 500)]


def report(results: dict[str, Any], args: argparse.Namespace) -> None:
    policy, ceiling = results["policy"], results["ceiling"]
    ingest, driver = results["ingest"], results["driver"]
    lines = [
        f"# bench/run.py — {datetime.now(UTC):%Y-%m-%d %H:%M} UTC",
        f"machine: {platform.machine()}, {os.cpu_count()} cores, "
        f"Python {platform.python_version()}",
        f"policy: wrk -t1 -c{args.connections} -d{args.seconds}s, medians of {args.limiter_rounds} "
        f"alternated runs with and without the limiter; ingestion: {args.batches} "
        f"batches of 500 from {args.clients} clients",
        "",
        "| measure | channelgate | ceiling | ratio |",
        "|---|---|---|---|",
        f"| policy GET, requests/s | {policy['rps']:,.0f} | {ceiling['rps']:,.0f} (bare Starlette) "
        f"| {policy['rps'] / ceiling['rps']:.2f} |",
        f"| policy GET, p50 ms | {policy['p50_ms']:.2f} | {ceiling['p50_ms']:.2f} | |",
        f"| policy GET, p99 ms | {policy['p99_ms']:.2f} | {ceiling['p99_ms']:.2f} | |",
        f"| policy GET with the rate limiter, requests/s | {policy['rps']:,.0f} | "
        f"{results['policy_unlimited']['rps']:,.0f} (limiter off) | "
        f"{policy['rps'] / results['policy_unlimited']['rps']:.3f} |",
        f"| ingestion, events/s | {ingest['events_per_s']:,.0f} | {driver['events_per_s']:,.0f} "
        f"(asyncpg executemany) | {ingest['events_per_s'] / driver['events_per_s']:.2f} |",
        f"| ingestion, p50 ms per 500-event batch | {ingest['batch_p50_ms']:.1f} | | |",
    ]
    text = "\n".join(lines) + "\n"
    (RESULTS / "latest.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
