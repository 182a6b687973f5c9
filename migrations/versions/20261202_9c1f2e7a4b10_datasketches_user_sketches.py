"""user sketches become Apache DataSketches HLL, rebuilt from the raw log where it still is

Revision ID: 9c1f2e7a4b10
Revises: 57739de3087a
Create Date: 2026-12-02 21:00:00.000000

The old sketches are registers of a hand-written HyperLogLog over a splitmix64 hash:
DataSketches hashes differently (MurmurHash3), so they cannot be converted, only rebuilt
from the users they saw. Every bucket that starts at or after the oldest event still in the
raw log is complete in the log (retention deletes events older than a cutoff, so nothing
after the oldest one left is missing), and its sketch is rebuilt from it, per group and for
all groups (chat id 0). Buckets that start earlier (past retention, or the one the oldest
event falls in) keep their old registers in `legacy`, which analytics.unique_users reads as
before and adds to the DataSketches estimate, flagged as estimated. Downgrading restores
the legacy registers and drops the rebuilt sketches (their buckets then count no users).
"""

from collections.abc import Sequence
from datetime import UTC, datetime

import sqlalchemy as sa
from alembic import op
from datasketches import hll_sketch, tgt_hll_type  # pyrefly: ignore[missing-module-attribute]

revision: str = "9c1f2e7a4b10"
down_revision: str | None = "57739de3087a"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

LG_K, HLL_TYPE = 14, tgt_hll_type.HLL_8  # analytics.LG_K, analytics.HLL_TYPE
ALL_GROUPS = 0
PAGE = 50_000

verifications = sa.table(
    "verifications",
    sa.column("id", sa.BigInteger),
    sa.column("chat_id", sa.BigInteger),
    sa.column("user_id", sa.BigInteger),
    sa.column("occurred_at", sa.DateTime(timezone=True)),
)
sketches = sa.table(
    "user_sketches",
    sa.column("grain", sa.String),
    sa.column("chat_id", sa.BigInteger),
    sa.column("bucket", sa.DateTime(timezone=True)),
    sa.column("sketch", sa.LargeBinary),
    sa.column("legacy", sa.LargeBinary),
)


def upgrade() -> None:
    with op.batch_alter_table("user_sketches") as batch:
        batch.alter_column("registers", new_column_name="sketch")
        batch.add_column(sa.Column("legacy", sa.LargeBinary(), nullable=True))
    bind = op.get_bind()
    sqlite = bind.dialect.name == "sqlite"

    def stored(at: datetime) -> datetime:  # as models.UTCDateTime binds it
        return at.astimezone(UTC).replace(tzinfo=None) if sqlite else at

    def read(at: datetime) -> datetime:
        return at.replace(tzinfo=UTC) if at.tzinfo is None else at.astimezone(UTC)

    oldest = bind.execute(sa.select(sa.func.min(verifications.c.occurred_at))).scalar()
    keep = sketches.c.bucket < stored(read(oldest)) if oldest is not None else sa.true()
    bind.execute(sketches.update().where(keep).values(legacy=sketches.c.sketch, sketch=b""))
    if oldest is None:
        return
    oldest = read(oldest)
    bind.execute(sketches.delete().where(sketches.c.legacy.is_(None)))

    open_sketches: dict[tuple[str, int, int], hll_sketch] = {}

    def flush() -> None:
        rows = [
            {
                "grain": grain,
                "chat_id": chat_id,
                "bucket": stored(datetime.fromtimestamp(bucket, UTC)),
                "sketch": sketch.serialize_compact(),
                "legacy": None,
            }
            for (grain, chat_id, bucket), sketch in sorted(open_sketches.items())
        ]
        if rows:
            bind.execute(sketches.insert(), rows)
        open_sketches.clear()

    first = int(oldest.timestamp())
    day, after = None, None  # the day being rebuilt; the last (occurred_at, id) read
    while True:
        page = sa.select(
            verifications.c.id,
            verifications.c.chat_id,
            verifications.c.user_id,
            verifications.c.occurred_at,
        ).order_by(verifications.c.occurred_at, verifications.c.id)
        if after is not None:
            page = page.where(
                sa.tuple_(verifications.c.occurred_at, verifications.c.id)
                > sa.tuple_(sa.literal(stored(after[0]), sa.DateTime(timezone=True)), after[1])
            )
        rows = bind.execute(page.limit(PAGE)).all()
        for row in rows:
            ts = int(read(row.occurred_at).timestamp())
            if ts - ts % 86400 != day:
                flush()  # a day's buckets are complete once the next day starts
                day = ts - ts % 86400
            for grain, bucket in (("h", ts - ts % 3600), ("d", ts - ts % 86400)):
                if bucket < first:
                    continue  # the legacy sketch of this bucket saw this user already
                for chat_id in (row.chat_id, ALL_GROUPS):
                    sketch = open_sketches.get((grain, chat_id, bucket))
                    if sketch is None:
                        sketch = open_sketches[grain, chat_id, bucket] = hll_sketch(LG_K, HLL_TYPE)
                    sketch.update(int(row.user_id))
        if len(rows) < PAGE:
            break
        after = (read(rows[-1].occurred_at), rows[-1].id)
    flush()


def downgrade() -> None:
    bind = op.get_bind()
    bind.execute(sketches.delete().where(sketches.c.legacy.is_(None)))
    bind.execute(sketches.update().values(sketch=sketches.c.legacy))
    with op.batch_alter_table("user_sketches") as batch:
        batch.drop_column("legacy")
        batch.alter_column("sketch", new_column_name="registers")
