"""The migration that keys member states by (chat_id, user_id): every state kept, upserts
still merge by that key, and downgrading gives the surrogate ids back (SQLite file and, when
TEST_DATABASE_URL is set, a PostgreSQL database of the test's own)."""

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio
import pytest
from alembic import command
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from db import alembic_config
from tests.conftest import scratch_postgres

pytestmark = pytest.mark.anyio

BEFORE = "3f1d0c9a7b22"
COLUMNS = "chat_id, user_id, status, checks, updated_at"
STATES = [(-100, 7, "verified", 2), (-100, 8, "restricted", 1), (-200, 7, "unknown", 1)]


@asynccontextmanager
async def scratch(backend: str, tmp_path) -> AsyncIterator[str]:
    if backend == "sqlite":
        yield f"sqlite+aiosqlite:///{tmp_path / 'members.db'}"
        return
    async with scratch_postgres("members_migration") as url:
        yield url


async def states(engine: AsyncEngine) -> list[tuple]:
    async with engine.connect() as connection:
        rows = await connection.execute(
            text("SELECT chat_id, user_id, status, checks FROM members ORDER BY chat_id, user_id")
        )
        return [tuple(row) for row in rows]


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
async def test_member_states_survive_the_new_key_both_ways(backend: str, tmp_path) -> None:
    async with scratch(backend, tmp_path) as url:
        config = alembic_config(url)
        engine = create_async_engine(url)
        try:
            await anyio.to_thread.run_sync(command.upgrade, config, BEFORE)
            async with engine.begin() as connection:
                for chat, user, status, checks in STATES:
                    await connection.execute(
                        text(
                            f"INSERT INTO members ({COLUMNS}) "  # noqa: S608
                            "VALUES (:c, :u, :s, :n, CURRENT_TIMESTAMP)"
                        ),
                        {"c": chat, "u": user, "s": status, "n": checks},
                    )
            expected = sorted(STATES)
            await anyio.to_thread.run_sync(command.upgrade, config, "head")
            assert await states(engine) == expected
            if backend == "postgresql":  # room on each page for updates that write no index
                async with engine.connect() as connection:
                    options = await connection.execute(
                        text("SELECT reloptions FROM pg_class WHERE relname = 'members'")
                    )
                    assert options.scalar() == ["fillfactor=80"]
            async with engine.begin() as connection:  # the key still merges a member's state
                await connection.execute(
                    text(
                        f"INSERT INTO members ({COLUMNS}) "  # noqa: S608
                        "VALUES (-100, 7, 'verified', 3, CURRENT_TIMESTAMP) "
                        "ON CONFLICT (chat_id, user_id) DO UPDATE "
                        "SET checks = members.checks + excluded.checks"
                    )
                )
            assert (await states(engine))[1] == (-100, 7, "verified", 5)
            await anyio.to_thread.run_sync(command.downgrade, config, BEFORE)
            async with engine.begin() as connection:
                ids = (await connection.execute(text("SELECT id FROM members"))).scalars().all()
                await connection.execute(
                    text(
                        f"INSERT INTO members ({COLUMNS}) "  # noqa: S608
                        "VALUES (-300, 9, 'unknown', 1, CURRENT_TIMESTAMP)"
                    )
                )
            assert len(set(ids)) == len(STATES) and None not in ids
            assert len(await states(engine)) == len(STATES) + 1
        finally:
            await engine.dispose()
