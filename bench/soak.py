"""Soak: mixed load against one worker on PostgreSQL for a long time; errors and memory sampled.

    uv run python bench/soak.py                 # 30 minutes; --minutes to change

Creates its own database (dropped at the end) and starts `channelgate serve` (one uvicorn
worker, as deployed) on loopback. One asyncio client process keeps up, at a steady rate:
policy reads (some revalidating with If-None-Match), ingestion batches, dashboard reads
(groups, the verification log, analytics), a group edit now and then (which invalidates the
policy), a CSV export of the last hour every 30 s, and one live-feed subscriber reading the
whole time. Every 10 s it samples the server's RSS and the error counts. Target: no errors,
RSS flat after warm-up (growth at most 10%). Writes bench/results/soak.md.
"""

import argparse
import asyncio
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import jwt

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.run import GROUP, RESULTS, ROOT, log, make_events, scratch_database, setup

SECRET = "soak-benchmark-secret-at-least-32-bytes-long"
OWNER = "00000000-0000-4000-8000-00000000500a"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


class Soak:
    def __init__(self, base: str, key: str, seconds: float) -> None:
        self.base = base
        self.bot = {"Authorization": f"Bearer {key}"}
        now = int(time.time())
        claims = {
            "sub": OWNER, "aud": "authenticated", "role": "authenticated", "aal": "aal1",
            "iss": "http://127.0.0.1:54321/auth/v1", "iat": now, "exp": now + 7 * 86400,
        }  # fmt: skip
        self.staff = {"Authorization": f"Bearer {jwt.encode(claims, SECRET, 'HS256')}"}
        self.deadline = time.monotonic() + seconds
        self.requests: Counter[str] = Counter()
        self.errors: Counter[str] = Counter()
        self.feed_events = 0

    def running(self) -> bool:
        return time.monotonic() < self.deadline

    def count(self, kind: str, response: httpx.Response, ok: tuple[int, ...] = (200,)) -> None:
        self.requests[kind] += 1
        if response.status_code not in ok:
            self.errors[f"{kind} {response.status_code}"] += 1
            log(f"error: {kind} {response.status_code} {response.text[:200]}")

    async def steady(self, kind: str, every: float, call) -> None:
        """`call(client)` every `every` seconds until the deadline; transport errors count."""
        async with httpx.AsyncClient(base_url=self.base, timeout=30) as client:
            while self.running():
                started = time.monotonic()
                try:
                    await call(client)
                except httpx.HTTPError as error:
                    self.requests[kind] += 1
                    self.errors[f"{kind} {type(error).__name__}"] += 1
                await asyncio.sleep(max(0.0, every - (time.monotonic() - started)))

    async def policy(self, client: httpx.AsyncClient) -> None:
        path = f"/api/v1/bot/groups/{GROUP}/policy"
        response = await client.get(path, headers=self.bot)
        self.count("policy", response)
        tag = {"If-None-Match": response.headers.get("etag", "")}
        self.count("policy 304", await client.get(path, headers={**self.bot, **tag}), (200, 304))

    async def ingest(self, client: httpx.AsyncClient) -> None:
        events = make_events(200, datetime.now(UTC) - timedelta(minutes=5))
        response = await client.post(
            "/api/v1/bot/verifications", json={"events": events}, headers=self.bot
        )
        self.count("ingest", response)

    async def dashboard(self, client: httpx.AsyncClient) -> None:
        for path in (
            "/api/v1/groups",
            "/api/v1/verifications?limit=100",
            "/api/v1/analytics/summary",
            "/api/v1/analytics/timeseries?bucket=hour",
            f"/api/v1/groups/{GROUP}",
        ):
            self.count("dashboard", await client.get(path, headers=self.staff))

    async def edit(self, client: httpx.AsyncClient) -> None:
        group = await client.get(f"/api/v1/groups/{GROUP}", headers=self.staff)
        self.count("edit", group)
        mode = "any" if group.json()["mode"] == "all" else "all"
        response = await client.patch(
            f"/api/v1/groups/{GROUP}",
            json={"mode": mode},
            headers={**self.staff, "If-Match": group.headers["etag"]},
        )
        self.count("edit", response)

    async def export(self, client: httpx.AsyncClient) -> None:
        since = (datetime.now(UTC) - timedelta(hours=1)).isoformat().replace("+00:00", "Z")
        async with client.stream(
            "GET", "/api/v1/verifications/export", params={"since": since}, headers=self.staff
        ) as response:
            async for _ in response.aiter_bytes():
                pass
        self.count("export", response)

    async def feed(self) -> None:
        async with httpx.AsyncClient(
            base_url=self.base, timeout=httpx.Timeout(30, read=None)
        ) as client:
            while self.running():
                try:
                    async with client.stream(
                        "GET", "/api/v1/events", headers=self.staff
                    ) as response:
                        self.count("feed", response)
                        async for line in response.aiter_lines():
                            self.feed_events += line.startswith("event:")
                            if not self.running():
                                return
                except httpx.HTTPError as error:
                    self.errors[f"feed {type(error).__name__}"] += 1


async def soak(base: str, key: str, pid: int, args: argparse.Namespace) -> list[dict]:
    run = Soak(base, key, args.minutes * 60)
    samples: list[dict] = []

    async def sample() -> None:
        started = time.monotonic()
        while run.running():
            await asyncio.sleep(10)
            samples.append(
                {
                    "t": round(time.monotonic() - started),
                    "rss_mib": rss_mib(pid),
                    "requests": sum(run.requests.values()),
                    "errors": sum(run.errors.values()),
                    "feed_events": run.feed_events,
                }
            )
            log(f"{samples[-1]}")

    await asyncio.gather(
        *(run.steady("policy", 0.01, run.policy) for _ in range(4)),
        run.steady("ingest", 0.5, run.ingest),
        run.steady("dashboard", 1.0, run.dashboard),
        run.steady("edit", 3.0, run.edit),  # not 5 s: uvicorn closes keep-alives idle 5 s
        run.steady("export", 30.0, run.export),
        run.feed(),
        sample(),
    )
    return [{"requests": dict(run.requests), "errors": dict(run.errors)}, *samples]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--admin-url", default="postgresql://postgres@127.0.0.1:5432/postgres")
    parser.add_argument("--minutes", type=float, default=30)
    parser.add_argument("--warmup-minutes", type=float, default=3)
    args = parser.parse_args()
    RESULTS.mkdir(parents=True, exist_ok=True)
    with scratch_database(args.admin_url, "channelgate_soak") as url:
        env = {
            **os.environ,
            "DATABASE_URL": url,
            "AUTO_MIGRATE": "true",
            "LOG_LEVEL": "warning",
            "SUPABASE_JWT_SECRET": SECRET,
            "OWNER_USER_IDS": OWNER,
        }
        server = None
        try:
            migrate = [sys.executable, "-m", "cli", "migrate"]
            subprocess.run(migrate, cwd=ROOT, env=env, check=True, stdout=subprocess.DEVNULL)
            key = asyncio.run(setup(url.replace("postgresql://", "postgresql+asyncpg://", 1)))
            port = free_port()
            command = [sys.executable, "-m", "cli", "serve", "--port", str(port)]
            server = subprocess.Popen(command, cwd=ROOT, env=env)
            base = f"http://127.0.0.1:{port}"
            for _ in range(300):
                try:
                    if httpx.get(f"{base}/readyz", timeout=1).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                time.sleep(0.1)
            totals, *samples = asyncio.run(soak(base, key, server.pid, args))
        finally:
            if server is not None:
                server.terminate()
                server.wait(30)
    report(totals, samples, args)


def report(totals: dict, samples: list[dict], args: argparse.Namespace) -> None:
    warm = [s for s in samples if s["t"] >= args.warmup_minutes * 60]
    first = statistics.median(s["rss_mib"] for s in warm[:6])  # the minute after warm-up
    last = statistics.median(s["rss_mib"] for s in warm[-6:])  # the last minute
    errors = sum(totals["errors"].values())
    lines = [
        f"# bench/soak.py — {datetime.now(UTC):%Y-%m-%d %H:%M} UTC",
        f"machine: {platform.machine()}, {os.cpu_count()} cores, "
        f"Python {platform.python_version()}; one worker on PostgreSQL; {args.minutes:g} min",
        "",
        f"- requests: {sum(totals['requests'].values()):,} "
        f"({', '.join(f'{k} {v:,}' for k, v in sorted(totals['requests'].items()))})",
        f"- errors: {errors} {totals['errors'] or ''}",
        f"- live-feed events received: {samples[-1]['feed_events']:,}",
        f"- RSS after {args.warmup_minutes:g} min warm-up: {first:.1f} MiB (median of the next "
        f"minute); at the end: {last:.1f} MiB; growth {100 * (last - first) / first:+.1f}%",
        "",
        "| t (s) | RSS MiB | requests | errors |",
        "|---|---|---|---|",
        *(
            f"| {s['t']} | {s['rss_mib']:.1f} | {s['requests']:,} | {s['errors']} |"
            for s in samples[::6]
        ),
    ]
    text = "\n".join(lines) + "\n"
    (RESULTS / "soak.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
