"""staff listed by creation: GET /staff pages by (created_at, user id)

Revision ID: 41ee3ac24b3e
Revises: cbb8b60843ea
Create Date: 2026-12-01 19:56:50.537494
"""

from collections.abc import Sequence

from alembic import op

revision: str = "41ee3ac24b3e"
down_revision: str | None = "cbb8b60843ea"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_index(op.f("ix_staff_created_at"), "staff", ["created_at"], unique=False)


def downgrade() -> None:
    op.drop_index(op.f("ix_staff_created_at"), table_name="staff")
