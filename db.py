"""The async engine, the session factory, `SessionDep` and the PostgreSQL/SQLite helpers."""

import asyncio
import functools
import json
import logging
from collections.abc import AsyncIterator, Callable
from typing import Annotated, Any

from fastapi import Depends, Request
from sqlalchemy import (
    JSON,
    Table,
    bindparam,
    event,
    func,
    literal_column,
    make_url,
    select,
    text,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)

from settings import Settings

log = logging.getLogger("channelgate.db")
PG_DIALECT = postgresql.dialect()


def make_engine(settings: Settings) -> AsyncEngine:
    if settings.is_sqlite:
        # One connection: SQLite has a single writer, and queueing requests for the connection
        # is simpler and faster than retrying "database is locked".
        engine = create_async_engine(
            settings.database_url, pool_size=1, max_overflow=0, pool_timeout=30
        )
        event.listen(engine.sync_engine, "connect", _sqlite_pragmas)
        return engine
    return create_async_engine(
        settings.database_url,
        pool_size=settings.database_pool_size,
        max_overflow=settings.database_pool_size,
        pool_timeout=10,
        pool_pre_ping=True,
        pool_recycle=1800,
        connect_args={"timeout": 5, "server_settings": {"application_name": "channelgate"}},
    )


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
    def __init__(self, settings: Settings) -> None:
        self.engine = make_engine(settings)
        self.sessionmaker = async_sessionmaker(self.engine, expire_on_commit=False)
        self.is_postgres = self.engine.dialect.name == "postgresql"

    async def dispose(self) -> None:
        await self.engine.dispose()


async def get_session(request: Request) -> AsyncIterator[AsyncSession]:
    async with request.app.state.db.sessionmaker() as session:
        yield session


SessionDep = Annotated[AsyncSession, Depends(get_session)]


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
        params[name] = [json.dumps(value) for value in params[name]]
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


POLICY_CHANNEL = "channelgate_policy"


async def notify(session: AsyncSession, channel: str, payload: str) -> None:
    """pg_notify inside the session's transaction: delivered to every replica on commit.
    (SQLite has one process, nothing to tell.)"""
    if is_postgres(session):
        await session.execute(select(func.pg_notify(channel, payload)))


class Listener:
    """One dedicated PostgreSQL connection that LISTENs for cross-replica notifications and
    hands each payload to its channel's handler. Reconnects forever; after a reconnect it calls
    `on_reconnect`, since notifications sent while it was away are lost."""

    def __init__(
        self,
        database_url: str,
        handlers: dict[str, Callable[[str], None]],
        on_reconnect: Callable[[], None],
    ) -> None:
        self.dsn = make_url(database_url).set(drivername="postgresql").render_as_string(False)
        self.handlers = handlers
        self.on_reconnect = on_reconnect
        self.connected = asyncio.Event()

    async def run(self) -> None:
        import asyncpg

        while True:
            connection = None
            try:
                connection = await asyncpg.connect(self.dsn, timeout=5)
                closed = asyncio.Event()
                connection.add_termination_listener(lambda _, done=closed: done.set())
                for channel, handler in self.handlers.items():
                    await connection.add_listener(
                        channel, lambda _c, _p, _ch, payload, h=handler: h(payload)
                    )
                self.on_reconnect()
                self.connected.set()
                while not closed.is_set():
                    try:
                        await asyncio.wait_for(closed.wait(), timeout=30)
                    except TimeoutError:  # a silent network failure never closes the socket
                        await connection.fetchval("SELECT 1", timeout=5)
            except (OSError, asyncpg.PostgresError, TimeoutError) as exc:
                log.warning("LISTEN connection failed: %r; retrying", exc)
            finally:
                self.connected.clear()
                if connection is not None and not connection.is_closed():
                    await connection.close(timeout=2)
            await asyncio.sleep(2)
