"""the log's idempotency key leads with occurred_at: (occurred_at, event_id)

Revision ID: c4e8a2d1f6b3
Revises: 5b7e2c91d4a3
Create Date: 2026-12-06 14:00:00

Bots make event ids with `uuid4()`: random. With the id first, every insert into the key's
B-tree lands on a random leaf page of the current week's index, so the whole index has to
stay in memory (or every insert is a random read), and each page's first change after a
checkpoint writes the whole page to the WAL. With the time first, a batch's inserts land at
the index's right edge, next to each other, like the log's other time-ordered indexes. The
same columns, so the same rule: an event is its id with its time (API.md). Inserting 300,000
events with asyncpg cost PostgreSQL 20.7 µs an event against 24.3 (bench/README.md).

PostgreSQL builds the new index on every partition under the log's ACCESS EXCLUSIVE lock
(writes and reads of the log wait; 1.2 s for 3,000,000 rows on the benchmark machine): run
it with ingestion paused, or let bots retry (their spools keep the events). SQLite copies
the table.
"""

from collections.abc import Sequence

from alembic import op

revision: str = "c4e8a2d1f6b3"
down_revision: str | None = "5b7e2c91d4a3"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

OLD, NEW = "uq_verifications_event_id_occurred_at", "uq_verifications_occurred_at_event_id"


def replace(drop: str, create: str, columns: list[str]) -> None:
    if op.get_bind().dialect.name == "postgresql":  # one statement: one pass over the log
        op.execute(
            f"ALTER TABLE verifications DROP CONSTRAINT {drop},"
            f" ADD CONSTRAINT {create} UNIQUE ({', '.join(columns)})"
        )
        return
    with op.batch_alter_table("verifications", recreate="always") as batch:
        batch.drop_constraint(drop, type_="unique")
        batch.create_unique_constraint(create, columns)


def upgrade() -> None:
    replace(OLD, NEW, ["occurred_at", "event_id"])


def downgrade() -> None:
    replace(NEW, OLD, ["event_id", "occurred_at"])
