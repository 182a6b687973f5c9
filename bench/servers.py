"""The policy route under uvicorn and under Granian, each next to bare Starlette under the
same server, in one run (rounds alternate the four so that the machine's drift hits all).

    uv run python bench/servers.py       # needs PostgreSQL on 127.0.0.1:5432 and wrk

channelgate runs as `channelgate serve --server S` (one worker); the bare Starlette app of
bench/ceiling.py serves the same policy bytes under the same server settings.
"""

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.run import GROUP, RESULTS, log, scratch_database, setup, wrk  # noqa: E402

PORT = 8311


def command(app: str, server: str) -> list[str]:
    if app == "channelgate":
        return [sys.executable, "-m", "cli", "serve", "--server", server, "--port", str(PORT)]
    if server == "uvicorn":
        return [
            sys.executable, "-m", "uvicorn", "bench.ceiling:app", "--port", str(PORT),
            "--loop", "uvloop", "--http", "httptools", "--log-level", "warning",
            "--no-access-log",
        ]  # fmt: skip
    return [
        sys.executable, "-m", "granian", "--interface", "asgi", "--loop", "uvloop",
        "--port", str(PORT), "--log-level", "warning", "--no-access-log", "bench.ceiling:app",
    ]  # fmt: skip


@contextmanager
def running(app: str, server: str, env: dict[str, str]) -> Iterator[str]:
    process = subprocess.Popen(command(app, server), cwd=ROOT, env={**os.environ, **env})
    base = f"http://127.0.0.1:{PORT}"
    try:
        for _ in range(300):
            try:
                httpx.get(f"{base}/api/v1/bot/groups/{GROUP}/policy", timeout=0.5)
                break
            except httpx.HTTPError:
                time.sleep(0.1)
        yield f"{base}/api/v1/bot/groups/{GROUP}/policy"
    finally:
        process.terminate()
        process.wait(20)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--admin-url", default="postgresql://postgres@127.0.0.1:5432/postgres")
    parser.add_argument("--seconds", type=int, default=8)
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    RESULTS.mkdir(parents=True, exist_ok=True)
    with scratch_database(args.admin_url, "channelgate_bench_servers") as dsn:
        url = dsn.replace("postgresql://", "postgresql+asyncpg://", 1)
        env = {"DATABASE_URL": url, "LOG_LEVEL": "warning", "ENVIRONMENT": "development",
               "AUTO_MIGRATE": "true", "RATE_LIMIT_BOT": "1000000000/second",
               "CEILING_BODY_FILE": str(RESULTS / "policy.json")}  # fmt: skip
        with running("channelgate", "uvicorn", env):  # migrates
            pass
        key = asyncio.run(setup(url))
        with running("channelgate", "uvicorn", env) as policy:
            body = httpx.get(policy, headers={"Authorization": f"Bearer {key}"}).content
            (RESULTS / "policy.json").write_bytes(body)
        runs: dict[tuple[str, str], list[dict[str, float]]] = {}
        for _ in range(args.rounds):
            for server in ("uvicorn", "granian"):
                for app in ("starlette", "channelgate"):
                    with running(app, server, env) as target:
                        wrk(target, key, 2, args.connections)  # warm-up
                        result = wrk(target, key, args.seconds, args.connections)
                    runs.setdefault((app, server), []).append(result)
                    log(f"{app} on {server}: {result}")
    median = {k: statistics.median(r["rps"] for r in v) for k, v in runs.items()}
    p99 = {k: statistics.median(r["p99_ms"] for r in v) for k, v in runs.items()}
    for (app, server), rps in median.items():
        print(f"{app:11} on {server:7}: {rps:9,.0f} req/s (median of {args.rounds}), "
              f"p99 {p99[(app, server)]:.2f} ms")  # fmt: skip
    cg_u, cg_g = median[("channelgate", "uvicorn")], median[("channelgate", "granian")]
    st_u, st_g = median[("starlette", "uvicorn")], median[("starlette", "granian")]
    print(f"channelgate granian / channelgate uvicorn: {cg_g / cg_u:.2f} (target >= 1.5)")
    print(f"channelgate granian / starlette uvicorn:   {cg_g / st_u:.2f} (target >= 0.9)")
    print(f"channelgate / starlette under uvicorn:     {cg_u / st_u:.2f} (target >= 0.6)")
    print(f"channelgate / starlette under granian:     {cg_g / st_g:.2f} (target >= 0.6)")


if __name__ == "__main__":
    main()
