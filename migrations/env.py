"""Alembic environment: async engine from settings, or a connection handed in by the app."""

import asyncio
from logging.config import fileConfig
from typing import Literal

from alembic import context
from alembic.autogenerate.api import AutogenContext
from sqlalchemy.engine import Connection

import models
import partitions
from db import make_engine
from settings import asyncpg_url, get_settings

config = context.config
if config.config_file_name is not None and config.attributes.get("configure_logging", True):
    fileConfig(config.config_file_name, disable_existing_loggers=False)

target_metadata = models.metadata


def render_item(type_: str, obj: object, autogen_context: AutogenContext) -> Literal[False] | str:
    """Render models.UTCDateTime as the plain column type: revisions must not import models."""
    if type_ == "type" and isinstance(obj, models.UTCDateTime):
        return "sa.DateTime(timezone=True)"
    return False


def include_object(
    obj: object, name: str | None, type_: str, reflected: bool, compare_to: object
) -> bool:
    """The log's partitions are tables of the database, not of the models (partitions.py)."""
    partition = name == partitions.DEFAULT or partitions.NAMED.fullmatch(name or "")
    return not (type_ == "table" and reflected and partition)


def do_run_migrations(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        compare_type=True,
        render_item=render_item,
        include_object=include_object,
        render_as_batch=connection.dialect.name == "sqlite",
    )
    with context.begin_transaction():
        if connection.dialect.name == "postgresql":
            # An index build on a big table may take longer than any request should; the
            # lock timeout stays, so a migration never queues the service's queries behind it.
            connection.exec_driver_sql("SET LOCAL statement_timeout = 0")
        context.run_migrations()


async def run_async_migrations() -> None:
    settings = get_settings()
    if url := config.attributes.get("database_url"):
        settings = settings.model_copy(update={"database_url": asyncpg_url(url)})
    engine = make_engine(settings)  # the service's own: libpq URL parameters, timeouts
    async with engine.connect() as connection:
        await connection.run_sync(do_run_migrations)
    await engine.dispose()


if context.is_offline_mode():
    context.configure(
        url=get_settings().database_url,
        target_metadata=target_metadata,
        literal_binds=True,
        dialect_opts={"paramstyle": "named"},
    )
    with context.begin_transaction():
        context.run_migrations()
elif (connection := config.attributes.get("connection")) is not None:
    do_run_migrations(connection)
else:
    asyncio.run(run_async_migrations())
