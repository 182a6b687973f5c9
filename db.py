"""The database: engine and sessions, announcements at commit, migrations, dialect helpers,
keyset pagination, and the LISTEN link to the other replicas.

How a write reaches this process's caches, the other replicas and the live feed:

    a route changes rows and says what it changed, inside its transaction:
        announce(session, POLICY, chat_ids)     policy.changed(): a group's policy changed
        announce(session, AUDIT, [row id])      auth.audit(): an audit row was written
        announce(session, VERIFICATION, ids)    ingest.ingest(): events were stored
        announce(session, BOT_KEY, [key hash])  revoke_bot_key(): the key stops working
    await session.commit()
      ├─ before_commit (PostgreSQL): one pg_notify per chunk of ids on the `channelgate`
      │  channel, in the same transaction: other replicas hear of it only if it commits
      │  (not the LATER topics: the live feed's)
      └─ after_commit: this process's handler for each topic runs at once
         (the policy cache drops the groups, the feed fetches and fans out the rows);
         the LATER topics' ids wait for `Database.announcer`, which NOTIFYs them every
         ANNOUNCE_EVERY in a transaction of its own
    every other replica: its Listener (one LISTEN connection) hands each payload to the
    same handlers, skipping the ones its own process sent.

The hooks are registered on each Database's own sessionmaker (not SQLAlchemy's global
Session class), so two apps in one process (the tests' replicas) never hear each other's
commits except through PostgreSQL.
"""

import asyncio
import base64
import binascii
import contextlib
import functools
import json
import logging
import secrets
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any, Literal

from alembic import command
from alembic.config import Config
from fastapi import Depends, Query
from pydantic import BaseModel, Field
from sqlalchemy import (
    JSON,
    BigInteger,
    ColumnElement,
    Select,
    Table,
    bindparam,
    event,
    func,
    literal_column,
    make_url,
    select,
    text,
    tuple_,
    update,
)
from sqlalchemy import exc as sa_exc
from sqlalchemy.dialects import postgresql, registry, sqlite
from sqlalchemy.dialects.postgresql.asyncpg import PGDialect_asyncpg
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)
from sqlalchemy.orm import Session, sessionmaker
from sqlmodel import SQLModel
from starlette.requests import HTTPConnection

from models import invalid
from settings import Settings

log = logging.getLogger("channelgate.db")
PG_DIALECT = postgresql.dialect()
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1

# ---------------------------------------------------------------- engine, sessions, topics

NOTIFY_CHANNEL = "channelgate"
POLICY, AUDIT, VERIFICATION, BOT_KEY = "policy", "audit", "verification", "bot_key"
MAX_PAYLOAD = 7900  # PostgreSQL refuses NOTIFY payloads of 8000 bytes or more
# Topics the other replicas hear of shortly after the commit instead of in it (see
# `Database.announcer`): only the live feed's, which is lossy by contract anyway.
LATER = frozenset({VERIFICATION})
ANNOUNCE_EVERY = 0.05  # seconds the announcer gathers ids for one NOTIFY statement
MAX_LATER = 200_000  # ids waiting for the announcer; beyond, the newest are dropped
NOTIFY_MANY = text(
    "SELECT pg_notify(:channel, payload) FROM unnest(CAST(:payloads AS text[])) AS payload"
)

Handler = Callable[[list[str]], None]


def make_engine(settings: Settings, url: str = "", name: str = "channelgate") -> AsyncEngine:
    """The engine for `url` (default DATABASE_URL), its connections named `name` on the
    server (pg_stat_activity's application_name)."""
    if settings.is_sqlite:
        # One connection: SQLite has a single writer, and queueing requests for the connection
        # is simpler and faster than retrying "database is locked".
        engine = create_async_engine(
            settings.database_url, pool_size=1, max_overflow=0, pool_timeout=30,
            hide_parameters=True,
        )  # fmt: skip
        event.listen(engine.sync_engine, "connect", _sqlite_pragmas)
        return engine
    pooled = settings.database_pool_mode == "transaction"
    connect = connector(url or settings.database_url, settings, pooled, name)
    engine = create_async_engine(
        "postgresql+channelgate://",
        # SQLAlchemy's async_creator cannot pass the adapter's own arguments; this is its
        # documented long form. Behind a transaction pooler every statement is prepared
        # under a fresh name and never cached (a name must not meet another client's).
        creator=lambda: engine.sync_engine.dialect.dbapi.connect(  # pyrefly: ignore[missing-attribute]
            async_creator_fn=connect,
            prepared_statement_cache_size=0 if pooled else 100,
            prepared_statement_name_func=(lambda: f"cg_{uuid.uuid4().hex}") if pooled else None,
        ),
        pool_size=settings.database_pool_size,
        max_overflow=settings.database_pool_size,
        pool_timeout=settings.database_pool_timeout,
        pool_pre_ping=True,
        pool_recycle=1800,
        hide_parameters=True,  # user data stays out of logged SQL errors
    )
    event.listen(engine.sync_engine, "handle_error", _driver_failure)
    return engine


class Dialect(PGDialect_asyncpg):
    """SQLAlchemy's asyncpg dialect, with a pool pre-ping that treats the driver's bare
    TimeoutError (a silent partition) as the lost connection it is: the pool then opens a
    new one, bounded by the connect timeout, instead of raising the TimeoutError."""

    supports_statement_cache = True

    def do_ping(self, dbapi_connection: Any) -> Literal[True]:
        try:
            return super().do_ping(dbapi_connection)
        except (OSError, TimeoutError) as error:
            # At once: SQLAlchemy's own close would first wait 2 s for a goodbye that the
            # partition swallows. is_disconnect() now sees the connection closed.
            dbapi_connection.driver_connection.terminate()
            raise self.loaded_dbapi.InterfaceError(f"connection is closed: {error!r}") from error


registry.register("postgresql.channelgate", __name__, "Dialect")


class Unreachable(Exception):
    """The driver could not reach PostgreSQL, or lost it mid-statement: raised in place of
    the bare OSError or TimeoutError the driver lets through, so that those two classes
    elsewhere in the process are never taken for a database failure."""


# libpq URL parameters that asyncpg does not know: it would send them to the server as
# settings, and the server refuses the connection. Client-side TCP and GSS tuning only.
LIBPQ_ONLY = frozenset({
    "keepalives", "keepalives_idle", "keepalives_interval", "keepalives_count",
    "tcp_user_timeout", "gssencmode", "gssdelegation", "channel_binding", "sslsni",
    "sslcompression", "load_balance_hosts", "requirepeer",
})  # fmt: skip


def asyncpg_dsn(url: str) -> tuple[str, float | None]:
    """A libpq-style URL (as Supabase, Neon, RDS and `psql` take it) as asyncpg takes it,
    and its connect_timeout. asyncpg reads sslmode, sslrootcert, target_session_attrs and
    the other TLS and host parameters itself, and sends the rest to the server."""
    parsed = make_url(url)
    query = {k: v for k, v in parsed.query.items() if k not in LIBPQ_ONLY}
    if ignored := sorted(set(parsed.query) - set(query)):
        log.info("ignoring libpq-only URL parameters asyncpg has no use for: %s", ignored)
    timeout = query.pop("connect_timeout", None)
    if (fallback := query.pop("fallback_application_name", None)) is not None:
        query.setdefault("application_name", fallback)
    if query.pop("requiressl", None) == "1":
        query.setdefault("sslmode", "require")
    dsn = parsed.set(drivername="postgresql", query=query).render_as_string(False)
    return dsn, float(str(timeout)) if timeout else None


def connector(
    url: str, settings: Settings, pooled: bool, name: str = "channelgate"
) -> Callable[[], Awaitable[Any]]:
    """An async function that opens one asyncpg connection with every wait bounded: the
    connect, each command (client side), and each statement and lock wait (server side)."""
    import asyncpg

    dsn, url_timeout = asyncpg_dsn(url)
    timeouts = server_timeouts(settings)
    # Session settings, once per connection: poolers refuse them as startup parameters. A
    # transaction pooler hands each transaction any backend: there they are set per
    # transaction instead (see `_bounded`).
    bound_session = "; ".join(f"SET {name} = '{value}'" for name, value in timeouts.items())

    async def connect() -> Any:
        try:
            connection = await asyncpg.connect(
                dsn,
                timeout=url_timeout or settings.database_connect_timeout,
                command_timeout=settings.database_command_timeout,
                statement_cache_size=0 if pooled else 100,
                server_settings={"application_name": name},
            )
        except (OSError, TimeoutError) as exc:
            raise Unreachable(f"cannot connect to PostgreSQL: {exc!r}") from exc
        if not pooled:
            try:
                await connection.execute(bound_session)
            # InternalClientError: a backend terminated during the SET can leave asyncpg's
            # protocol in a state it refuses to leave ("cannot switch to state 15"): a 500.
            except (OSError, TimeoutError, asyncpg.InternalClientError) as exc:
                connection.terminate()
                raise Unreachable(f"lost PostgreSQL while connecting: {exc!r}") from exc
        return connection

    return connect


def server_timeouts(settings: Settings) -> dict[str, str]:
    return {
        "statement_timeout": f"{int(settings.database_statement_timeout * 1000)}ms",
        "lock_timeout": f"{int(settings.database_lock_timeout * 1000)}ms",
    }


def _driver_failure(context: Any) -> Exception | None:
    """SQLAlchemy's handle_error hook: a bare OSError or TimeoutError out of the driver
    during a statement, commit or rollback is a lost link; the connection is discarded."""
    error = context.original_exception
    if not isinstance(error, (OSError, TimeoutError)):
        return None
    context.is_disconnect = True
    if context.connection is not None and not context.connection.invalidated:
        # At once, as in Dialect.do_ping: the link is gone, no goodbye will get through.
        context.connection.connection.driver_connection.terminate()
    return Unreachable(f"lost the PostgreSQL connection: {error!r}")


# SQLSTATEs that mean "the database is not there right now": retry later, not a bug.
UNAVAILABLE_STATES = frozenset({
    "57P01",  # admin_shutdown: the backend was terminated (restart, failover, pg_terminate)
    "57P02",  # crash_shutdown
    "57P03",  # cannot_connect_now: starting up, shutting down, in recovery
    "57014",  # query_canceled: statement_timeout fired
    "55P03",  # lock_not_available: lock_timeout fired
    "25006",  # read_only_sql_transaction: a standby after failover
    "53300",  # too_many_connections
    "53000", "53100", "53200",  # insufficient resources, disk full, out of memory
})  # fmt: skip
SQLITE_UNAVAILABLE = frozenset({"SQLITE_CANTOPEN", "SQLITE_BUSY", "SQLITE_LOCKED", "SQLITE_FULL"})
CONFLICT_STATES = frozenset({"40001", "40P01"})  # serialization failure, deadlock


def failure(error: BaseException) -> str | None:
    """ "unavailable" for a lost or overloaded database, "conflict" for a transaction worth
    replaying, None for anything else (a bug). Only the driver's and PostgreSQL's own
    errors count: see Unreachable."""
    if isinstance(error, (Unreachable, sa_exc.TimeoutError)):  # TimeoutError: pool checkout
        return "unavailable"
    if not isinstance(error, sa_exc.DBAPIError):
        return None
    state: str = getattr(error.orig, "sqlstate", None) or ""
    if state in CONFLICT_STATES:
        return "conflict"
    if error.connection_invalidated or state.startswith("08") or state in UNAVAILABLE_STATES:
        return "unavailable"
    # SQLite: the file cannot be opened, or another process holds the write lock too long
    if getattr(error.orig, "sqlite_errorname", "") in SQLITE_UNAVAILABLE:
        return "unavailable"
    return None


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    for pragma in (
        "PRAGMA journal_mode=WAL",
        "PRAGMA synchronous=NORMAL",
        "PRAGMA foreign_keys=ON",
        "PRAGMA busy_timeout=10000",
    ):
        cursor.execute(pragma)
    cursor.close()


class Database:
    """The engine, its sessionmaker, and what committed transactions announce: each topic's
    handler runs in this process after commit and, on PostgreSQL, on every other replica
    through NOTIFY."""

    def __init__(self, settings: Settings) -> None:
        self.engine = make_engine(settings)
        self.is_postgres = self.engine.dialect.name == "postgresql"
        self.origin = secrets.token_hex(4)  # tells this process's notifications from others'
        self.handlers: dict[str, Handler] = {}
        self.listener: Listener | None = None  # PostgreSQL: the link to the other replicas
        self.later: dict[str, list[str]] | None = None  # while an announcer runs: its queue
        self.later_queued = asyncio.Event()
        sync_maker = sessionmaker()
        event.listen(sync_maker, "before_commit", self._notify)
        event.listen(sync_maker, "after_commit", self._deliver_here)
        event.listen(sync_maker, "after_rollback", _forget)
        read_maker = sessionmaker()  # reads announce nothing
        if settings.database_pool_mode == "transaction" and self.is_postgres:
            timeouts = server_timeouts(settings)
            for maker in (sync_maker, read_maker):
                event.listen(maker, "after_begin", lambda *args: _bounded(args[2], timeouts))
        self.sessionmaker = async_sessionmaker(
            self.engine, expire_on_commit=False, sync_session_class=sync_maker
        )
        # DATABASE_READ_URL: a replica for the dashboard's reads (see `reading`).
        self.read_engine: AsyncEngine | None = None
        self.read_sessionmaker: async_sessionmaker[AsyncSession] | None = None
        self.replica_skipped_until = 0.0  # after the replica failed: the primary meanwhile
        if settings.database_read_url:
            self.read_engine = make_engine(settings, settings.database_read_url, READ_NAME)
            self.read_sessionmaker = async_sessionmaker(
                self.read_engine, expire_on_commit=False, sync_session_class=read_maker
            )

    def on(self, topic: str, handler: Handler) -> None:
        self.handlers[topic] = handler

    def heard(self, payload: str) -> None:
        """A notification from PostgreSQL: run its topic's handler unless this process sent
        it (it ran here at commit already)."""
        origin, _, rest = payload.partition(" ")
        topic, _, items = rest.partition(" ")
        handler = self.handlers.get(topic)
        if origin != self.origin and handler is not None and items:
            handler(items.split(","))

    def _notification(self, pending: dict[str, list[str]]) -> dict[str, Any]:
        """NOTIFY_MANY's parameters for these topics' items."""
        payloads = [
            f"{self.origin} {topic} {chunk}" for topic, items in pending.items() for chunk in
            _chunks(items, MAX_PAYLOAD - len(self.origin) - len(topic) - 2)
        ]  # fmt: skip
        return {"channel": NOTIFY_CHANNEL, "payloads": payloads}

    def _notify(self, session: Session) -> None:
        pending: dict[str, list[str]] | None = session.info.get("announce")
        if not pending or not self.is_postgres:
            return
        # Without an announcer (a CLI process ingesting), the LATER topics go now, as well.
        later = self.later is not None
        session.info["notified_later"] = not later
        now = {topic: items for topic, items in pending.items() if not later or topic not in LATER}
        if now:
            session.execute(NOTIFY_MANY, self._notification(now))

    def _deliver_here(self, session: Session) -> None:
        pending: dict[str, list[str]] | None = session.info.pop("announce", None)
        notified = session.info.pop("notified_later", False)
        for topic, items in (pending or {}).items():
            if (handler := self.handlers.get(topic)) is not None:
                handler(items)
            if topic in LATER and self.later is not None and not notified:
                queued = self.later.setdefault(topic, [])
                if len(queued) + len(items) <= MAX_LATER:
                    queued.extend(items)
                    self.later_queued.set()
                else:
                    log.warning("announcer behind: %d %s ids not announced", len(items), topic)

    async def announcer(self, stopping: asyncio.Event) -> None:
        """Tell the other replicas of the LATER topics' commits, gathered for ANNOUNCE_EVERY
        into one NOTIFY statement of its own, until `stopping` is set (then what is queued
        goes out). A NOTIFY makes its commit take PostgreSQL's notify-queue lock until
        the commit's WAL flush is done, so every ingesting commit notifying in its own
        transaction made those commits run one at a time (bench/README.md). An
        announcement that fails (the database is unavailable) is lost, logged: the live
        feed loses events rather than slowing ingestion, and so does a process that dies
        between a commit and its announcement."""
        self.later = {}
        try:
            while not stopping.is_set():
                await self.later_queued.wait()  # set by a commit, or to stop (Services.stop)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stopping.wait(), ANNOUNCE_EVERY)
                await self._announce_later()
        finally:
            self.later = None

    async def _announce_later(self) -> None:
        self.later_queued.clear()
        pending, self.later = self.later, {}
        if not pending:
            return
        try:
            async with self.sessionmaker() as session:
                await session.execute(NOTIFY_MANY, self._notification(pending))
                await session.commit()
        except Exception as error:
            count = sum(map(len, pending.values()))
            if failure(error) is None:
                log.exception("announcing %d ids failed", count)
            else:
                log.warning("%d ids not announced: database unavailable (%s)", count, error)

    @contextlib.asynccontextmanager
    async def reading(self, primary: AsyncSession | None = None) -> AsyncIterator[AsyncSession]:
        """A session for a dashboard read. With a replica (DATABASE_READ_URL): the replica's,
        once it has replayed everything the primary had committed when the read began, so
        the read sees every write acknowledged before it (analytics read their writes);
        the primary's when the replica lags more than READ_WAIT_SECONDS, and for
        REPLICA_BACKOFF_SECONDS after it was unavailable (a black-holed replica would cost
        every read its connect timeout). `primary`, the request's own session if it has
        one, asks the primary's position."""
        if self.read_sessionmaker is not None and time.monotonic() >= self.replica_skipped_until:
            async with self.on_primary(primary) as session:
                position = await session.scalar(PRIMARY_POSITION)
            async with self.read_sessionmaker() as replica:
                try:
                    caught_up = await _caught_up(replica, position)
                except Exception as error:
                    if failure(error) != "unavailable":
                        raise
                    log.warning("replica unavailable, reading the primary: %r", error)
                    self.replica_skipped_until = time.monotonic() + REPLICA_BACKOFF_SECONDS
                    caught_up = False
                if caught_up:
                    yield replica
                    return
        async with self.on_primary(primary) as session:
            yield session

    @contextlib.asynccontextmanager
    async def on_primary(self, session: AsyncSession | None) -> AsyncIterator[AsyncSession]:
        """`session` itself, or a new session on the primary when it is None."""
        if session is not None:
            yield session
        else:
            async with self.sessionmaker() as new:
                yield new

    async def dispose(self) -> None:
        await self.engine.dispose()
        if self.read_engine is not None:
            await self.read_engine.dispose()


READ_NAME = "channelgate-read"
READ_WAIT_SECONDS = 1.0  # how long a read waits for the replica to catch up
REPLICA_BACKOFF_SECONDS = 5.0
PRIMARY_POSITION = text("SELECT pg_current_wal_lsn()")
# NULL, so not behind, on a server that is not a standby (a second URL of the primary).
REPLICA_BEHIND = text("SELECT pg_last_wal_replay_lsn() < CAST(:position AS pg_lsn)")


async def _caught_up(replica: AsyncSession, position: str) -> bool:
    """Whether the replica has replayed the primary's WAL up to `position`, waiting for it
    up to READ_WAIT_SECONDS."""
    deadline = time.monotonic() + READ_WAIT_SECONDS
    while await replica.scalar(REPLICA_BEHIND, {"position": position}):
        if time.monotonic() >= deadline:
            log.warning("replica over %.1f s behind: reading the primary", READ_WAIT_SECONDS)
            return False
        await asyncio.sleep(0.01)
    return True


BOUND_TRANSACTION = text(
    "SELECT set_config('statement_timeout', :statement_timeout, true),"
    " set_config('lock_timeout', :lock_timeout, true)"
)


def _bounded(connection: Any, timeouts: dict[str, str]) -> None:
    """Behind a transaction pooler the server timeouts cannot be startup parameters (the
    pooler refuses them) nor session settings (the next transaction may run on another
    backend): each transaction sets them for itself, one round trip."""
    connection.execute(BOUND_TRANSACTION, timeouts)


def announce(session: AsyncSession | Session, topic: str, items: Iterable[object]) -> None:
    """Tell this process and every replica, once the session commits, that these items
    (ids) of `topic` changed. Nothing is told if the transaction rolls back."""
    pending: dict[str, list[str]] = session.info.setdefault("announce", {})
    pending.setdefault(topic, []).extend(map(str, items))


def _forget(session: Session) -> None:
    session.info.pop("announce", None)
    session.info.pop("notified_later", None)


def _chunks(items: list[str], size: int) -> Iterable[str]:
    """Comma-joined runs of items, each at most `size` characters long."""
    chunk: list[str] = []
    length = 0
    for item in items:
        if chunk and length + 1 + len(item) > size:
            yield ",".join(chunk)
            chunk, length = [], 0
        length += len(item) + (1 if chunk else 0)
        chunk.append(item)
    if chunk:
        yield ",".join(chunk)


def database(connection: HTTPConnection) -> Database:
    return connection.app.state.services.db


async def get_session(connection: HTTPConnection) -> AsyncIterator[AsyncSession]:
    async with database(connection).sessionmaker() as session:
        yield session


# Closed as soon as the endpoint returns, before the response is sent: a slow client, a CSV
# export or a live feed never holds a connection for the request (the stream opens its own).
SessionDep = Annotated[AsyncSession, Depends(get_session, scope="function")]


async def get_read_session(
    connection: HTTPConnection, session: SessionDep
) -> AsyncIterator[AsyncSession]:
    """The replica's session for a dashboard read (Database.reading), or the request's own
    when there is none: on SQLite a second session would wait for the one connection."""
    async with database(connection).reading(session) as read:
        yield read


ReadSessionDep = Annotated[AsyncSession, Depends(get_read_session, scope="function")]


# ---------------------------------------------------------------- migrations


def alembic_config(database_url: str | None = None) -> Config:
    config = Config(str(Path(__file__).with_name("alembic.ini")))
    config.attributes["configure_logging"] = False
    if database_url:
        config.attributes["database_url"] = database_url
    return config


@functools.cache
def schema_head() -> str:
    """The revision this code needs: the head of migrations/."""
    from alembic.script import ScriptDirectory

    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    assert head is not None
    return head


async def schema_revision(session: AsyncSession) -> str | None:
    """The revision the database is at; None if it was never migrated."""
    try:
        async with session.begin_nested():
            return await session.scalar(text("SELECT version_num FROM alembic_version"))
    except (sa_exc.ProgrammingError, sa_exc.OperationalError) as error:  # no such table
        if failure(error) is not None:
            raise
        return None


async def migrate(db: Database) -> None:
    """alembic upgrade head on the database's own engine."""

    def upgrade(connection: Any) -> None:
        config = alembic_config()
        config.attributes["connection"] = connection
        command.upgrade(config, "head")

    async with db.engine.begin() as connection:
        await connection.run_sync(upgrade)


# ---------------------------------------------------------------- dialect helpers


def is_postgres(session: AsyncSession) -> bool:
    return session.bind is not None and session.bind.dialect.name == "postgresql"


def upsert(session: AsyncSession, table: Any) -> Any:
    """`INSERT` with `on_conflict_do_*` for the session's dialect (both speak the same API)."""
    return (postgresql.insert if is_postgres(session) else sqlite.insert)(table)


def bulk_insert(session: AsyncSession, table: Table, rows: list[dict[str, Any]]) -> tuple[Any, Any]:
    """An upsert-capable INSERT of many rows and the parameters to execute it with.

    On PostgreSQL the rows travel as one array per column and are expanded by `unnest`: one
    statement, one round trip, encoded by asyncpg in C (several times faster than a
    multi-row VALUES list built by SQLAlchemy). Elsewhere it is a plain executemany."""
    if not is_postgres(session):
        return sqlite.insert(table), rows
    names = tuple(rows[0])
    source, json_columns = _unnest_source(table, names)
    params = {name: [row[name] for row in rows] for name in names}
    for name in json_columns:
        # Most events miss no channel: "[]" as is, not json.dumps'd (1.0 → 0.2 ms a batch).
        params[name] = ["[]" if value == [] else json.dumps(value) for value in params[name]]
    return postgresql.insert(table).from_select(names, source), params


async def bulk_update(session: AsyncSession, table: Table, rows: list[dict[str, Any]]) -> None:
    """`UPDATE table SET … WHERE id = …` for many rows: one statement on PostgreSQL (the rows
    as unnested arrays, like `bulk_insert`), an executemany elsewhere."""
    if not rows:
        return
    names = [name for name in rows[0] if name != "id"]
    if not is_postgres(session):
        statement = (
            update(table)
            .where(table.c.id == bindparam("row_id"))
            .values({name: bindparam(f"new_{name}") for name in names})
        )
        params = [{"row_id": r["id"], **{f"new_{n}": r[n] for n in names}} for r in rows]
        await session.execute(statement, params)
        return
    source, _ = _unnest_source(table, ("id", *names))
    assignments = ", ".join(f"{name} = bulk.{name}" for name in names)
    await session.execute(
        text(
            f"UPDATE {table.name} SET {assignments} FROM ({source}) AS bulk "  # noqa: S608
            f"WHERE {table.name}.id = bulk.id"
        ),
        {name: [row[name] for row in rows] for name in ("id", *names)},
    )


@functools.cache
def _unnest_source(table: Table, names: tuple[str, ...]) -> tuple[Any, list[str]]:
    columns = [table.c[name] for name in names]
    arrays = ", ".join(
        f"CAST(:{c.name} AS {c.type.compile(dialect=PG_DIALECT)}[])" for c in columns
    )
    source = select(*[literal_column(name) for name in names]).select_from(
        text(f"unnest({arrays}) AS bulk({', '.join(names)})")
    )
    return source, [c.name for c in columns if isinstance(c.type, JSON)]


# ---------------------------------------------------------------- keyset pagination
# A cursor is the last row's sort key as urlsafe-base64 JSON, led by the order's name so
# that a cursor for another order is refused. Hand-written rather than signed or encrypted:
# it holds nothing the page does not show, and decoding checks every value's type.


type AnySelect = Select[*tuple[Any, ...]]


class PageParams(BaseModel):
    limit: int = Field(50, ge=1, le=200)
    cursor: str | None = Field(None, max_length=512)


PageQuery = Annotated[PageParams, Query()]


@dataclass(frozen=True)
class Keyset:
    """A list's order: `columns` (unique together, the last one a tiebreaker), one
    direction, and a `name` (the list's and the order's) bound into its cursors, so that a
    cursor of one list or order is refused by every other."""

    name: str
    columns: tuple[Any, ...]
    descending: bool = False

    def where_after(self, values: Sequence[Any]) -> ColumnElement[bool]:
        row, cursor = tuple_(*self.columns), tuple_(*values)
        return row < cursor if self.descending else row > cursor

    def order(self) -> list[Any]:
        return [c.desc() if self.descending else c.asc() for c in self.columns]

    def kinds(self) -> list[tuple[type, int]]:
        """Each column's Python type, and for integers the magnitude its SQL type holds."""
        return [
            (c.type.python_type, INT64_MAX if isinstance(c.type, BigInteger) else 2**31 - 1)
            for c in self.columns
        ]


def encode_cursor(name: str, values: Sequence[Any]) -> str:
    encoded = [v.isoformat() if isinstance(v, datetime) else v for v in values]
    raw = json.dumps([name, *[str(v) if isinstance(v, uuid.UUID) else v for v in encoded]])
    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


BAD_CURSOR = "malformed cursor; use next_cursor as returned"


def decode_cursor(cursor: str, name: str, kinds: Sequence[tuple[type, int]]) -> list[Any]:
    """The sort key in a cursor made by `encode_cursor` for `name`, each value of its
    column's type and within what the column holds; anything else is a 422, so that no
    value the service would not have issued reaches a query."""
    try:
        raw = json.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
        if not isinstance(raw, list) or len(raw) != len(kinds) + 1 or raw[0] != name:
            raise ValueError
        return [_cursor_value(*kind, value) for kind, value in zip(kinds, raw[1:], strict=True)]
    except (ValueError, TypeError, OverflowError, binascii.Error):
        raise invalid(("query", "cursor"), BAD_CURSOR) from None


def _cursor_value(kind: type, magnitude: int, value: object) -> Any:
    if kind is datetime and isinstance(value, str):
        parsed = datetime.fromisoformat(value)
        if parsed.tzinfo is not None:
            return parsed.astimezone(UTC)
    elif kind is uuid.UUID and isinstance(value, str):
        return uuid.UUID(value)
    elif kind is int and type(value) is int:
        if -magnitude - 1 <= value <= magnitude:
            return value
    elif kind is str and isinstance(value, str) and "\x00" not in value:
        value.encode()  # UnicodeEncodeError (a ValueError) for a lone surrogate
        return value
    raise ValueError


async def paginate(
    session: AsyncSession, statement: AnySelect, keyset: Keyset, page: PageParams
) -> tuple[list[Any], str | None]:
    """One page of `statement` in `keyset` order and the cursor of the next (None on the
    last page). The sort key is read off each row's first entity, or off the row itself."""
    if page.cursor is not None:
        after = decode_cursor(page.cursor, keyset.name, keyset.kinds())
        statement = statement.where(keyset.where_after(after))
    statement = statement.order_by(*keyset.order()).limit(page.limit + 1)
    rows = list((await session.execute(statement)).all())
    if len(rows) <= page.limit:
        return rows, None
    last = rows[page.limit - 1]
    source = last[0] if isinstance(last[0], SQLModel) else last
    return rows[: page.limit], encode_cursor(
        keyset.name, [getattr(source, column.key) for column in keyset.columns]
    )


async def count(session: AsyncSession, statement: AnySelect) -> int:
    return await session.scalar(select(func.count()).select_from(statement.subquery())) or 0


# ---------------------------------------------------------------- cross-replica link


class Listener:
    """One dedicated PostgreSQL session connection that LISTENs for the other replicas'
    announcements and hands them to `Database.heard`.

    It never gives up: any error but cancellation means reconnect, with backoff. A ping
    every few seconds notices a silent partition (a socket that stays open while nothing
    arrives). While the link is down `linked` is clear: the caches stop trusting their
    entries past a short bound (`on_unlinked`), and `on_linked` drops them once it is back,
    since notifications sent meanwhile are lost."""

    PING_EVERY = 2.0
    BACKOFF = (0.2, 5.0)  # first and longest wait between attempts, seconds

    def __init__(
        self,
        settings: Settings,
        db: Database,
        on_linked: Callable[[], None],
        on_unlinked: Callable[[], None],
    ) -> None:
        self.dsn, url_timeout = asyncpg_dsn(settings.listen_url)
        self.timeout = url_timeout or settings.database_connect_timeout
        self.db = db
        self.on_linked = on_linked
        self.on_unlinked = on_unlinked
        self.linked = asyncio.Event()

    async def run(self) -> None:
        import asyncpg

        wait = self.BACKOFF[0]
        while True:
            connection = None
            try:
                connection = await asyncpg.connect(
                    self.dsn,
                    timeout=self.timeout,
                    server_settings={"application_name": "channelgate-listen"},
                )
                closed = asyncio.Event()
                connection.add_termination_listener(lambda _, done=closed: done.set())
                await connection.add_listener(
                    NOTIFY_CHANNEL, lambda _c, _p, _ch, payload: self.db.heard(payload)
                )
                self.on_linked()
                self.linked.set()
                wait = self.BACKOFF[0]
                while not closed.is_set():
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(closed.wait(), timeout=self.PING_EVERY)
                    if not closed.is_set():
                        await connection.fetchval("SELECT 1", timeout=self.timeout)
            except Exception as exc:  # anything but cancellation (not an Exception): relink
                log.warning("LISTEN link lost: %r; retrying in %.1fs", exc, wait)
            finally:
                if self.linked.is_set():
                    self.linked.clear()
                    self.on_unlinked()
                if connection is not None:
                    connection.terminate()  # never waits, never raises
            await asyncio.sleep(wait)
            wait = min(wait * 2, self.BACKOFF[1])
