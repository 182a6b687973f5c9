"""The `channelgate` command."""

import argparse
import asyncio
import logging
import os
import re
import sys
import time
import uuid
from collections.abc import Callable, Sequence
from typing import Any

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


SERVERS = ("uvicorn", "granian")


def serve(args: argparse.Namespace) -> None:
    if args.server not in SERVERS:
        sys.exit(f"channelgate: CHANNELGATE_SERVER must be one of {', '.join(SERVERS)}")
    settings = load_settings()
    if args.server == "granian" and not granian_installed():
        sys.exit(
            "channelgate: --server granian needs the granian extra: "
            "pip install 'channelgate[granian]' (or uv sync --extra granian)"
        )
    if settings.is_sqlite and args.workers > 1:
        sys.exit(
            "channelgate: SQLite serves one worker (one writer, one cache); "
            "use PostgreSQL for --workers > 1"
        )
    if settings.should_auto_migrate:
        # Once, before any worker starts: workers migrating together race each other.
        asyncio.run(_migrate(settings))
        os.environ["AUTO_MIGRATE"] = "false"  # the workers read their settings afresh
    if settings.metrics_enabled:
        share_metrics_between_workers()
    # Only now: prometheus-client picks its multiprocess mode when imported, and Granian's
    # workers are forked from this process with whatever it has imported.
    from app import log_config

    if args.server == "granian":
        serve_granian(args, settings)
        return
    import uvicorn

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
        log_config=log_config(settings.log_level),
        access_log=False,  # channelgate writes its own structured access log
        proxy_headers=True,
        timeout_graceful_shutdown=args.drain_seconds,
    )


def granian_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("granian") is not None


def serve_granian(args: argparse.Namespace, settings: Settings) -> None:
    """The same service under Granian: its ASGI interface with lifespan, uvloop, one process
    per worker. Its workers end on SIGTERM by running the lifespan's shutdown (which ends the
    feed streams, as app.drain_on_signal does under uvicorn); one that has not ended within
    --drain-seconds is killed."""
    from pathlib import Path

    from granian.constants import Interfaces, Loops
    from granian.log import LogLevels
    from granian.server import Server

    from app import log_config

    Server(
        "cli:granian_app",
        factory=True,
        address=args.host,
        port=args.port,
        interface=Interfaces.ASGI,
        workers=1 if args.reload else args.workers,
        loop=Loops.uvloop,
        log_level=LogLevels(settings.log_level),
        log_dictconfig=log_config(settings.log_level),
        log_access=False,  # channelgate writes its own structured access log
        workers_kill_timeout=args.drain_seconds,
        reload=args.reload,
        reload_paths=[Path.cwd()] if args.reload else None,
    ).serve()


def granian_app() -> Any:
    """`create_app()` behind uvicorn's own X-Forwarded-For handling, so that both servers
    trust the same proxies (FORWARDED_ALLOW_IPS, as uvicorn reads it, by default 127.0.0.1)
    alike. Not Granian's wrap_asgi_with_proxy_headers: it parses the peer's address anew on
    every request, 7 % of the policy route's time under load (py-spy, bench/README.md);
    uvicorn's caches what it decided per address."""
    from uvicorn.middleware.proxy_headers import ProxyHeadersMiddleware

    from app import create_app

    trusted = os.environ.get("FORWARDED_ALLOW_IPS", "127.0.0.1")
    return ProxyHeadersMiddleware(create_app(), trusted)  # pyrefly: ignore[bad-argument-type]


def share_metrics_between_workers() -> None:
    """A fresh directory for prometheus-client's multiprocess mode, unless one is given:
    every worker writes its samples there and any of them answers a scrape with all."""
    import os
    import tempfile

    # metrics.MULTIPROC_ENV, not imported: that would import prometheus-client before this
    # sets it, and Granian's forked workers would keep its single-process mode.
    if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="channelgate-metrics-")


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
    if args.hours <= 0:
        sys.exit("channelgate: --hours must be positive")
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

    from analytics import fold_everything
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
        await fold_everything(db)  # no folder runs here: leave the rollups whole
    finally:
        await db.dispose()


def seed_demo(args: argparse.Namespace) -> None:
    settings = load_settings()
    if settings.environment == "production":
        sys.exit("channelgate: seed-demo writes fake data; refusing in production")
    asyncio.run(_seed_demo(settings, args.groups, args.events, args.days, args.seed))
    print(f"seeded {args.groups} groups and {args.events:,} verification events")


async def _purge(settings: Settings, days: int, batch: int) -> int:
    """Drop the raw log's weeks (Monday to Monday, UTC) wholly older than `days` days: whole
    partitions on PostgreSQL (partitions.py), small batches of rows from its default
    partition and from SQLite's one table. Returns how many events went."""
    from sqlalchemy import BigInteger, column, delete, select, table

    import partitions
    from db import Database
    from models import UTCDateTime, utcnow

    now = utcnow()
    cutoff = partitions.horizon(now, days)
    db = Database(settings)
    # On PostgreSQL, the rows outside every week's partition.
    name = partitions.DEFAULT if db.is_postgres else "verifications"
    log = table(name, column("id", BigInteger), column("occurred_at", UTCDateTime))
    deleted = -1
    try:
        deleted = await partitions.drop_before(db, cutoff)
        while True:
            # Small batches by primary key: each transaction is short and locks few rows,
            # so ingestion and the dashboard carry on while old events go.
            async with db.sessionmaker() as session:
                oldest = select(log.c.id).where(log.c.occurred_at < cutoff).limit(batch)
                result = await session.execute(
                    delete(log).where(
                        log.c.occurred_at < cutoff, log.c.id.in_(oldest.scalar_subquery())
                    )
                )
                await session.commit()
            count = result.rowcount  # pyrefly: ignore[missing-attribute]
            deleted += count
            print(f"\rdeleted {deleted:,} events before {cutoff:%Y-%m-%d} UTC", end="",
                  file=sys.stderr, flush=True)  # fmt: skip
            if count < batch:
                break
        await partitions.ensure(db, now, days)
    finally:
        if deleted >= 0:
            print(file=sys.stderr)  # ends the progress line
        await db.dispose()
    return deleted


def purge(args: argparse.Namespace) -> None:
    settings = load_settings()
    days = getattr(args, "days", settings.retention_days)
    deleted = asyncio.run(_purge(settings, days, args.batch))
    print(
        f"purged {deleted:,} verification events of the weeks older than {days} days (rollups kept)"
    )


def at_least(low: int, high: int | None = None) -> Callable[[str], int]:
    """An argparse type: an integer in [low, high], else a one-line usage error."""

    def parse(raw: str) -> int:
        try:
            value = int(raw)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{raw!r} is not an integer") from None
        if value < low or (high is not None and value > high):
            span = f"at least {low}" if high is None else f"{low} to {high}"
            raise argparse.ArgumentTypeError(f"{value} is out of range ({span})")
        return value

    parse.__name__ = "integer"  # what argparse names in its message
    return parse


def settings_help() -> str:
    from settings import Settings

    names = ", ".join(name.upper() for name in Settings.model_fields)
    return (
        "Configuration comes from the environment or ./.env (see README.md): "
        f"{names}. Defaults need no setup: SQLite in ./channelgate.db."
    )


def main(argv: Sequence[str] | None = None) -> None:
    defaults, epilog = argparse.ArgumentDefaultsHelpFormatter, settings_help()
    parser = argparse.ArgumentParser(
        prog="channelgate", description=__doc__, epilog=epilog, formatter_class=defaults
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {version()}")
    commands = parser.add_subparsers(dest="command", required=True)

    def command(name: str, help: str) -> argparse.ArgumentParser:
        return commands.add_parser(
            name, help=help, description=help, epilog=epilog, formatter_class=defaults
        )

    p = command("serve", "run the HTTP service (migrates first when AUTO_MIGRATE is on)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on")
    p.add_argument("--port", type=at_least(0, 65535), default=8000, help="TCP port")
    p.add_argument(
        "--workers", type=at_least(1, 64), default=1, help="processes (PostgreSQL only if > 1)"
    )
    p.add_argument(
        "--server", choices=SERVERS, default=os.environ.get("CHANNELGATE_SERVER", "uvicorn"),
        help="HTTP server (env CHANNELGATE_SERVER); granian needs the granian extra",
    )  # fmt: skip
    p.add_argument("--reload", action="store_true", help="restart on code changes (dev)")
    p.add_argument(
        "--drain-seconds", type=at_least(1, 600), default=10,
        help="on SIGTERM, how long in-flight requests get to finish",
    )  # fmt: skip
    p.set_defaults(run=serve)

    p = command("migrate", "bring the database schema up to date")
    p.set_defaults(run=migrate)

    p = command("create-bot-key", "create a bot API key and print it once")
    p.add_argument("name", help="what the key is for, 1 to 64 characters")
    p.set_defaults(run=create_bot_key)

    p = command("dev-token", "mint a local HS256 token and make its user staff")
    p.add_argument("--user-id", type=uuid.UUID, help="Supabase user UUID (default: new)")
    p.add_argument("--role", choices=["owner", "editor", "viewer"], default="owner", help="role")
    p.add_argument("--email", default=None, help="email claim (default: none)")
    p.add_argument("--hours", type=float, default=12.0, help="token lifetime")
    p.add_argument("--aal", choices=["aal1", "aal2"], default="aal1", help="assurance level")
    p.set_defaults(run=dev_token)

    p = command("seed-demo", "fill the database with realistic demo data")
    p.add_argument("--groups", type=at_least(1, 200), default=8, help="groups, 1 to 200")
    p.add_argument("--events", type=at_least(0, 100_000_000), default=20_000, help="events")
    p.add_argument("--days", type=at_least(1, 3650), default=30, help="spread over days")
    p.add_argument("--seed", type=int, default=1, help="random seed")
    p.set_defaults(run=seed_demo)

    p = command("purge", "delete raw verification events past retention")
    p.add_argument(
        "--days", type=at_least(1, 3650), default=argparse.SUPPRESS,
        help="keep this many days (default: RETENTION_DAYS, 90)",
    )  # fmt: skip
    p.add_argument(
        "--batch", type=at_least(1, 1_000_000), default=10_000, help="rows per transaction"
    )
    p.set_defaults(run=purge)

    p = command(
        "bot",
        "run the reference Telegram bot (polling) against a channelgate service; needs "
        "BOT_TOKEN, CHANNELGATE_URL, CHANNELGATE_KEY, optionally TELEGRAM_API_URL, "
        "BOT_STATE_PATH (spool and mutes, default channelgate-bot.sqlite3), BOT_REFRESH_SECONDS",
    )
    p.set_defaults(run=run_bot)

    args = parser.parse_args(argv)
    try:
        args.run(args)
    except Exception as error:
        sys.exit(f"channelgate: {explain(error)}")


def run_bot(_: argparse.Namespace) -> None:
    try:
        import bot
    except ImportError as error:
        raise SystemExit(
            f"channelgate: the bot needs python-telegram-bot ({error.name} is missing): "
            "install channelgate[bot], or `uv sync --extra bot`"
        ) from None
    try:
        settings = bot.BotSettings.from_env()
    except ValueError as error:
        raise SystemExit(f"channelgate: {error}") from None
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per getUpdates otherwise
    bot.run(settings)


def version() -> str:
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as installed

    try:
        return installed("channelgate")
    except PackageNotFoundError:
        return "unknown"


def explain(error: Exception) -> str:
    """One line for a failed command; a traceback only for what is a bug."""
    from sqlalchemy import exc as sa_exc

    from db import failure

    cause = getattr(error, "orig", None) or error.__cause__ or error
    if failure(error) == "unavailable":
        return f"the database is unreachable or unavailable: {cause}"
    text = str(cause).splitlines()[0] if str(cause) else type(cause).__name__
    if isinstance(error, sa_exc.DBAPIError) and re.search(
        r"alembic_version|does not exist|no such table", str(error)
    ):
        return f"the database has no channelgate schema ({text}); run `channelgate migrate`"
    if isinstance(error, (sa_exc.DBAPIError, OSError)):
        return f"database error: {text}"
    raise error


if __name__ == "__main__":
    main()
