"""Bot hot-path benchmark: policy reads and verification ingestion, each next to its ceiling.

    uv run python bench/run.py            # needs PostgreSQL on 127.0.0.1:5432 and wrk

Creates its own database (dropped at the end), starts channelgate with one uvicorn worker and
a bare Starlette app with the same settings, and drives them from separate processes on
loopback: wrk for the policy endpoint, an asyncio httpx client for ingestion. Every load is
bounded in time or request count.
"""

import argparse
import asyncio
import contextlib
import importlib.util
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
from dataclasses import dataclass
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


def command(app: str, server: str, port: int) -> list[str]:
    """One worker of channelgate (`channelgate serve`) or of the bare Starlette ceiling app,
    under uvicorn (uvloop, httptools) or Granian (ASGI, uvloop), no access log."""
    if app == "channelgate":
        return [sys.executable, "-m", "cli", "serve", "--server", server, "--port", str(port)]
    if server == "uvicorn":
        return [
            sys.executable, "-m", "uvicorn", "bench.ceiling:app", "--port", str(port),
            "--loop", "uvloop", "--http", "httptools", "--log-level", "warning",
            "--no-access-log",
        ]  # fmt: skip
    return [
        sys.executable, "-m", "granian", "--interface", "asgi", "--loop", "uvloop",
        "--port", str(port), "--log-level", "warning", "--no-access-log", "bench.ceiling:app",
    ]  # fmt: skip


@dataclass
class Running:
    base: str
    process: subprocess.Popen

    def tree(self) -> list[int]:
        """The server and its worker processes (Granian forks one)."""
        pids, found = [self.process.pid], []
        while pids:
            pid = pids.pop()
            with contextlib.suppress(FileNotFoundError):
                for task in Path(f"/proc/{pid}/task").iterdir():
                    pids += [int(c) for c in (task / "children").read_text().split()]
                found.append(pid)
        return found

    def rss_mib(self) -> float:
        total = 0
        for pid in self.tree():
            with contextlib.suppress(FileNotFoundError):
                status = Path(f"/proc/{pid}/status").read_text()
                total += int(re.search(r"VmRSS:\s+(\d+)", status).group(1))  # pyrefly: ignore[missing-attribute]
        return total / 1024


CPU_PARTS = ("server", "rest", "load")


def cpu_seconds(pids: list[int]) -> float:
    """User and system CPU time these processes have used so far."""
    ticks = 0
    for pid in pids:
        with contextlib.suppress(FileNotFoundError, ProcessLookupError):
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            ticks += int(fields[11]) + int(fields[12])  # utime, stime
    return ticks / os.sysconf("SC_CLK_TCK")


def machine_seconds() -> float:
    """CPU time the whole machine has been busy (/proc/stat). PostgreSQL's share is this less
    the server's and the load generator's: its backends come and go with connections, so
    their own counters would miss the ones that ended. Meaningful on an otherwise idle host."""
    user, nice, system, _idle, _iowait, irq, softirq, steal = map(
        int, Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]
    )
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


@contextmanager
def running(app: str, server: str, port: int, env: dict[str, str]) -> Iterator[Running]:
    process = subprocess.Popen(command(app, server, port), cwd=ROOT, env={**os.environ, **env})
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(300):
            try:
                httpx.get(f"{base}/api/v1/bot/groups/{GROUP}/policy", timeout=0.5)
                break
            except httpx.HTTPError:
                time.sleep(0.1)
        yield Running(base, process)
    finally:
        process.terminate()
        process.wait(20)


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


DELTAS = ("rollup_deltas", "channel_rollup_deltas", "member_count_deltas", "user_sketch_deltas")
UNFOLDED = "SELECT " + " + ".join(f"(SELECT count(*) FROM {t})" for t in DELTAS)  # noqa: S608


async def ingest_load(
    base: str, key: str, batches: list[bytes], clients: int, dsn: str
) -> dict[str, float]:
    """`clients` concurrent bots posting `batches`; batch latencies, and the folding: the most
    delta rows waiting during the load, and the lag from the last acknowledgement until the
    folder has merged every delta."""
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

    connection = await asyncpg.connect(dsn)
    most_unfolded = 0

    async def watch() -> None:
        nonlocal most_unfolded
        while True:
            most_unfolded = max(most_unfolded, await connection.fetchval(UNFOLDED))
            await asyncio.sleep(0.1)

    watcher = asyncio.create_task(watch())
    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(clients)))
    acknowledged = time.perf_counter()
    watcher.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await watcher
    while await connection.fetchval(UNFOLDED):  # noqa: ASYNC110 - polling another process
        await asyncio.sleep(0.01)
    lag = time.perf_counter() - acknowledged
    await connection.close()
    return {
        "seconds": acknowledged - started,
        "batch_p50_ms": statistics.median(latencies),
        "batch_p99_ms": statistics.quantiles(latencies, n=100)[98],
        "most_unfolded": most_unfolded,
        "fold_lag_s": lag,
    }


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


PORT = 8301
APPS = {  # label: (app, extra environment)
    "starlette": ("starlette", {}),
    "channelgate": ("channelgate", {}),
    "channelgate, limiter off": ("channelgate", {"RATE_LIMIT_BOT": ""}),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--admin-url", default="postgresql://postgres@127.0.0.1:5432/postgres")
    parser.add_argument("--seconds", type=int, default=8)
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3, help="alternated policy rounds")
    parser.add_argument("--batches", type=int, default=160, help="ingestion batches of 500")
    parser.add_argument("--clients", default="1,4,8", help="ingestion client counts")
    parser.add_argument("--servers", default="uvicorn,granian")
    args = parser.parse_args()
    servers = [s for s in args.servers.split(",") if s != "granian" or granian_installed()]
    client_counts = [int(c) for c in args.clients.split(",")]
    RESULTS.mkdir(parents=True, exist_ok=True)

    from alembic import command

    from db import alembic_config

    results: dict[str, Any] = {"policy": {}, "ingest": {}, "driver": {}, "driver_cpu": {}}
    with scratch_database(args.admin_url, "channelgate_bench") as dsn:
        url = dsn.replace("postgresql://", "postgresql+asyncpg://", 1)
        command.upgrade(alembic_config(url), "head")
        key = asyncio.run(setup(url))
        # The bot limit counts every call but is never reached here (as in production).
        env = {"DATABASE_URL": url, "LOG_LEVEL": "warning", "ENVIRONMENT": "development",
               "AUTO_MIGRATE": "false", "RATE_LIMIT_BOT": "1000000000/second",
               "CEILING_BODY_FILE": str(RESULTS / "policy.json")}  # fmt: skip
        policy_path = f"/api/v1/bot/groups/{GROUP}/policy"
        with running("channelgate", "uvicorn", PORT, env) as served:
            body = httpx.get(served.base + policy_path, headers={"Authorization": f"Bearer {key}"})
            (RESULTS / "policy.json").write_bytes(body.content)
        # Policy: every app under every server, rounds alternating them all so that the
        # machine's drift hits each alike; medians.
        runs: dict[tuple[str, str], list[dict[str, float]]] = {}
        for _ in range(args.rounds):
            for server in servers:
                for label, (app, extra) in APPS.items():
                    with running(app, server, PORT, {**env, **extra}) as served:
                        wrk(served.base + policy_path, key, 2, args.connections)  # warm-up
                        measured = wrk(
                            served.base + policy_path, key, args.seconds, args.connections
                        )
                    runs.setdefault((label, server), []).append(measured)
                    log(f"policy, {label} on {server}: {measured}")
        for (label, server), measured in runs.items():
            results["policy"][label, server] = {
                k: statistics.median(m[k] for m in measured) for k in ("rps", "p50_ms", "p99_ms")
            }
        # Ingestion: under each server, 1, 4 and 8 bots, fresh events each time.
        start = datetime.now(UTC) - timedelta(hours=1)
        for server in servers:
            with running("channelgate", server, PORT, env) as served:
                warm = [json.dumps({"events": b}).encode() for b in batches_of(8, start)]
                asyncio.run(ingest_load(served.base, key, warm, 4, dsn))
                rss = [served.rss_mib()]
                for clients in client_counts:
                    bodies = [
                        json.dumps({"events": b}).encode() for b in batches_of(args.batches, start)
                    ]
                    # Where the CPU goes: the server, this load generator, the rest (PostgreSQL).
                    cpu = (cpu_seconds(served.tree()), time.process_time(), machine_seconds())
                    load = asyncio.run(ingest_load(served.base, key, bodies, clients, dsn))
                    server_s = cpu_seconds(served.tree()) - cpu[0]
                    load_s = time.process_time() - cpu[1]
                    rest_s = machine_seconds() - cpu[2] - server_s - load_s
                    used = (server_s, rest_s, load_s)
                    events = args.batches * 500
                    for part, seconds in zip(CPU_PARTS, used, strict=True):
                        load[f"cpu_{part}_us"] = seconds / events * 1e6
                    rss.append(served.rss_mib())
                    load["events_per_s"] = args.batches * 500 / load["seconds"]
                    load["rss_mib"] = rss[-1]
                    results["ingest"][server, clients] = load
                    log(f"ingest on {server}, {clients} clients: {load}")
                results["ingest"][server, "rss_after_warm_up"] = rss[0]
        for clients in client_counts:
            cpu = (machine_seconds(), time.process_time())
            seconds = asyncio.run(driver_ceiling(dsn, batches_of(args.batches, start), clients))
            results["driver"][clients] = args.batches * 500 / seconds
            load_s = time.process_time() - cpu[1]
            results["driver_cpu"][clients] = (
                (machine_seconds() - cpu[0] - load_s) / (args.batches * 500) * 1e6,
                load_s / (args.batches * 500) * 1e6,
            )
            log(f"driver, {clients} clients: {results['driver'][clients]:,.0f} events/s")
    report(results, args, servers, client_counts)


def granian_installed() -> bool:
    return importlib.util.find_spec("granian") is not None


def batches_of(n: int, start: datetime) -> list[list[dict[str, Any]]]:
    events = make_events(n * 500, start)
    return [events[i : i + 500] for i in range(0, len(events), 500)]


def report(
    results: dict[str, Any], args: argparse.Namespace, servers: list[str], client_counts: list[int]
) -> None:
    policy, ingest, driver = results["policy"], results["ingest"], results["driver"]
    lines = [
        f"# bench/run.py — {datetime.now(UTC):%Y-%m-%d %H:%M} UTC",
        f"machine: {platform.machine()}, {os.cpu_count()} cores, "
        f"Python {platform.python_version()}; one worker per server",
        f"policy: wrk -t1 -c{args.connections} -d{args.seconds}s, medians of {args.rounds} "
        f"rounds alternating every app under every server",
        "",
        "| policy GET | server | requests/s | p50 ms | p99 ms | ÷ Starlette, same server |",
        "|---|---|---|---|---|---|",
    ]
    for server in servers if policy else ():  # --rounds 0: ingestion only
        bare = policy["starlette", server]["rps"]
        for label in APPS:
            m = policy[label, server]
            lines.append(
                f"| {label} | {server} | {m['rps']:,.0f} | {m['p50_ms']:.2f} | "
                f"{m['p99_ms']:.2f} | {m['rps'] / bare:.2f} |"
            )
    if "granian" in servers and "uvicorn" in servers and policy:
        cg_u, cg_g = (
            policy["channelgate", "uvicorn"]["rps"],
            policy["channelgate", "granian"]["rps"],
        )
        lines += [
            "",
            f"channelgate on Granian ÷ on uvicorn: **{cg_g / cg_u:.2f}**; "
            f"÷ bare Starlette on uvicorn: **{cg_g / policy['starlette', 'uvicorn']['rps']:.2f}**",
        ]
    lines += [
        "",
        f"ingestion: {args.batches} batches of 500 per run, fresh events each run; driver: "
        "asyncpg `executemany` of the same rows into the raw log, as many connections",
        "",
        "| ingestion | clients | events/s | ÷ driver | batch p50 ms | batch p99 ms "
        "| RSS MiB after | most unfolded deltas | fold lag s "
        "| CPU µs/event: server / PostgreSQL and the rest / load |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for server in servers:
        for clients in client_counts:
            m = ingest[server, clients]
            cpu = " / ".join(f"{m[f'cpu_{part}_us']:.0f}" for part in CPU_PARTS)
            lines.append(
                f"| {server} | {clients} | {m['events_per_s']:,.0f} | "
                f"{m['events_per_s'] / driver[clients]:.2f} | {m['batch_p50_ms']:.1f} | "
                f"{m['batch_p99_ms']:.1f} | {m['rss_mib']:.0f} | {m['most_unfolded']:,} | "
                f"{m['fold_lag_s']:.2f} | {cpu} |"
            )
    for clients in client_counts:
        database, load = results["driver_cpu"][clients]
        lines.append(
            f"| driver | {clients} | {driver[clients]:,.0f} | | | | | | "
            f"| none / {database:.0f} / {load:.0f} |"
        )
    lines += [""] + [
        f"RSS after the warm-up under {server}: {ingest[server, 'rss_after_warm_up']:.0f} MiB"
        for server in servers
    ]
    text = "\n".join(lines) + "\n"
    (RESULTS / "latest.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
