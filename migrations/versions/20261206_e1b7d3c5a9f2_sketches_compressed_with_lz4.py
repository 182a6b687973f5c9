"""stored and delta user sketches compressed with lz4 instead of pglz (PostgreSQL)

Revision ID: e1b7d3c5a9f2
Revises: c4e8a2d1f6b3
Create Date: 2026-12-06 14:40:00

A sketch past a couple of thousand users is DataSketches' dense HLL_8 array, 16 KiB, which
PostgreSQL's TOAST compresses whenever a row is written: the folder rewrites every sketch a
pass touches. With the default pglz that compression took 7.2 % of the whole machine's CPU
samples (13 % of PostgreSQL's) during `bench/run.py`'s 4-client ingestion (`perf record -a`);
with lz4, 0.4 %. lz4 compresses these arrays less: a dense sketch is ~12.4 KiB stored
against ~9.5 (10⁶ users), 7.5 against 3.7 at 3,000 users. Values written before keep pglz
until the folder rewrites them (both decompress alike). A server built without lz4 keeps
pglz (nothing else depends on it). SQLite: nothing to do.
"""

from collections.abc import Sequence

from alembic import op

revision: str = "e1b7d3c5a9f2"
down_revision: str | None = "c4e8a2d1f6b3"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TABLES = ("user_sketches", "user_sketch_deltas")


def compress(method: str) -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    statements = " ".join(
        f"ALTER TABLE {table} ALTER COLUMN sketch SET COMPRESSION {method};" for table in TABLES
    )
    # A server built without lz4 refuses it (feature_not_supported): it keeps pglz.
    op.execute(f"DO $$ BEGIN {statements} EXCEPTION WHEN feature_not_supported THEN END $$")


def upgrade() -> None:
    compress("lz4")


def downgrade() -> None:
    compress("pglz")
