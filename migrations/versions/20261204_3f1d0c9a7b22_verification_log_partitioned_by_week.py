"""verification log partitioned by week on PostgreSQL; unique (event_id, occurred_at)

Revision ID: 3f1d0c9a7b22
Revises: 126b9b5f3b09
Create Date: 2026-12-04 19:05:00

PostgreSQL: `verifications` becomes a table range-partitioned on `occurred_at`: a partition
per week (Monday to Monday, UTC) from 90 days back (the default RETENTION_DAYS) to 7 days
ahead, and a default partition for anything else; the rows are copied in, ids and their
sequence kept. A unique key on a partitioned table must contain the partition key, so the
primary key becomes (id, occurred_at) and the idempotency key (event_id, occurred_at). The
service makes the later weeks' partitions itself (partitions.py). On a large log this copies
every row: run it with ingestion stopped, or purge first. SQLite keeps one table, with the
new unique key.
"""

from collections.abc import Sequence
from datetime import UTC, datetime, timedelta

from alembic import op

revision: str = "3f1d0c9a7b22"
down_revision: str | None = "126b9b5f3b09"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

COLUMNS = (
    "id, event_id, chat_id, user_id, result, trigger, missing_channel_ids, cached, latency_ms,"
    " error, occurred_at, received_at"
)
INDEXES = {
    "ix_verifications_chat_id_occurred_at_id": "chat_id, occurred_at, id",
    "ix_verifications_occurred_at_id": "occurred_at, id",
    "ix_verifications_user_id_occurred_at_id": "user_id, occurred_at, id",
}


def rebuild(partitioned: bool) -> None:
    """Copy the log into a new `verifications`, partitioned or not, and drop the old one."""
    op.execute("ALTER TABLE verifications RENAME TO verifications_old")
    op.execute("ALTER SEQUENCE verifications_id_seq OWNED BY NONE")
    old_unique = "uq_verifications_event_id" + ("" if partitioned else "_occurred_at")
    op.execute(f"ALTER TABLE verifications_old DROP CONSTRAINT {old_unique}")
    op.execute("ALTER TABLE verifications_old DROP CONSTRAINT pk_verifications")
    for name in INDEXES:
        op.execute(f"DROP INDEX {name}")
    if partitioned:
        keys = (
            "CONSTRAINT pk_verifications PRIMARY KEY (id, occurred_at),"
            " CONSTRAINT uq_verifications_event_id_occurred_at UNIQUE (event_id, occurred_at)"
        )
    else:
        keys = (
            "CONSTRAINT pk_verifications PRIMARY KEY (id),"
            " CONSTRAINT uq_verifications_event_id UNIQUE (event_id)"
        )
    op.execute(
        "CREATE TABLE verifications (LIKE verifications_old INCLUDING DEFAULTS, "
        + keys
        + (") PARTITION BY RANGE (occurred_at)" if partitioned else ")")
    )
    for name, columns in INDEXES.items():
        op.execute(f"CREATE INDEX {name} ON verifications ({columns})")
    if partitioned:
        op.execute("CREATE TABLE verifications_default PARTITION OF verifications DEFAULT")
        today = datetime.now(UTC).date()
        week = today - timedelta(days=90)
        week -= timedelta(days=week.weekday())  # its Monday
        while week <= today + timedelta(days=7):
            low, high = week.isoformat(), (week + timedelta(days=7)).isoformat()
            op.execute(
                f"CREATE TABLE verifications_{week:%Y%m%d} PARTITION OF verifications"
                f" FOR VALUES FROM ('{low} 00:00:00+00') TO ('{high} 00:00:00+00')"
            )
            week += timedelta(days=7)
    else:  # keep the newest event of an (event_id) the partitioned log held twice
        op.execute(
            "DELETE FROM verifications_old a USING verifications_old b"
            " WHERE a.event_id = b.event_id AND a.id < b.id"
        )
    op.execute(
        f"INSERT INTO verifications ({COLUMNS}) SELECT {COLUMNS} FROM verifications_old"  # noqa: S608
    )
    op.execute("DROP TABLE verifications_old")
    op.execute("ALTER SEQUENCE verifications_id_seq OWNED BY verifications.id")


def upgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        rebuild(partitioned=True)
        return
    with op.batch_alter_table("verifications") as batch:
        batch.drop_constraint("uq_verifications_event_id", type_="unique")
        batch.create_unique_constraint(
            "uq_verifications_event_id_occurred_at", ["event_id", "occurred_at"]
        )


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        rebuild(partitioned=False)
        return
    op.execute(
        "DELETE FROM verifications WHERE id NOT IN"
        " (SELECT max(id) FROM verifications GROUP BY event_id)"
    )
    with op.batch_alter_table("verifications") as batch:
        batch.drop_constraint("uq_verifications_event_id_occurred_at", type_="unique")
        batch.create_unique_constraint("uq_verifications_event_id", ["event_id"])
