"""member counts kept from status transitions

Revision ID: cbb8b60843ea
Revises: e502f4049e13
Create Date: 2026-11-26 04:54:58.356924
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "cbb8b60843ea"
down_revision: str | None = "e502f4049e13"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "member_counts",
        sa.Column("chat_id", sa.BigInteger(), autoincrement=False, nullable=False),
        sa.Column("verified", sa.BigInteger(), nullable=False),
        sa.Column("restricted", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("chat_id", name=op.f("pk_member_counts")),
    )
    op.add_column("members", sa.Column("previous_status", sa.String(length=12), nullable=True))
    # Counts for the member states recorded so far; ingestion keeps them from here on.
    op.execute(
        "INSERT INTO member_counts (chat_id, verified, restricted) "
        "SELECT chat_id, "
        "SUM(CASE WHEN status = 'verified' THEN 1 ELSE 0 END), "
        "SUM(CASE WHEN status = 'restricted' THEN 1 ELSE 0 END) "
        "FROM members GROUP BY chat_id"
    )


def downgrade() -> None:
    op.drop_column("members", "previous_status")
    op.drop_table("member_counts")
