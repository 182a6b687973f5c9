"""client.py's costs: what it adds to a bot's message handler when the policy and the member
state are cached, and how many events per second one client delivers to one server worker.

    uv run python bench/client.py        # needs PostgreSQL on 127.0.0.1:5432

Creates its own database (dropped at the end) and starts channelgate with one uvicorn worker
(as bench/run.py does); the client runs in this process over loopback, its spool in a
temporary directory.
"""

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.run import GROUP, log, running, scratch_database, setup  # noqa: E402
from client import Client  # noqa: E402

USERS = 1000


async def per_message(base: str, key: str, spool: str, messages: int, rounds: int) -> list[float]:
    """µs per message for policy() + member() + record(cached pass), everything cached."""
    async with Client(base, key, spool_path=spool, policy_ttl=3600) as c:
        await c.policy(GROUP)
        for user in range(1, USERS + 1):  # each member's last check passed
            c.record(GROUP, user, "passed", "message")
        assert await c.flush(60)
        figures = []
        for _ in range(rounds):
            started = time.perf_counter()
            for i in range(messages):
                user = 1 + i % USERS
                policy = await c.policy(GROUP)
                state = await c.member(GROUP, user)
                assert policy is not None and state.fresh()
                c.record(GROUP, user, "passed", "message", cached=True)
            figures.append((time.perf_counter() - started) / messages * 1e6)
            assert await c.flush(120)  # outside the timing: delivery is the background's
        assert c.stats.member_calls == 0 and c.stats.dropped == 0
    return figures


async def delivery(base: str, key: str, spool: str, events: int) -> tuple[float, dict]:
    """Events per second from the first record() to the last acknowledgement."""
    async with Client(base, key, spool_path=spool) as c:
        started = time.perf_counter()
        for i in range(events):
            c.record(GROUP, 1 + i % 100_000, "passed" if i % 4 else "blocked", "message")
            if i % 1000 == 999:
                await asyncio.sleep(0)  # a bot yields between updates
        assert await c.flush(600)
        seconds = time.perf_counter() - started
        return events / seconds, c.stats.as_stats()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--admin-url", default="postgresql://postgres@127.0.0.1:5432/postgres")
    parser.add_argument("--messages", type=int, default=20_000, help="per round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--events", type=int, default=100_000, help="per delivery run")
    parser.add_argument("--delivery-runs", type=int, default=3)
    args = parser.parse_args()

    from alembic import command

    from db import alembic_config

    with scratch_database(args.admin_url, "channelgate_bench_client") as dsn:
        url = dsn.replace("postgresql://", "postgresql+asyncpg://", 1)
        command.upgrade(alembic_config(url), "head")
        key = asyncio.run(setup(url))
        env = {"DATABASE_URL": url, "LOG_LEVEL": "warning", "ENVIRONMENT": "development",
               "RATE_LIMIT_BOT": ""}  # fmt: skip
        with (
            running("channelgate", "uvicorn", 8304, env) as served,
            tempfile.TemporaryDirectory() as tmp,
        ):
            base = served.base
            hot = asyncio.run(
                per_message(base, key, f"{tmp}/hot.sqlite3", args.messages, args.rounds)
            )
            log(f"per message µs: {[round(f, 2) for f in hot]}")
            rates = []
            for run in range(args.delivery_runs):
                rate, stats = asyncio.run(delivery(base, key, f"{tmp}/d{run}.sqlite3", args.events))
                rates.append(rate)
                log(f"delivery: {rate:,.0f} events/s, stats {stats}")
    print(
        f"per message (policy + member + record, cached): median {statistics.median(hot):.2f} µs"
        f" over {args.rounds} rounds of {args.messages:,} (min {min(hot):.2f}, max {max(hot):.2f})"
    )
    print(
        f"delivery, one client to one worker: median {statistics.median(rates):,.0f} events/s"
        f" over {args.delivery_runs} runs of {args.events:,} (min {min(rates):,.0f},"
        f" max {max(rates):,.0f})"
    )


if __name__ == "__main__":
    main()
