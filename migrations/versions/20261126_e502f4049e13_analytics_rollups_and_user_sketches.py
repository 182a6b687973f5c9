"""analytics rollups and user sketches

Revision ID: e502f4049e13
Revises: 718449b64005
Create Date: 2026-11-26 04:05:23.662563
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "e502f4049e13"
down_revision: str | None = "718449b64005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# BIGINT primary keys do not autoincrement on SQLite; INTEGER there is the 64-bit rowid.
BIG_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "channel_rollups",
        sa.Column("id", BIG_ID, nullable=False),
        sa.Column("grain", sa.String(length=1), nullable=False),
        sa.Column("chat_id", sa.BigInteger(), nullable=False),
        sa.Column("channel_id", sa.BigInteger(), nullable=False),
        sa.Column("bucket", sa.DateTime(timezone=True), nullable=False),
        sa.Column("blocks", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_channel_rollups")),
        sa.UniqueConstraint(
            "grain",
            "chat_id",
            "bucket",
            "channel_id",
            name=op.f("uq_channel_rollups_grain_chat_id_bucket_channel_id"),
        ),
    )
    op.create_index(
        op.f("ix_channel_rollups_grain_bucket_chat_id"),
        "channel_rollups",
        ["grain", "bucket", "chat_id"],
        unique=False,
    )
    op.create_table(
        "rollups",
        sa.Column("id", BIG_ID, nullable=False),
        sa.Column("grain", sa.String(length=1), nullable=False),
        sa.Column("chat_id", sa.BigInteger(), nullable=False),
        sa.Column("bucket", sa.DateTime(timezone=True), nullable=False),
        sa.Column("checks", sa.BigInteger(), nullable=False),
        sa.Column("passed", sa.BigInteger(), nullable=False),
        sa.Column("blocked", sa.BigInteger(), nullable=False),
        sa.Column("errors", sa.BigInteger(), nullable=False),
        sa.Column("cached", sa.BigInteger(), nullable=False),
        # latency histogram: lat_i counts checks below models.LATENCY_EDGES_MS[i] (lat_15: the rest)
        *[sa.Column(f"lat_{i}", sa.BigInteger(), nullable=False) for i in range(16)],
        sa.PrimaryKeyConstraint("id", name=op.f("pk_rollups")),
        sa.UniqueConstraint(
            "grain", "chat_id", "bucket", name=op.f("uq_rollups_grain_chat_id_bucket")
        ),
    )
    op.create_index(
        op.f("ix_rollups_grain_bucket_chat_id"),
        "rollups",
        ["grain", "bucket", "chat_id"],
        unique=False,
    )
    op.create_table(
        "user_sketches",
        sa.Column("id", BIG_ID, nullable=False),
        sa.Column("grain", sa.String(length=1), nullable=False),
        sa.Column("chat_id", sa.BigInteger(), nullable=False),
        sa.Column("bucket", sa.DateTime(timezone=True), nullable=False),
        sa.Column("registers", sa.LargeBinary(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_user_sketches")),
        sa.UniqueConstraint(
            "grain", "chat_id", "bucket", name=op.f("uq_user_sketches_grain_chat_id_bucket")
        ),
    )


def downgrade() -> None:
    op.drop_table("user_sketches")
    op.drop_index(op.f("ix_rollups_grain_bucket_chat_id"), table_name="rollups")
    op.drop_table("rollups")
    op.drop_index(op.f("ix_channel_rollups_grain_bucket_chat_id"), table_name="channel_rollups")
    op.drop_table("channel_rollups")
