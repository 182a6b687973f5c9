"""initial schema

Revision ID: 718449b64005
Revises:
Create Date: 2026-11-26 03:49:25.851942
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "718449b64005"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

JSON = sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql")
# BIGINT primary keys do not autoincrement on SQLite; INTEGER there is the 64-bit rowid.
BIG_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "audit_log",
        sa.Column("id", BIG_ID, nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("actor_kind", sa.String(length=8), nullable=False),
        sa.Column("actor_id", sa.String(length=64), nullable=False),
        sa.Column("actor_name", sa.String(length=320), nullable=True),
        sa.Column("action", sa.String(length=64), nullable=False),
        sa.Column("resource", sa.String(length=32), nullable=False),
        sa.Column("resource_id", sa.String(length=64), nullable=False),
        sa.Column("before", JSON, nullable=True),
        sa.Column("after", JSON, nullable=True),
        sa.Column("request_id", sa.String(length=64), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_audit_log")),
    )
    op.create_index(op.f("ix_audit_log_action"), "audit_log", ["action"], unique=False)
    op.create_index(
        op.f("ix_audit_log_actor_id_at_id"), "audit_log", ["actor_id", "at", "id"], unique=False
    )
    op.create_index(op.f("ix_audit_log_at_id"), "audit_log", ["at", "id"], unique=False)
    op.create_index(
        op.f("ix_audit_log_resource_resource_id_at"),
        "audit_log",
        ["resource", "resource_id", "at"],
        unique=False,
    )
    op.create_table(
        "bot_instances",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("instance_id", sa.String(length=64), nullable=False),
        sa.Column("key_name", sa.String(length=64), nullable=False),
        sa.Column("version", sa.String(length=64), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("last_seen_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("stats", JSON, nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_bot_instances")),
        sa.UniqueConstraint("instance_id", name=op.f("uq_bot_instances_instance_id")),
    )
    op.create_table(
        "bot_keys",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("prefix", sa.String(length=12), nullable=False),
        sa.Column("key_hash", sa.String(length=64), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("last_used_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_bot_keys")),
        sa.UniqueConstraint("key_hash", name=op.f("uq_bot_keys_key_hash")),
    )
    op.create_table(
        "channels",
        sa.Column("chat_id", sa.BigInteger(), nullable=False),
        sa.Column("title", sa.String(length=255), nullable=False),
        sa.Column("username", sa.String(length=32), nullable=True),
        sa.Column("invite_link", sa.String(length=255), nullable=True),
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("subscriber_count", sa.Integer(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_channels")),
        sa.UniqueConstraint("chat_id", name=op.f("uq_channels_chat_id")),
    )
    op.create_index(op.f("ix_channels_created_at"), "channels", ["created_at"], unique=False)
    op.create_index(op.f("ix_channels_username"), "channels", ["username"], unique=False)
    op.create_table(
        "groups",
        sa.Column("mode", sa.String(length=8), nullable=False),
        sa.Column("action", sa.String(length=8), nullable=False),
        sa.Column("mute_seconds", sa.Integer(), nullable=False),
        sa.Column("warning_text", sa.String(length=1024), nullable=False),
        sa.Column("warning_ttl_seconds", sa.Integer(), nullable=False),
        sa.Column("check_on_join", sa.Boolean(), nullable=False),
        sa.Column("on_error", sa.String(length=8), nullable=False),
        sa.Column("exempt_user_ids", JSON, nullable=False),
        sa.Column("recheck_seconds", sa.Integer(), nullable=False),
        sa.Column("chat_id", sa.BigInteger(), nullable=False),
        sa.Column("title", sa.String(length=255), nullable=False),
        sa.Column("username", sa.String(length=32), nullable=True),
        sa.Column("is_active", sa.Boolean(), nullable=False),
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("member_count", sa.Integer(), nullable=True),
        sa.Column("added_by_user_id", sa.BigInteger(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_groups")),
        sa.UniqueConstraint("chat_id", name=op.f("uq_groups_chat_id")),
    )
    op.create_index(op.f("ix_groups_created_at"), "groups", ["created_at"], unique=False)
    op.create_index(op.f("ix_groups_username"), "groups", ["username"], unique=False)
    op.create_table(
        "members",
        sa.Column("id", BIG_ID, nullable=False),
        sa.Column("chat_id", sa.BigInteger(), nullable=False),
        sa.Column("user_id", sa.BigInteger(), nullable=False),
        sa.Column("status", sa.String(length=12), nullable=False),
        sa.Column("verified_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("restricted_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("checks", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_members")),
        sa.UniqueConstraint("chat_id", "user_id", name=op.f("uq_members_chat_id_user_id")),
    )
    op.create_index(
        op.f("ix_members_chat_id_status_user_id"),
        "members",
        ["chat_id", "status", "user_id"],
        unique=False,
    )
    op.create_table(
        "staff",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("user_id", sa.Uuid(), nullable=False),
        sa.Column("email", sa.String(length=320), nullable=True),
        sa.Column("role", sa.String(length=8), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_staff")),
        sa.UniqueConstraint("user_id", name=op.f("uq_staff_user_id")),
    )
    op.create_table(
        "verifications",
        sa.Column("id", BIG_ID, nullable=False),
        sa.Column("event_id", sa.Uuid(), nullable=False),
        sa.Column("chat_id", sa.BigInteger(), nullable=False),
        sa.Column("user_id", sa.BigInteger(), nullable=False),
        sa.Column("result", sa.String(length=8), nullable=False),
        sa.Column("trigger", sa.String(length=16), nullable=False),
        sa.Column("missing_channel_ids", JSON, nullable=False),
        sa.Column("cached", sa.Boolean(), nullable=False),
        sa.Column("latency_ms", sa.Integer(), nullable=False),
        sa.Column("error", sa.String(length=200), nullable=True),
        sa.Column("occurred_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("received_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_verifications")),
        sa.UniqueConstraint("event_id", name=op.f("uq_verifications_event_id")),
    )
    op.create_index(
        op.f("ix_verifications_chat_id_occurred_at_id"),
        "verifications",
        ["chat_id", "occurred_at", "id"],
        unique=False,
    )
    op.create_index(
        op.f("ix_verifications_occurred_at_id"),
        "verifications",
        ["occurred_at", "id"],
        unique=False,
    )
    op.create_index(
        op.f("ix_verifications_user_id_occurred_at_id"),
        "verifications",
        ["user_id", "occurred_at", "id"],
        unique=False,
    )
    op.create_table(
        "group_channels",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("group_id", sa.Integer(), nullable=False),
        sa.Column("channel_id", sa.Integer(), nullable=False),
        sa.Column("position", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["channel_id"],
            ["channels.id"],
            name=op.f("fk_group_channels_channel_id_channels"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["group_id"],
            ["groups.id"],
            name=op.f("fk_group_channels_group_id_groups"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_group_channels")),
        sa.UniqueConstraint(
            "group_id", "channel_id", name=op.f("uq_group_channels_group_id_channel_id")
        ),
    )
    op.create_index(
        op.f("ix_group_channels_channel_id"), "group_channels", ["channel_id"], unique=False
    )


def downgrade() -> None:
    op.drop_index(op.f("ix_group_channels_channel_id"), table_name="group_channels")
    op.drop_table("group_channels")
    op.drop_index(op.f("ix_verifications_user_id_occurred_at_id"), table_name="verifications")
    op.drop_index(op.f("ix_verifications_occurred_at_id"), table_name="verifications")
    op.drop_index(op.f("ix_verifications_chat_id_occurred_at_id"), table_name="verifications")
    op.drop_table("verifications")
    op.drop_table("staff")
    op.drop_index(op.f("ix_members_chat_id_status_user_id"), table_name="members")
    op.drop_table("members")
    op.drop_index(op.f("ix_groups_username"), table_name="groups")
    op.drop_index(op.f("ix_groups_created_at"), table_name="groups")
    op.drop_table("groups")
    op.drop_index(op.f("ix_channels_username"), table_name="channels")
    op.drop_index(op.f("ix_channels_created_at"), table_name="channels")
    op.drop_table("channels")
    op.drop_table("bot_keys")
    op.drop_table("bot_instances")
    op.drop_index(op.f("ix_audit_log_resource_resource_id_at"), table_name="audit_log")
    op.drop_index(op.f("ix_audit_log_at_id"), table_name="audit_log")
    op.drop_index(op.f("ix_audit_log_actor_id_at_id"), table_name="audit_log")
    op.drop_index(op.f("ix_audit_log_action"), table_name="audit_log")
    op.drop_table("audit_log")
