"""members keyed by (chat_id, user_id), with room for HOT updates: the surrogate id goes

Revision ID: 5b7e2c91d4a3
Revises: 3f1d0c9a7b22
Create Date: 2026-12-06 09:00:00

Nothing reads a member state by `id`: every read, and ingestion's upsert, go by
(chat_id, user_id). The id's index was one of the three a member upsert writes for each
new or changed state. On PostgreSQL the key's index is built beside the unique one, which
lets reads go on meanwhile (writes wait for the build), then becomes the primary key
(`ADD PRIMARY KEY USING INDEX`, a moment's lock); SQLite copies the table.

A member's state is updated far more often than it is created (every check of a known
member), and an update that leaves its indexed columns alone (chat, user, status) writes no
index entry when the new row version fits on the same page (a HOT update): fillfactor 80
leaves a fifth of each page for that. It applies to pages filled from now on.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "5b7e2c91d4a3"
down_revision: str | None = "3f1d0c9a7b22"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute("CREATE UNIQUE INDEX members_key ON members (chat_id, user_id)")
        op.drop_constraint("pk_members", "members", type_="primary")
        op.drop_constraint("uq_members_chat_id_user_id", "members", type_="unique")
        op.execute(
            "ALTER TABLE members ADD CONSTRAINT pk_members PRIMARY KEY USING INDEX members_key"
        )
        op.drop_column("members", "id")
        op.execute("ALTER TABLE members SET (fillfactor = 80)")
        return
    with op.batch_alter_table("members", recreate="always") as batch:
        batch.drop_constraint("uq_members_chat_id_user_id", type_="unique")
        batch.drop_constraint("pk_members", type_="primary")
        batch.drop_column("id")
        batch.create_primary_key("pk_members", ["chat_id", "user_id"])


def downgrade() -> None:
    id_type = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
    if op.get_bind().dialect.name == "postgresql":
        op.execute("ALTER TABLE members RESET (fillfactor)")
        op.execute("ALTER TABLE members ADD COLUMN id BIGSERIAL")
        op.execute(
            "ALTER TABLE members ADD CONSTRAINT uq_members_chat_id_user_id "
            "UNIQUE (chat_id, user_id)"
        )
        op.drop_constraint("pk_members", "members", type_="primary")
        op.create_primary_key("pk_members", "members", ["id"])
        return
    with op.batch_alter_table("members", recreate="always") as batch:
        batch.drop_constraint("pk_members", type_="primary")
        batch.add_column(sa.Column("id", id_type, nullable=True))
    op.execute("UPDATE members SET id = rowid")
    with op.batch_alter_table("members", recreate="always") as batch:
        batch.alter_column("id", existing_type=id_type, nullable=False)
        batch.create_primary_key("pk_members", ["id"])
        batch.create_unique_constraint("uq_members_chat_id_user_id", ["chat_id", "user_id"])
