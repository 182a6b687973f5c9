"""The async engine, the session factory, `SessionDep` and the PostgreSQL/SQLite helpers."""

from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import Depends, Request
from sqlalchemy import event
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)

from settings import Settings


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


def database(request: Request) -> Database:
    return request.app.state.db


async def get_session(request: Request) -> AsyncIterator[AsyncSession]:
    async with request.app.state.db.sessionmaker() as session:
        yield session


SessionDep = Annotated[AsyncSession, Depends(get_session)]


def upsert(session: AsyncSession, table: Any) -> Any:
    """`INSERT` with `on_conflict_do_*` for the session's dialect (both speak the same API)."""
    dialect = session.bind.dialect.name if session.bind else "sqlite"
    return (postgresql.insert if dialect == "postgresql" else sqlite.insert)(table)
