"""group migrations: where a migrated chat id went, so late events follow their group

Revision ID: 57739de3087a
Revises: 41ee3ac24b3e
Create Date: 2026-12-02 15:44:26.233425
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "57739de3087a"
down_revision: str | None = "41ee3ac24b3e"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "group_migrations",
        sa.Column("old_chat_id", sa.BigInteger(), autoincrement=False, nullable=False),
        sa.Column("new_chat_id", sa.BigInteger(), nullable=False),
        sa.Column("migrated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("old_chat_id", name=op.f("pk_group_migrations")),
    )


def downgrade() -> None:
    op.drop_table("group_migrations")
