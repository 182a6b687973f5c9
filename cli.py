"""The `channelgate` command."""

import argparse
import asyncio
import sys
import time
import uuid
from collections.abc import Sequence

import jwt
from pydantic import ValidationError

from settings import Settings, get_settings


def load_settings() -> Settings:
    try:
        return get_settings()
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "settings"
        sys.exit(f"channelgate: configuration error: {where}: {first['msg']}")


def serve(args: argparse.Namespace) -> None:
    import uvicorn

    settings = load_settings()
    if settings.metrics_enabled:
        share_metrics_between_workers()
    uvicorn.run(
        "app:create_app",
        factory=True,
        host=args.host,
        port=args.port,
        workers=None if args.reload else args.workers,
        reload=args.reload,
        loop="uvloop",
        http="httptools",
        log_level=settings.log_level,
        access_log=False,  # channelgate writes its own structured access log
        proxy_headers=True,
    )


def share_metrics_between_workers() -> None:
    """A fresh directory for prometheus-client's multiprocess mode, unless one is given:
    every worker writes its samples there and any of them answers a scrape with all."""
    import os
    import tempfile

    from metrics import MULTIPROC_ENV

    if not os.environ.get(MULTIPROC_ENV):
        os.environ[MULTIPROC_ENV] = tempfile.mkdtemp(prefix="channelgate-metrics-")


async def _migrate(settings: Settings) -> None:
    from db import Database, migrate

    db = Database(settings)
    try:
        await migrate(db)
    finally:
        await db.dispose()


def migrate(_: argparse.Namespace) -> None:
    asyncio.run(_migrate(load_settings()))
    print("database is at the latest schema")


async def _create_bot_key(settings: Settings, name: str) -> str:
    from auth import Principal, issue_bot_key
    from db import Database, migrate

    db = Database(settings)
    try:
        if settings.should_auto_migrate:
            await migrate(db)
        async with db.sessionmaker() as session:
            cli = Principal(kind="staff", id="cli", name="channelgate create-bot-key")
            created = await issue_bot_key(session, cli, name)
            await session.commit()
            return created.key
    finally:
        await db.dispose()


def create_bot_key(args: argparse.Namespace) -> None:
    name = args.name.strip()
    if not 1 <= len(name) <= 64:
        sys.exit("channelgate: the key name must be 1 to 64 characters")
    key = asyncio.run(_create_bot_key(load_settings(), name))
    print(key)
    print("(shown once: store it now; channelgate keeps only its hash)", file=sys.stderr)


async def _add_staff(settings: Settings, user_id: uuid.UUID, role: str, email: str | None) -> None:
    from sqlmodel import select

    from db import Database, migrate
    from models import Staff, utcnow

    db = Database(settings)
    try:
        if settings.should_auto_migrate:
            await migrate(db)
        async with db.sessionmaker() as session:
            staff = await session.scalar(select(Staff).where(Staff.user_id == user_id))
            if staff is None:
                session.add(Staff(user_id=user_id, role=role, email=email))  # pyrefly: ignore[bad-argument-type]
            else:
                staff.role = role  # pyrefly: ignore[bad-assignment]
                staff.updated_at = utcnow()
            await session.commit()
    finally:
        await db.dispose()


def mint_dev_token(
    settings: Settings, user_id: uuid.UUID, email: str | None, hours: float, aal: str = "aal1"
) -> str:
    now = int(time.time())
    claims = {
        "iss": settings.jwt_issuer,
        "aud": settings.supabase_jwt_audience,
        "sub": str(user_id),
        "role": "authenticated",
        "aal": aal,
        "is_anonymous": False,
        "iat": now,
        "exp": now + int(hours * 3600),
    }
    if email:
        claims["email"] = email
    return jwt.encode(claims, settings.supabase_jwt_secret, algorithm="HS256")


def dev_token(args: argparse.Namespace) -> None:
    settings = load_settings()
    if not settings.supabase_jwt_secret:
        sys.exit("channelgate: dev-token needs SUPABASE_JWT_SECRET (set it in .env)")
    if settings.environment == "production":
        sys.exit("channelgate: dev-token is for local use; refusing in production")
    user_id = args.user_id or uuid.uuid4()
    asyncio.run(_add_staff(settings, user_id, args.role, args.email))
    print(mint_dev_token(settings, user_id, args.email, args.hours, args.aal))
    print(f"(user {user_id} is now {args.role}; token valid {args.hours} h)", file=sys.stderr)


DEMO_TOPICS = [
    "Rust", "Python", "Design", "Crypto News", "Chess", "Photography", "Startups", "Linux",
    "Gardening", "Football", "Cooking", "Travel", "Books", "Jazz", "Running", "Astronomy",
]  # fmt: skip


def progress(done: int, total: int, width: int = 30) -> None:
    filled = width * done // max(total, 1)
    bar = "#" * filled + "." * (width - filled)
    print(f"\r[{bar}] {done * 100 // max(total, 1):3d}%  {done:,}/{total:,} events", end="",
          file=sys.stderr, flush=True)  # fmt: skip


async def _seed_demo(settings: Settings, groups: int, events: int, days: int, seed: int) -> None:
    import random
    from datetime import UTC, datetime, timedelta

    from sqlalchemy import insert
    from sqlmodel import select

    from db import Database, migrate
    from ingest import ingest
    from models import Channel, Group, GroupChannel, VerificationIn

    rng = random.Random(seed)  # noqa: S311 - demo data, not secrets
    db = Database(settings)
    try:
        if settings.should_auto_migrate:
            await migrate(db)
        async with db.sessionmaker() as session:
            topics = [DEMO_TOPICS[i % len(DEMO_TOPICS)] for i in range(groups)]
            channel_ids = [-1009000000000 - i for i in range(max(2, groups // 2 + 1))]
            existing = set(await session.scalars(select(Channel.chat_id)))
            channels = [
                Channel.model_validate(
                    {"chat_id": cid, "title": f"{topics[i % groups]} Channel",
                     "username": f"demo_channel_{i}", "invite_link": f"https://t.me/+demo{i}"}
                )
                for i, cid in enumerate(channel_ids) if cid not in existing
            ]  # fmt: skip
            session.add_all(channels)
            group_ids = [-1008000000000 - i for i in range(groups)]
            existing = set(await session.scalars(select(Group.chat_id)))
            new_groups = [
                Group.model_validate(
                    {"chat_id": gid, "title": f"{topics[i]} Chat", "username": f"demo_group_{i}",
                     "mode": rng.choice(["all", "all", "any"]),
                     "action": rng.choice(["mute", "mute", "warn", "delete", "kick"])}
                )
                for i, gid in enumerate(group_ids) if gid not in existing
            ]  # fmt: skip
            session.add_all(new_groups)
            await session.flush()
            by_chat = {c.chat_id: c.id for c in await session.scalars(select(Channel))}
            links = []
            for group in new_groups:
                required = rng.sample(channel_ids, k=rng.randint(1, min(3, len(channel_ids))))
                links += [
                    {"group_id": group.id, "channel_id": by_chat[c], "position": p}
                    for p, c in enumerate(required)
                ]
            if links:
                await session.execute(insert(GroupChannel), links)
            await session.commit()

        now = datetime.now(UTC)
        users = {g: [rng.randint(10_000, 2_000_000_000) for _ in range(400)] for g in group_ids}
        joined = {(g, u): rng.random() < 0.7 for g in group_ids for u in users[g]}
        done, batch_size = 0, 1000
        progress(0, events)
        while done < events:
            batch = []
            for _ in range(min(batch_size, events - done)):
                group_id = rng.choice(group_ids)
                user_id = rng.choice(users[group_id])
                # busier in the evening, and more recent days busier than old ones
                age = timedelta(days=days * rng.random() ** 1.4, hours=rng.gauss(0, 3))
                occurred = min(now - age, now)
                if rng.random() < 0.02:
                    result, error = "error", rng.choice(["telegram timeout", "flood wait 3s"])
                else:
                    result, error = ("passed" if joined[group_id, user_id] else "blocked"), None
                    if result == "blocked" and rng.random() < 0.3:
                        joined[group_id, user_id] = True  # they joined after the warning
                cached = result == "passed" and rng.random() < 0.6
                batch.append(
                    VerificationIn.model_validate(
                        {
                            "event_id": uuid.UUID(int=rng.getrandbits(128), version=4),
                            "chat_id": group_id,
                            "user_id": user_id,
                            "result": result,
                            "trigger": rng.choice(["message"] * 6 + ["join", "button", "recheck"]),
                            "missing_channel_ids": rng.sample(channel_ids, 1)
                            if result == "blocked" else [],
                            "cached": cached,
                            "latency_ms": 2 if cached else int(rng.lognormvariate(5, 0.6)),
                            "error": error,
                            "occurred_at": occurred,
                        }
                    )
                )  # fmt: skip
            async with db.sessionmaker() as session:
                await ingest(session, batch)
                await session.commit()
            done += len(batch)
            progress(done, events)
        print(file=sys.stderr)
    finally:
        await db.dispose()


def seed_demo(args: argparse.Namespace) -> None:
    settings = load_settings()
    if settings.environment == "production":
        sys.exit("channelgate: seed-demo writes fake data; refusing in production")
    asyncio.run(_seed_demo(settings, args.groups, args.events, args.days, args.seed))
    print(f"seeded {args.groups} groups and {args.events:,} verification events")


async def _purge(settings: Settings, days: int, batch: int) -> int:
    from datetime import timedelta

    from sqlalchemy import delete, select
    from sqlmodel import col

    from db import Database
    from models import Verification, utcnow

    cutoff = utcnow() - timedelta(days=days)
    db = Database(settings)
    deleted = 0
    try:
        while True:
            # Small batches by primary key: each transaction is short and locks few rows,
            # so ingestion and the dashboard carry on while old events go.
            async with db.sessionmaker() as session:
                oldest = (
                    select(col(Verification.id))
                    .where(col(Verification.occurred_at) < cutoff)
                    .order_by(col(Verification.occurred_at))
                    .limit(batch)
                )
                result = await session.execute(
                    delete(Verification).where(col(Verification.id).in_(oldest.scalar_subquery()))
                )
                await session.commit()
            count = result.rowcount  # pyrefly: ignore[missing-attribute]
            deleted += count
            print(f"\rdeleted {deleted:,} events older than {cutoff:%Y-%m-%d %H:%M} UTC", end="",
                  file=sys.stderr, flush=True)  # fmt: skip
            if count < batch:
                break
    finally:
        print(file=sys.stderr)
        await db.dispose()
    return deleted


def purge(args: argparse.Namespace) -> None:
    settings = load_settings()
    days = args.days or settings.retention_days
    if days < 1:
        sys.exit("channelgate: --days must be at least 1")
    deleted = asyncio.run(_purge(settings, days, args.batch))
    print(f"purged {deleted:,} verification events older than {days} days (rollups kept)")


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="channelgate", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    p = commands.add_parser("serve", help="run the HTTP service")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--reload", action="store_true", help="restart on code changes (dev)")
    p.set_defaults(run=serve)

    p = commands.add_parser("migrate", help="bring the database schema up to date")
    p.set_defaults(run=migrate)

    p = commands.add_parser("create-bot-key", help="create a bot API key and print it once")
    p.add_argument("name")
    p.set_defaults(run=create_bot_key)

    p = commands.add_parser("dev-token", help="mint a local HS256 token and make its user staff")
    p.add_argument("--user-id", type=uuid.UUID, help="Supabase user UUID (default: a new one)")
    p.add_argument("--role", choices=["owner", "editor", "viewer"], default="owner")
    p.add_argument("--email", default=None)
    p.add_argument("--hours", type=float, default=12.0)
    p.add_argument("--aal", choices=["aal1", "aal2"], default="aal1")
    p.set_defaults(run=dev_token)

    p = commands.add_parser("seed-demo", help="fill the database with realistic demo data")
    p.add_argument("--groups", type=int, default=8, choices=range(1, 201), metavar="1..200")
    p.add_argument("--events", type=int, default=20_000)
    p.add_argument("--days", type=int, default=30)
    p.add_argument("--seed", type=int, default=1)
    p.set_defaults(run=seed_demo)

    p = commands.add_parser("purge", help="delete raw verification events past retention")
    p.add_argument("--days", type=int, default=None, help="default: RETENTION_DAYS (90)")
    p.add_argument("--batch", type=int, default=10_000)
    p.set_defaults(run=purge)

    args = parser.parse_args(argv)
    args.run(args)


if __name__ == "__main__":
    main()
