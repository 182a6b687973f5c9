"""rollup deltas: ingestion inserts per-batch deltas that a background folder merges

Revision ID: 126b9b5f3b09
Revises: 9c1f2e7a4b10
Create Date: 2026-12-03 06:58:10.757071

Four insert-only tables beside the rollups, channel rollups, member counts and user sketches
(see analytics.fold). Downgrading folds whatever deltas are left into their tables first, as
the folder would, so no acknowledged event goes uncounted by the older code.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from datasketches import hll_sketch, hll_union, tgt_hll_type  # pyrefly: ignore[missing-module-attribute]

revision: str = "126b9b5f3b09"
down_revision: str | None = "9c1f2e7a4b10"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "channel_rollup_deltas",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("grain", sa.String(length=1), nullable=False),
        sa.Column("chat_id", sa.BigInteger(), nullable=False),
        sa.Column("channel_id", sa.BigInteger(), nullable=False),
        sa.Column("bucket", sa.DateTime(timezone=True), nullable=False),
        sa.Column("blocks", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_channel_rollup_deltas")),
    )
    op.create_table(
        "member_count_deltas",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("chat_id", sa.BigInteger(), nullable=False),
        sa.Column("verified", sa.BigInteger(), nullable=False),
        sa.Column("restricted", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_member_count_deltas")),
    )
    op.create_table(
        "rollup_deltas",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("grain", sa.String(length=1), nullable=False),
        sa.Column("chat_id", sa.BigInteger(), nullable=False),
        sa.Column("bucket", sa.DateTime(timezone=True), nullable=False),
        sa.Column("checks", sa.BigInteger(), nullable=False),
        sa.Column("passed", sa.BigInteger(), nullable=False),
        sa.Column("blocked", sa.BigInteger(), nullable=False),
        sa.Column("errors", sa.BigInteger(), nullable=False),
        sa.Column("cached", sa.BigInteger(), nullable=False),
        sa.Column("lat_0", sa.BigInteger(), nullable=False),
        sa.Column("lat_1", sa.BigInteger(), nullable=False),
        sa.Column("lat_2", sa.BigInteger(), nullable=False),
        sa.Column("lat_3", sa.BigInteger(), nullable=False),
        sa.Column("lat_4", sa.BigInteger(), nullable=False),
        sa.Column("lat_5", sa.BigInteger(), nullable=False),
        sa.Column("lat_6", sa.BigInteger(), nullable=False),
        sa.Column("lat_7", sa.BigInteger(), nullable=False),
        sa.Column("lat_8", sa.BigInteger(), nullable=False),
        sa.Column("lat_9", sa.BigInteger(), nullable=False),
        sa.Column("lat_10", sa.BigInteger(), nullable=False),
        sa.Column("lat_11", sa.BigInteger(), nullable=False),
        sa.Column("lat_12", sa.BigInteger(), nullable=False),
        sa.Column("lat_13", sa.BigInteger(), nullable=False),
        sa.Column("lat_14", sa.BigInteger(), nullable=False),
        sa.Column("lat_15", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_rollup_deltas")),
    )
    op.create_table(
        "user_sketch_deltas",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("grain", sa.String(length=1), nullable=False),
        sa.Column("chat_id", sa.BigInteger(), nullable=False),
        sa.Column("bucket", sa.DateTime(timezone=True), nullable=False),
        sa.Column("sketch", sa.LargeBinary(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_user_sketch_deltas")),
    )


LG_K, HLL_TYPE = 14, tgt_hll_type.HLL_8  # analytics.LG_K, analytics.HLL_TYPE
LATENCY = [f"lat_{i}" for i in range(16)]
SUMMED = (  # delta table, its table, key, summed columns
    ("rollup_deltas", "rollups", ["grain", "chat_id", "bucket"],
     ["checks", "passed", "blocked", "errors", "cached", *LATENCY]),
    ("channel_rollup_deltas", "channel_rollups", ["grain", "chat_id", "bucket", "channel_id"],
     ["blocks"]),
    ("member_count_deltas", "member_counts", ["chat_id"], ["verified", "restricted"]),
)  # fmt: skip


def fold_left() -> None:
    """Merge every delta still there into its table (what analytics.fold does)."""
    bind = op.get_bind()
    for deltas, table, key, summed in SUMMED:
        keys, sums = ", ".join(key), ", ".join(f"sum({c})" for c in summed)
        added = ", ".join(f"{c} = {table}.{c} + excluded.{c}" for c in summed)
        bind.execute(
            sa.text(
                f"INSERT INTO {table} ({keys}, {', '.join(summed)}) "  # noqa: S608
                f"SELECT {keys}, {sums} FROM {deltas} WHERE true GROUP BY {keys} "
                f"ON CONFLICT ({keys}) DO UPDATE SET {added}"
            )
        )
        bind.execute(sa.text(f"DELETE FROM {deltas}"))  # noqa: S608
    sketches: dict[tuple, hll_union] = {}
    rows = bind.execute(sa.text("SELECT grain, chat_id, bucket, sketch FROM user_sketch_deltas"))
    for grain, chat_id, bucket, sketch in rows:
        union = sketches.setdefault((grain, chat_id, bucket), hll_union(LG_K))
        union.update(hll_sketch.deserialize(sketch))
    for (grain, chat_id, bucket), union in sketches.items():
        where = {"grain": grain, "chat_id": chat_id, "bucket": bucket}
        stored = bind.execute(
            sa.text(
                "SELECT sketch FROM user_sketches "
                "WHERE grain = :grain AND chat_id = :chat_id AND bucket = :bucket"
            ),
            where,
        ).scalar()
        if stored:
            union.update(hll_sketch.deserialize(stored))
        sketch = union.get_result(HLL_TYPE).serialize_compact()
        bind.execute(
            sa.text(
                "INSERT INTO user_sketches (grain, chat_id, bucket, sketch) "
                "VALUES (:grain, :chat_id, :bucket, :sketch) "
                "ON CONFLICT (grain, chat_id, bucket) DO UPDATE SET sketch = excluded.sketch"
            ),
            {**where, "sketch": sketch},
        )


def downgrade() -> None:
    fold_left()
    op.drop_table("user_sketch_deltas")
    op.drop_table("rollup_deltas")
    op.drop_table("member_count_deltas")
    op.drop_table("channel_rollup_deltas")
