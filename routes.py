"""Every endpoint: routers `dashboard` (Supabase staff), `bot` (bot keys) and `service`."""

import asyncio
import base64
import binascii
import csv
import io
import json
import re
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Header, HTTPException, Path, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import StreamingResponse
from pydantic import ValidationError
from sqlalchemy import ColumnElement, delete, func, or_, select, text, tuple_, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession
from sqlmodel import col

import analytics
from analytics import Window, floor_day, floor_hour
from auth import (
    BotCaller,
    CurrentStaff,
    Editor,
    Owner,
    Principal,
    authenticate_bot,
    hash_key,
    new_bot_key,
)
from db import POLICY_CHANNEL, Database, SessionDep, notify, upsert
from feed import Feed, audit_rows
from ingest import MemberDelta, ingest, local_status, recount_members
from models import (
    LATENCY_COLUMNS,
    MAX_CHANNELS_PER_GROUP,
    SETTING_FIELDS,
    AnalyticsSummary,
    AuditLog,
    AuditPublic,
    BotChannelPut,
    BotGroupPut,
    BotInstance,
    BotInstancePublic,
    BotKey,
    BotKeyCreate,
    BotKeyCreated,
    BotKeyPublic,
    Channel,
    ChannelBlocks,
    ChannelBlocksList,
    ChannelChatId,
    ChannelCreate,
    ChannelPublic,
    ChannelRef,
    ChannelSummary,
    ChannelUpdate,
    ChatRef,
    ChatRefList,
    CountedPage,
    Group,
    GroupChannel,
    GroupChatId,
    GroupCreate,
    GroupMigrate,
    GroupPublic,
    GroupRef,
    GroupStats,
    GroupSummary,
    GroupUpdate,
    Heartbeat,
    IngestResult,
    Latency,
    Me,
    Member,
    MemberPublic,
    MemberState,
    Page,
    Policy,
    Staff,
    StaffPublic,
    StaffPut,
    Timeseries,
    TopGroup,
    TopGroups,
    UserId,
    Verification,
    VerificationBatch,
    VerificationPublic,
    member_counts,
    utcnow,
)

INT64 = 2**63 - 1
ChatIdPath = Annotated[int, Path(ge=-INT64, le=INT64)]
ChannelIdPath = Annotated[int, Path(ge=-INT64, le=INT64)]
Limit = Annotated[int, Query(ge=1, le=200)]
Cursor = Annotated[str | None, Query(max_length=512)]
Search = Annotated[str | None, Query(min_length=1, max_length=255, pattern=r"^[^\x00]*$")]
CHAT_ID_RE = re.compile(r"-?[0-9]{1,19}")
Since = Annotated[datetime | None, Query()]
Until = Annotated[datetime | None, Query()]

dashboard = APIRouter(prefix="/api/v1")
HEARTBEAT_SECONDS = 30
DEFAULT_RECHECK_SECONDS = 600
NewGroupIdPath = Annotated[GroupChatId, Path()]
NewChannelIdPath = Annotated[ChannelChatId, Path()]
service = APIRouter()


# ---------------------------------------------------------------- shared helpers


def not_found(what: str) -> HTTPException:
    return HTTPException(404, f"{what} not found")


def conflict(detail: str) -> HTTPException:
    return HTTPException(409, detail)


def invalid_query(name: str, msg: str) -> RequestValidationError:
    return RequestValidationError([{"loc": ("query", name), "msg": msg, "type": "value_error"}])


def aware(value: datetime | None, name: str) -> datetime | None:
    if value is not None and value.tzinfo is None:
        raise invalid_query(name, "needs a time zone, e.g. 2026-11-26T10:00:00Z")
    return value


def encode_cursor(sort: str, values: Sequence[Any]) -> str:
    raw = json.dumps([sort, *[v.isoformat() if isinstance(v, datetime) else v for v in values]])
    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


def decode_cursor(cursor: str, sort: str, kinds: Sequence[type]) -> list[Any]:
    """Parse a cursor made by `encode_cursor` for `sort`; anything else is a 422."""
    try:
        raw = json.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
        if not isinstance(raw, list) or len(raw) != len(kinds) + 1 or raw[0] != sort:
            raise ValueError
        values: list[Any] = []
        for kind, value in zip(kinds, raw[1:], strict=True):
            if kind is datetime:
                parsed = datetime.fromisoformat(value)
                if parsed.tzinfo is None:
                    raise ValueError
                values.append(parsed.astimezone(UTC))
            elif cursor_scalar_ok(kind, value):
                values.append(value)
            else:
                raise ValueError
        return values
    except (ValueError, TypeError, OverflowError, binascii.Error, UnicodeDecodeError):
        raise invalid_query("cursor", "malformed cursor; use next_cursor as returned") from None


def cursor_scalar_ok(kind: type, value: object) -> bool:
    if kind is int:
        return type(value) is int and -INT64 <= value <= INT64
    return kind is str and isinstance(value, str) and "\x00" not in value


def keyset(columns: Sequence[Any], values: Sequence[Any], descending: bool) -> ColumnElement[bool]:
    row = tuple_(*columns)
    return row < tuple_(*values) if descending else row > tuple_(*values)


def order(columns: Sequence[Any], descending: bool) -> list[Any]:
    return [c.desc() if descending else c.asc() for c in columns]


def if_match(header: str | None, version: int) -> None:
    """412 unless the If-Match header (if any) names the current version."""
    if header is None or header.strip() == "*":
        return
    tags = {t.strip().removeprefix("W/").strip('"') for t in header.split(",")}
    if str(version) not in tags:
        raise HTTPException(412, f"version {version} is current; reload and retry")


def etag(response: Response, version: int) -> None:
    response.headers["ETag"] = f'"{version}"'


def snapshot(row: Any, exclude: set[str] | None = None) -> dict[str, Any]:
    return row.model_dump(mode="json", exclude={"id", *(exclude or set())})


def audit(
    session: AsyncSession,
    actor: Principal,
    action: str,
    resource: str,
    resource_id: object,
    before: dict[str, Any] | None = None,
    after: dict[str, Any] | None = None,
) -> None:
    row = AuditLog(
        actor_kind="bot" if actor.kind == "bot" else "staff",
        actor_id=actor.id,
        actor_name=actor.name,
        action=action,
        resource=resource,
        resource_id=str(resource_id),
        before=before,
        after=after,
        request_id=actor.request_id,
    )
    session.add(row)
    audit_rows(session).append(row)  # announced on the live feed at commit


class PolicyCache:
    """chat id -> (serialized policy, ETag), or None for "no such group". Entries are dropped
    after every committed change to a group, its links or a linked channel (here at once, on
    other replicas through NOTIFY); the generation counter keeps a read that raced a change
    from caching what it read."""

    def __init__(self) -> None:
        self.entries: dict[int, tuple[bytes, str] | None] = {}
        self.generation = 0

    def invalidate(self, *chat_ids: int) -> None:
        self.generation += 1
        for chat_id in chat_ids:
            self.entries.pop(chat_id, None)

    def clear(self) -> None:
        self.generation += 1
        self.entries.clear()

    def put(self, chat_id: int, entry: tuple[bytes, str] | None, generation: int) -> None:
        if generation == self.generation:
            if len(self.entries) >= 100_000:
                self.entries.clear()
            self.entries[chat_id] = entry


def policy_cache(request: Request) -> PolicyCache:
    return request.app.state.policies


async def commit_policy_change(
    session: AsyncSession, policies: PolicyCache, *chat_ids: int
) -> None:
    """Commit a change to the policies of these groups and drop them from every cache."""
    if chat_ids:
        await notify(session, POLICY_CHANNEL, ",".join(map(str, chat_ids)))
    await session.commit()
    policies.invalidate(*chat_ids)


PolicyCacheDep = Annotated[PolicyCache, Depends(policy_cache)]


# ---------------------------------------------------------------- groups


async def load_group(session: AsyncSession, chat_id: int, *, lock: bool = False) -> Group:
    stmt = select(Group).where(col(Group.chat_id) == chat_id)
    group = await session.scalar(stmt.with_for_update() if lock else stmt)
    if group is None:
        raise not_found(f"group {chat_id}")
    return group


async def group_dep(chat_id: ChatIdPath, session: SessionDep) -> Group:
    return await load_group(session, chat_id)


GroupDep = Annotated[Group, Depends(group_dep)]


def channel_count_column() -> Any:
    return (
        select(func.count())
        .where(col(GroupChannel.group_id) == col(Group.id))
        .correlate(Group)
        .scalar_subquery()
        .label("channel_count")
    )


async def linked_channels(session: AsyncSession, group_id: int) -> list[ChannelRef]:
    rows = await session.scalars(
        select(Channel)
        .join(GroupChannel, col(GroupChannel.channel_id) == col(Channel.id))
        .where(col(GroupChannel.group_id) == group_id)
        .order_by(col(GroupChannel.position))
    )
    return [ChannelRef.model_validate(c, from_attributes=True) for c in rows]


async def group_stats(session: AsyncSession, chat_id: int) -> GroupStats:
    members = (
        await session.execute(
            select(
                func.count().filter(col(Member.status) == "verified"),
                func.count().filter(col(Member.status) == "restricted"),
            ).where(col(Member.chat_id) == chat_id)
        )
    ).one()
    checks = (
        await session.execute(
            select(func.count(), func.count().filter(col(Verification.result) == "passed")).where(
                col(Verification.chat_id) == chat_id,
                col(Verification.occurred_at) >= utcnow() - timedelta(hours=24),
            )
        )
    ).one()
    return GroupStats(
        verified_members=members[0],
        restricted_members=members[1],
        checks_24h=checks[0],
        pass_rate_24h=checks[1] / checks[0] if checks[0] else None,
    )


async def group_public(session: AsyncSession, group: Group) -> GroupPublic:
    assert group.id is not None
    channels = await linked_channels(session, group.id)
    return GroupPublic.model_validate(
        {
            **group.model_dump(),
            "channel_count": len(channels),
            "channels": channels,
            "stats": await group_stats(session, group.chat_id),
        }
    )


async def bump_groups_linked_to(session: AsyncSession, channel_id: int) -> list[int]:
    """A linked channel changed, so the policy of every group requiring it changed."""
    linked = select(col(GroupChannel.group_id)).where(col(GroupChannel.channel_id) == channel_id)
    result = await session.execute(
        update(Group)
        .where(col(Group.id).in_(linked))
        .values(version=col(Group.version) + 1)
        .returning(col(Group.chat_id))
    )
    return list(result.scalars())


GroupSort = Literal["title", "-title", "created_at", "-created_at"]


@dashboard.get("/groups", response_model=CountedPage[GroupSummary], tags=["groups"])
async def list_groups(
    session: SessionDep,
    _: CurrentStaff,
    q: Search = None,
    active: bool | None = None,
    sort: GroupSort = "-created_at",
    limit: Limit = 50,
    cursor: Cursor = None,
) -> CountedPage[GroupSummary]:
    """List protected groups."""
    filters: list[ColumnElement[bool]] = []
    if q is not None:
        match = [col(Group.title).icontains(q, autoescape=True)]
        match.append(col(Group.username).icontains(q.removeprefix("@"), autoescape=True))
        if CHAT_ID_RE.fullmatch(q) and abs(int(q)) <= INT64:
            match.append(col(Group.chat_id) == int(q))
        filters.append(or_(*match))
    if active is not None:
        filters.append(col(Group.is_active) == active)
    total = await session.scalar(select(func.count()).select_from(Group).where(*filters))
    key_column: Any = col(Group.title) if sort.endswith("title") else col(Group.created_at)
    descending = sort.startswith("-")
    columns = [key_column, col(Group.id)]
    stmt = select(Group, channel_count_column()).where(*filters)
    if cursor:
        kind = str if sort.endswith("title") else datetime
        stmt = stmt.where(keyset(columns, decode_cursor(cursor, sort, [kind, int]), descending))
    rows = (
        await session.execute(stmt.order_by(*order(columns, descending)).limit(limit + 1))
    ).all()
    items = [
        GroupSummary.model_validate({**group.model_dump(), "channel_count": count})
        for group, count in rows[:limit]
    ]
    next_cursor = None
    if len(rows) > limit:
        last = rows[limit - 1][0]
        key = last.title if sort.endswith("title") else last.created_at
        next_cursor = encode_cursor(sort, [key, last.id])
    return CountedPage[GroupSummary](items=items, next_cursor=next_cursor, total=total or 0)


@dashboard.post("/groups", response_model=GroupPublic, status_code=201, tags=["groups"])
async def create_group(
    body: GroupCreate,
    session: SessionDep,
    actor: Editor,
    response: Response,
    policies: PolicyCacheDep,
) -> GroupPublic:
    """Protect a group."""
    group = Group.model_validate(body)
    session.add(group)
    try:
        await session.flush()
    except IntegrityError:
        raise conflict(f"group {body.chat_id} already exists") from None
    audit(session, actor, "group.create", "group", group.chat_id, after=snapshot(group))
    await commit_policy_change(session, policies, group.chat_id)
    etag(response, group.version)
    return await group_public(session, group)


@dashboard.get("/groups/{chat_id}", response_model=GroupPublic, tags=["groups"])
async def read_group(
    _: CurrentStaff, group: GroupDep, session: SessionDep, response: Response
) -> GroupPublic:
    """One group with its settings, required channels and member stats."""
    etag(response, group.version)
    return await group_public(session, group)


@dashboard.patch("/groups/{chat_id}", response_model=GroupPublic, tags=["groups"])
async def update_group(
    chat_id: ChatIdPath,
    body: GroupUpdate,
    session: SessionDep,
    actor: Editor,
    response: Response,
    policies: PolicyCacheDep,
    if_match_header: Annotated[str | None, Header(alias="If-Match")] = None,
) -> GroupPublic:
    """Change a group's title, state or settings."""
    group = await load_group(session, chat_id, lock=True)
    if_match(if_match_header, group.version)
    if apply_changes(session, actor, group, body.model_dump(exclude_unset=True), "group"):
        await commit_policy_change(session, policies, chat_id)
    etag(response, group.version)
    return await group_public(session, group)


@dashboard.delete("/groups/{chat_id}", status_code=204, tags=["groups"])
async def delete_group(
    chat_id: ChatIdPath, session: SessionDep, actor: Editor, policies: PolicyCacheDep
) -> None:
    """Stop protecting a group; its verification history stays."""
    group = await load_group(session, chat_id, lock=True)
    before = snapshot(group)
    await session.execute(delete(GroupChannel).where(col(GroupChannel.group_id) == group.id))
    await session.execute(delete(Member).where(col(Member.chat_id) == chat_id))
    await recount_members(session, chat_id)
    await session.delete(group)
    audit(session, actor, "group.delete", "group", chat_id, before=before)
    await commit_policy_change(session, policies, chat_id)


async def link_channel(
    session: AsyncSession,
    policies: PolicyCache,
    actor: Principal,
    chat_id: int,
    channel_chat_id: int,
) -> tuple[Group, bool]:
    """Require a channel in a group; returns (group, created). Commits."""
    group = await load_group(session, chat_id, lock=True)  # serializes links per group
    channel = await session.scalar(select(Channel).where(col(Channel.chat_id) == channel_chat_id))
    if channel is None:
        raise not_found(f"channel {channel_chat_id}")
    positions = list(
        await session.scalars(
            select(col(GroupChannel.channel_id)).where(col(GroupChannel.group_id) == group.id)
        )
    )
    if channel.id in positions:
        return group, False
    if len(positions) >= MAX_CHANNELS_PER_GROUP:
        raise conflict(f"a group can require at most {MAX_CHANNELS_PER_GROUP} channels")
    position = await session.scalar(
        select(func.coalesce(func.max(col(GroupChannel.position)), -1) + 1).where(
            col(GroupChannel.group_id) == group.id
        )
    )
    assert group.id is not None and channel.id is not None
    session.add(GroupChannel(group_id=group.id, channel_id=channel.id, position=position or 0))
    group.version += 1
    group.updated_at = utcnow()
    audit(
        session,
        actor,
        "group.link_channel",
        "group",
        chat_id,
        after={"channel_id": channel_chat_id, "position": position},
    )
    try:
        await commit_policy_change(session, policies, chat_id)
    except IntegrityError:
        await session.rollback()  # linked concurrently by someone else: same end state
        return await load_group(session, chat_id), False
    return group, True


async def unlink_channel(
    session: AsyncSession,
    policies: PolicyCache,
    actor: Principal,
    chat_id: int,
    channel_chat_id: int,
) -> None:
    group = await load_group(session, chat_id, lock=True)
    channel_id = (
        select(col(Channel.id)).where(col(Channel.chat_id) == channel_chat_id).scalar_subquery()
    )
    result = await session.execute(
        delete(GroupChannel).where(
            col(GroupChannel.group_id) == group.id, col(GroupChannel.channel_id) == channel_id
        )
    )
    if not result.rowcount:  # pyrefly: ignore[missing-attribute]
        raise not_found(f"channel {channel_chat_id} linked to group {chat_id}")
    group.version += 1
    group.updated_at = utcnow()
    audit(
        session,
        actor,
        "group.unlink_channel",
        "group",
        chat_id,
        before={"channel_id": channel_chat_id},
    )
    await commit_policy_change(session, policies, chat_id)


@dashboard.put(
    "/groups/{chat_id}/channels/{channel_id}",
    response_model=GroupPublic,
    responses={201: {"model": GroupPublic, "description": "Linked"}},
    tags=["groups"],
)
async def link_group_channel(
    chat_id: ChatIdPath,
    channel_id: ChannelIdPath,
    session: SessionDep,
    actor: Editor,
    response: Response,
    policies: PolicyCacheDep,
) -> GroupPublic:
    """Require a channel in a group (idempotent: 201 when new, 200 when already linked)."""
    group, created = await link_channel(session, policies, actor, chat_id, channel_id)
    response.status_code = 201 if created else 200
    etag(response, group.version)
    return await group_public(session, group)


@dashboard.delete("/groups/{chat_id}/channels/{channel_id}", status_code=204, tags=["groups"])
async def unlink_group_channel(
    chat_id: ChatIdPath,
    channel_id: ChannelIdPath,
    session: SessionDep,
    actor: Editor,
    policies: PolicyCacheDep,
) -> None:
    """Stop requiring a channel in a group."""
    await unlink_channel(session, policies, actor, chat_id, channel_id)


@dashboard.get("/groups/{chat_id}/members", response_model=Page[MemberPublic], tags=["groups"])
async def list_members(
    _: CurrentStaff,  # first: dependencies run in order, and nobody learns what exists
    group: GroupDep,
    session: SessionDep,
    status: Literal["verified", "restricted"] | None = None,
    limit: Limit = 50,
    cursor: Cursor = None,
) -> Page[MemberPublic]:
    """Member verification states of a group, by user id."""
    stmt = select(Member).where(col(Member.chat_id) == group.chat_id)
    if status is not None:
        stmt = stmt.where(col(Member.status) == status)
    if cursor:
        (after,) = decode_cursor(cursor, "user_id", [int])
        stmt = stmt.where(col(Member.user_id) > after)
    rows = list(await session.scalars(stmt.order_by(col(Member.user_id)).limit(limit + 1)))
    next_cursor = encode_cursor("user_id", [rows[limit - 1].user_id]) if len(rows) > limit else None
    items = [MemberPublic.model_validate(m, from_attributes=True) for m in rows[:limit]]
    return Page[MemberPublic](items=items, next_cursor=next_cursor)


# ---------------------------------------------------------------- channels


async def load_channel(session: AsyncSession, chat_id: int, *, lock: bool = False) -> Channel:
    stmt = select(Channel).where(col(Channel.chat_id) == chat_id)
    channel = await session.scalar(stmt.with_for_update() if lock else stmt)
    if channel is None:
        raise not_found(f"channel {chat_id}")
    return channel


def group_count_column() -> Any:
    return (
        select(func.count())
        .where(col(GroupChannel.channel_id) == col(Channel.id))
        .correlate(Channel)
        .scalar_subquery()
        .label("group_count")
    )


async def channel_public(session: AsyncSession, channel: Channel) -> ChannelPublic:
    groups = (
        await session.execute(
            select(col(Group.chat_id), col(Group.title))
            .join(GroupChannel, col(GroupChannel.group_id) == col(Group.id))
            .where(col(GroupChannel.channel_id) == channel.id)
            .order_by(col(Group.chat_id))
        )
    ).all()
    return ChannelPublic.model_validate(
        {
            **channel.model_dump(),
            "group_count": len(groups),
            "groups": [GroupRef(chat_id=g.chat_id, title=g.title) for g in groups],
        }
    )


@dashboard.get("/channels", response_model=CountedPage[ChannelSummary], tags=["channels"])
async def list_channels(
    session: SessionDep,
    _: CurrentStaff,
    q: Search = None,
    limit: Limit = 50,
    cursor: Cursor = None,
) -> CountedPage[ChannelSummary]:
    """List channels, newest first."""
    filters: list[ColumnElement[bool]] = []
    if q is not None:
        match = [col(Channel.title).icontains(q, autoescape=True)]
        match.append(col(Channel.username).icontains(q.removeprefix("@"), autoescape=True))
        if CHAT_ID_RE.fullmatch(q) and abs(int(q)) <= INT64:
            match.append(col(Channel.chat_id) == int(q))
        filters.append(or_(*match))
    total = await session.scalar(select(func.count()).select_from(Channel).where(*filters))
    columns = [col(Channel.created_at), col(Channel.id)]
    stmt = select(Channel, group_count_column()).where(*filters)
    if cursor:
        stmt = stmt.where(
            keyset(columns, decode_cursor(cursor, "-created_at", [datetime, int]), True)
        )
    rows = (await session.execute(stmt.order_by(*order(columns, True)).limit(limit + 1))).all()
    items = [
        ChannelSummary.model_validate({**channel.model_dump(), "group_count": count})
        for channel, count in rows[:limit]
    ]
    next_cursor = None
    if len(rows) > limit:
        last = rows[limit - 1][0]
        next_cursor = encode_cursor("-created_at", [last.created_at, last.id])
    return CountedPage[ChannelSummary](items=items, next_cursor=next_cursor, total=total or 0)


@dashboard.post("/channels", response_model=ChannelPublic, status_code=201, tags=["channels"])
async def create_channel(
    body: ChannelCreate, session: SessionDep, actor: Editor, response: Response
) -> ChannelPublic:
    """Register a channel that groups can require."""
    channel = Channel.model_validate(body)
    session.add(channel)
    try:
        await session.flush()
    except IntegrityError:
        raise conflict(f"channel {body.chat_id} already exists") from None
    audit(session, actor, "channel.create", "channel", channel.chat_id, after=snapshot(channel))
    await session.commit()
    etag(response, channel.version)
    return await channel_public(session, channel)


@dashboard.get("/channels/{chat_id}", response_model=ChannelPublic, tags=["channels"])
async def read_channel(
    chat_id: ChatIdPath, session: SessionDep, _: CurrentStaff, response: Response
) -> ChannelPublic:
    """One channel and the groups that require it."""
    channel = await load_channel(session, chat_id)
    etag(response, channel.version)
    return await channel_public(session, channel)


def apply_changes(
    session: AsyncSession,
    actor: Principal,
    row: Group | Channel,
    changes: dict[str, Any],
    resource: str,
) -> bool:
    """Set the fields that differ, bump the version, audit; False when nothing differs (then
    no new version and no audit row)."""
    changes = {k: v for k, v in changes.items() if getattr(row, k) != v}
    if not changes:
        return False
    before = snapshot(row)
    for field, value in changes.items():
        setattr(row, field, value)
    row.version += 1
    row.updated_at = utcnow()
    audit(session, actor, f"{resource}.update", resource, row.chat_id, before, snapshot(row))
    return True


async def apply_channel_changes(
    session: AsyncSession, actor: Principal, channel: Channel, changes: dict[str, Any]
) -> list[int]:
    """Change a channel; returns the chat ids of the groups whose policy changed with it."""
    if not apply_changes(session, actor, channel, changes, "channel"):
        return []
    assert channel.id is not None
    return await bump_groups_linked_to(session, channel.id)


@dashboard.patch("/channels/{chat_id}", response_model=ChannelPublic, tags=["channels"])
async def update_channel(
    chat_id: ChatIdPath,
    body: ChannelUpdate,
    session: SessionDep,
    actor: Editor,
    response: Response,
    policies: PolicyCacheDep,
    if_match_header: Annotated[str | None, Header(alias="If-Match")] = None,
) -> ChannelPublic:
    """Change a channel's title, username or invite link."""
    channel = await load_channel(session, chat_id, lock=True)
    if_match(if_match_header, channel.version)
    affected = await apply_channel_changes(
        session, actor, channel, body.model_dump(exclude_unset=True)
    )
    await commit_policy_change(session, policies, *affected)
    etag(response, channel.version)
    return await channel_public(session, channel)


@dashboard.delete("/channels/{chat_id}", status_code=204, tags=["channels"])
async def delete_channel(
    chat_id: ChatIdPath,
    session: SessionDep,
    actor: Editor,
    policies: PolicyCacheDep,
    force: bool = False,
) -> None:
    """Forget a channel; 409 while groups require it, unless force=true unlinks it first."""
    channel = await load_channel(session, chat_id, lock=True)
    assert channel.id is not None
    linked = await session.scalar(
        select(func.count()).where(col(GroupChannel.channel_id) == channel.id)
    )
    if linked and not force:
        raise conflict(
            f"channel {chat_id} is required by {linked} group(s); "
            "unlink it first or pass force=true"
        )
    affected = await bump_groups_linked_to(session, channel.id)
    before = snapshot(channel)
    await session.execute(delete(GroupChannel).where(col(GroupChannel.channel_id) == channel.id))
    await session.delete(channel)
    audit(
        session,
        actor,
        "channel.delete",
        "channel",
        chat_id,
        before={**before, "unlinked_from": sorted(affected)},
    )
    await commit_policy_change(session, policies, *affected)


# ---------------------------------------------------------------- me, staff


@dashboard.get("/me", response_model=Me, tags=["staff"])
async def read_me(staff: CurrentStaff) -> Me:
    """Who the token belongs to, and their role."""
    assert staff.role is not None
    return Me(user_id=uuid.UUID(staff.id), email=staff.name, role=staff.role, aal=staff.aal)


def env_owner_ids(request: Request) -> set[str]:
    return request.app.state.auth.owner_ids


@dashboard.get("/staff", response_model=CountedPage[StaffPublic], tags=["staff"])
async def list_staff(request: Request, session: SessionDep, _: Owner) -> CountedPage[StaffPublic]:
    """Everyone who can use the dashboard, with their role."""
    env_owners = env_owner_ids(request)
    rows = list(await session.scalars(select(Staff).order_by(col(Staff.created_at), col(Staff.id))))
    items = [
        StaffPublic(
            user_id=uuid.UUID(u), email=None, role="owner", created_at=None, source="environment"
        )
        for u in sorted(env_owners - {str(s.user_id) for s in rows})
    ]
    for s in rows:
        from_env = str(s.user_id) in env_owners
        items.append(
            StaffPublic(
                user_id=s.user_id,
                email=s.email,
                role="owner" if from_env else s.role,
                created_at=s.created_at,
                source="environment" if from_env else "database",
            )
        )
    return CountedPage[StaffPublic](items=items, next_cursor=None, total=len(items))


async def other_owner_exists(
    session: AsyncSession, env_owners: set[str], user_id: uuid.UUID
) -> bool:
    # Lock the owner rows so two owners demoting each other cannot both succeed.
    owners = await session.scalars(
        select(col(Staff.user_id)).where(col(Staff.role) == "owner").with_for_update()
    )
    return bool((env_owners | {str(u) for u in owners}) - {str(user_id)})


@dashboard.put(
    "/staff/{user_id}",
    response_model=StaffPublic,
    responses={201: {"model": StaffPublic, "description": "Added"}},
    tags=["staff"],
)
async def put_staff(
    user_id: uuid.UUID,
    body: StaffPut,
    request: Request,
    session: SessionDep,
    actor: Owner,
    response: Response,
) -> StaffPublic:
    """Add a staff member or change their role (201 when added, 200 when changed)."""
    env_owners = env_owner_ids(request)
    if str(user_id) in env_owners and body.role != "owner":
        raise conflict("this user is an owner through OWNER_USER_IDS; change it there")
    staff = await session.scalar(
        select(Staff).where(col(Staff.user_id) == user_id).with_for_update()
    )
    demoting = staff is not None and staff.role == "owner" and body.role != "owner"
    if demoting and not await other_owner_exists(session, env_owners, user_id):
        raise conflict("this would leave no owner")
    before = snapshot(staff) if staff else None
    if staff is None:
        staff = Staff(user_id=user_id, email=body.email, role=body.role)
        session.add(staff)
        response.status_code = 201
    else:
        if "email" in body.model_fields_set:
            staff.email = body.email
        staff.role = body.role
        staff.updated_at = utcnow()
    try:
        await session.flush()
    except IntegrityError:
        raise conflict("this user was added concurrently; retry") from None
    audit(session, actor, "staff.put", "staff", user_id, before, snapshot(staff))
    await session.commit()
    return StaffPublic(
        user_id=staff.user_id,
        email=staff.email,
        role=staff.role,
        created_at=staff.created_at,
        source="environment" if str(user_id) in env_owners else "database",
    )


@dashboard.delete("/staff/{user_id}", status_code=204, tags=["staff"])
async def delete_staff(
    user_id: uuid.UUID, request: Request, session: SessionDep, actor: Owner
) -> None:
    """Remove a staff member."""
    env_owners = env_owner_ids(request)
    if str(user_id) in env_owners:
        raise conflict("this user is an owner through OWNER_USER_IDS; remove them there")
    staff = await session.scalar(
        select(Staff).where(col(Staff.user_id) == user_id).with_for_update()
    )
    if staff is None:
        raise not_found(f"staff member {user_id}")
    if staff.role == "owner" and not await other_owner_exists(session, env_owners, user_id):
        raise conflict("this is the last owner")
    audit(session, actor, "staff.delete", "staff", user_id, before=snapshot(staff))
    await session.delete(staff)
    await session.commit()


# ---------------------------------------------------------------- bot keys


@dashboard.get("/bot-keys", response_model=CountedPage[BotKeyPublic], tags=["bot keys"])
async def list_bot_keys(
    session: SessionDep, _: Owner, limit: Limit = 50, cursor: Cursor = None
) -> CountedPage[BotKeyPublic]:
    """Bot API keys, newest first (never the key itself)."""
    total = await session.scalar(select(func.count()).select_from(BotKey))
    stmt = select(BotKey)
    if cursor:
        (after,) = decode_cursor(cursor, "-id", [int])
        stmt = stmt.where(col(BotKey.id) < after)
    rows = list(await session.scalars(stmt.order_by(col(BotKey.id).desc()).limit(limit + 1)))
    next_cursor = encode_cursor("-id", [rows[limit - 1].id]) if len(rows) > limit else None
    items = [BotKeyPublic.model_validate(k, from_attributes=True) for k in rows[:limit]]
    return CountedPage[BotKeyPublic](items=items, next_cursor=next_cursor, total=total or 0)


async def create_key(session: AsyncSession, actor: Principal, name: str) -> BotKeyCreated:
    key = new_bot_key()
    row = BotKey(name=name, prefix=key[:12], key_hash=hash_key(key))
    session.add(row)
    await session.flush()
    audit(session, actor, "bot_key.create", "bot_key", row.id, after=snapshot(row, {"key_hash"}))
    await session.commit()
    assert row.id is not None
    return BotKeyCreated(
        id=row.id, name=row.name, prefix=row.prefix, key=key, created_at=row.created_at
    )


@dashboard.post("/bot-keys", response_model=BotKeyCreated, status_code=201, tags=["bot keys"])
async def create_bot_key(body: BotKeyCreate, session: SessionDep, actor: Owner) -> BotKeyCreated:
    """Create a bot API key; the response is the only time the key is shown."""
    return await create_key(session, actor, body.name)


@dashboard.delete("/bot-keys/{key_id}", status_code=204, tags=["bot keys"])
async def revoke_bot_key(
    key_id: Annotated[int, Path(ge=1, le=2**31 - 1)],
    request: Request,
    session: SessionDep,
    actor: Owner,
) -> None:
    """Revoke a bot key: it stops working within seconds on every replica."""
    row = await session.scalar(select(BotKey).where(col(BotKey.id) == key_id).with_for_update())
    if row is None:
        raise not_found(f"bot key {key_id}")
    if row.revoked_at is None:
        before = snapshot(row, {"key_hash"})
        row.revoked_at = utcnow()
        audit(
            session, actor, "bot_key.revoke", "bot_key", key_id, before, snapshot(row, {"key_hash"})
        )
        await session.commit()
    request.app.state.auth.bot_keys.invalidate(row.key_hash)


# ---------------------------------------------------------------- audit


@dashboard.get("/audit", response_model=Page[AuditPublic], tags=["audit"])
async def list_audit(
    session: SessionDep,
    _: Owner,
    actor: Annotated[str | None, Query(max_length=64)] = None,
    action: Annotated[str | None, Query(max_length=64)] = None,
    resource: Annotated[str | None, Query(max_length=32)] = None,
    since: Since = None,
    until: Until = None,
    limit: Limit = 50,
    cursor: Cursor = None,
) -> Page[AuditPublic]:
    """The audit log, newest first."""
    stmt = select(AuditLog)
    if actor is not None:
        stmt = stmt.where(col(AuditLog.actor_id) == actor)
    if action is not None:
        stmt = stmt.where(col(AuditLog.action) == action)
    if resource is not None:
        stmt = stmt.where(col(AuditLog.resource) == resource)
    if (since := aware(since, "since")) is not None:
        stmt = stmt.where(col(AuditLog.at) >= since)
    if (until := aware(until, "until")) is not None:
        stmt = stmt.where(col(AuditLog.at) < until)
    columns = [col(AuditLog.at), col(AuditLog.id)]
    if cursor:
        stmt = stmt.where(keyset(columns, decode_cursor(cursor, "-at", [datetime, int]), True))
    rows = list(await session.scalars(stmt.order_by(*order(columns, True)).limit(limit + 1)))
    next_cursor = (
        encode_cursor("-at", [rows[limit - 1].at, rows[limit - 1].id])
        if len(rows) > limit
        else None
    )
    return Page[AuditPublic](
        items=[AuditPublic.from_row(a) for a in rows[:limit]], next_cursor=next_cursor
    )


# ---------------------------------------------------------------- verification log


ResultFilter = Annotated[Literal["passed", "blocked", "error"] | None, Query()]
TriggerFilter = Annotated[
    Literal["message", "join", "button", "channel_leave", "recheck"] | None, Query()
]
# Filters follow the Telegram id rules too (422 for a service account or a positive group id).
GroupQuery = Annotated[GroupChatId | None, Query()]


def verification_filters(
    group: GroupQuery = None,
    user: Annotated[UserId | None, Query()] = None,
    result: ResultFilter = None,
    trigger: TriggerFilter = None,
    since: Since = None,
    until: Until = None,
) -> list[ColumnElement[bool]]:
    filters: list[ColumnElement[bool]] = []
    if group is not None:
        filters.append(col(Verification.chat_id) == group)
    if user is not None:
        filters.append(col(Verification.user_id) == user)
    if result is not None:
        filters.append(col(Verification.result) == result)
    if trigger is not None:
        filters.append(col(Verification.trigger) == trigger)
    if (since := aware(since, "since")) is not None:
        filters.append(col(Verification.occurred_at) >= since)
    if (until := aware(until, "until")) is not None:
        filters.append(col(Verification.occurred_at) < until)
    return filters


VerificationFilters = Annotated[list[ColumnElement[bool]], Depends(verification_filters)]
LOG_ORDER = (col(Verification.occurred_at), col(Verification.id))


@dashboard.get("/verifications", response_model=Page[VerificationPublic], tags=["verifications"])
async def list_verifications(
    session: SessionDep,
    _: CurrentStaff,
    filters: VerificationFilters,
    limit: Limit = 50,
    cursor: Cursor = None,
) -> Page[VerificationPublic]:
    """The verification log, newest first."""
    stmt = select(Verification).where(*filters)
    if cursor:
        after = decode_cursor(cursor, "-occurred_at", [datetime, int])
        stmt = stmt.where(keyset(LOG_ORDER, after, True))
    rows = list(await session.scalars(stmt.order_by(*order(LOG_ORDER, True)).limit(limit + 1)))
    next_cursor = None
    if len(rows) > limit:
        last = rows[limit - 1]
        next_cursor = encode_cursor("-occurred_at", [last.occurred_at, last.id])
    items = [VerificationPublic.model_validate(v, from_attributes=True) for v in rows[:limit]]
    return Page[VerificationPublic](items=items, next_cursor=next_cursor)


CSV_COLUMNS = (
    "id", "event_id", "chat_id", "user_id", "result", "trigger", "missing_channel_ids",
    "cached", "latency_ms", "error", "occurred_at", "received_at",
)  # fmt: skip
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def csv_cell(value: object) -> object:
    """Text that a spreadsheet would run as a formula gets a leading apostrophe. Numbers are
    written as numbers (a negative chat id is data, not a formula)."""
    if isinstance(value, str) and value.startswith(FORMULA_STARTS):
        return "'" + value
    return value


def csv_row(v: Any) -> list[object]:
    return [
        v.id,
        str(v.event_id),
        v.chat_id,
        v.user_id,
        v.result,
        v.trigger,
        csv_cell(" ".join(map(str, v.missing_channel_ids))),
        "true" if v.cached else "false",
        v.latency_ms,
        csv_cell(v.error) if v.error is not None else "",
        v.occurred_at.isoformat().replace("+00:00", "Z"),
        v.received_at.isoformat().replace("+00:00", "Z"),
    ]


@dashboard.get(
    "/verifications/export",
    response_class=StreamingResponse,
    responses={200: {"content": {"text/csv": {}}, "description": "RFC 4180 CSV"}},
    tags=["verifications"],
)
async def export_verifications(
    request: Request, session: SessionDep, _: CurrentStaff, filters: VerificationFilters
) -> StreamingResponse:
    """The verification log as CSV (same filters, newest first, streamed)."""
    await session.close()  # the stream reads through its own session, however long it takes
    db: Database = request.app.state.db

    async def lines() -> AsyncIterator[str]:
        buffer = io.StringIO()
        writer = csv.writer(buffer)  # RFC 4180: CRLF, quotes doubled, quoted when needed
        writer.writerow(CSV_COLUMNS)
        async with db.sessionmaker() as stream_session:
            stmt = (
                select(Verification)
                .where(*filters)
                .order_by(*order(LOG_ORDER, True))
                .execution_options(yield_per=2000)
            )
            result = await stream_session.stream_scalars(stmt)
            async for chunk in result.partitions():
                for row in chunk:
                    writer.writerow(csv_row(row))
                yield buffer.getvalue()
                buffer.seek(0)
                buffer.truncate()
        yield buffer.getvalue()

    stamp = utcnow().strftime("%Y%m%dT%H%M%SZ")
    return StreamingResponse(
        lines(),
        media_type="text/csv; charset=utf-8",
        headers={
            "Content-Disposition": f'attachment; filename="channelgate-verifications-{stamp}.csv"'
        },
    )


# ---------------------------------------------------------------- analytics


def analytics_window(since: datetime | None, until: datetime | None, grain: str = "h") -> Window:
    floor = floor_hour if grain == "h" else floor_day
    step = timedelta(hours=1) if grain == "h" else timedelta(days=1)
    until, since = aware(until, "until"), aware(since, "since")
    end = floor(until) if until is not None else floor(utcnow()) + step
    start = floor(since) if since is not None else end - timedelta(days=7)
    if start >= end:
        raise invalid_query("since", "must be before until (after truncation to the bucket)")
    return Window(start, end)


@dashboard.get("/analytics/summary", response_model=AnalyticsSummary, tags=["analytics"])
async def analytics_summary(
    session: SessionDep,
    _: CurrentStaff,
    since: Since = None,
    until: Until = None,
    group: GroupQuery = None,
) -> AnalyticsSummary:
    """Totals over a window (default: the last 7 days)."""
    window = analytics_window(since, until)
    sums = await analytics.counters(session, window, group)
    counted = select(
        func.coalesce(func.sum(member_counts.c.verified), 0),
        func.coalesce(func.sum(member_counts.c.restricted), 0),
    )
    if group is not None:
        counted = counted.where(member_counts.c.chat_id == group)
    verified, restricted = (await session.execute(counted)).one()
    histogram = [sums[name] for name in LATENCY_COLUMNS]
    return AnalyticsSummary(
        since=window.since,
        until=window.until,
        checks=sums["checks"],
        passed=sums["passed"],
        blocked=sums["blocked"],
        errors=sums["errors"],
        pass_rate=analytics.rate(sums["passed"], sums["checks"]),
        unique_users=await analytics.unique_users(session, window, group),
        unique_users_estimated=True,
        cache_hit_rate=analytics.rate(sums["cached"], sums["checks"]),
        latency_ms=Latency(
            p50=analytics.percentile(histogram, 0.5), p95=analytics.percentile(histogram, 0.95)
        ),
        active_groups=sums["active_groups"],
        verified_members=int(verified),
        restricted_members=int(restricted),
    )


MAX_POINTS = 2000


@dashboard.get("/analytics/timeseries", response_model=Timeseries, tags=["analytics"])
async def analytics_timeseries(
    session: SessionDep,
    _: CurrentStaff,
    bucket: Literal["hour", "day"] = "hour",
    since: Since = None,
    until: Until = None,
    group: GroupQuery = None,
) -> Timeseries:
    """Checks per hour or per day, every bucket present (zeros filled)."""
    grain = "h" if bucket == "hour" else "d"
    window = analytics_window(since, until, grain)
    step = timedelta(hours=1) if grain == "h" else timedelta(days=1)
    if (window.until - window.since) / step > MAX_POINTS:
        raise invalid_query("since", f"the window holds more than {MAX_POINTS} {bucket}s")
    points = await analytics.timeseries(session, grain, window.since, window.until, group)
    return Timeseries.model_validate(
        {"bucket": bucket, "since": window.since, "until": window.until, "points": points}
    )


@dashboard.get("/analytics/top-groups", response_model=TopGroups, tags=["analytics"])
async def analytics_top_groups(
    session: SessionDep,
    _: CurrentStaff,
    since: Since = None,
    until: Until = None,
    limit: Annotated[int, Query(ge=1, le=50)] = 10,
) -> TopGroups:
    """The groups with the most checks in a window."""
    window = analytics_window(since, until)
    rows = await analytics.top_groups(session, window, limit)
    titles = await titles_of(session, Group, [r.chat_id for r in rows])
    items = [
        TopGroup(
            chat_id=r.chat_id,
            title=titles.get(r.chat_id),
            checks=int(r.checks),
            blocked=int(r.blocked),
            pass_rate=analytics.rate(int(r.passed), int(r.checks)),
        )
        for r in rows
    ]
    return TopGroups(since=window.since, until=window.until, items=items)


@dashboard.get("/analytics/channels", response_model=ChannelBlocksList, tags=["analytics"])
async def analytics_channels(
    session: SessionDep,
    _: CurrentStaff,
    since: Since = None,
    until: Until = None,
    group: GroupQuery = None,
) -> ChannelBlocksList:
    """Which required channels users were missing when blocked, most first."""
    window = analytics_window(since, until)
    rows = await analytics.channel_blocks(session, window, group)
    titles = await titles_of(session, Channel, [r.channel_id for r in rows])
    items = [
        ChannelBlocks(chat_id=r.channel_id, title=titles.get(r.channel_id), blocks=int(r.blocks))
        for r in rows
    ]
    return ChannelBlocksList(since=window.since, until=window.until, items=items)


async def titles_of(session: AsyncSession, model: Any, chat_ids: list[int]) -> dict[int, str]:
    """Current titles; a group or channel deleted since has none (its numbers stay)."""
    if not chat_ids:
        return {}
    rows = await session.execute(
        select(model.chat_id, model.title).where(model.chat_id.in_(chat_ids))
    )
    return dict(rows.all())  # pyrefly: ignore[no-matching-overload]


# ---------------------------------------------------------------- live feed

KEEPALIVE_SECONDS = 15.0


@dashboard.get(
    "/events",
    response_class=StreamingResponse,
    responses={200: {"content": {"text/event-stream": {}}, "description": "Server-sent events"}},
    tags=["events"],
)
async def stream_events(
    request: Request, session: SessionDep, _: CurrentStaff
) -> StreamingResponse:
    """Live feed of verifications and audit entries (server-sent events)."""
    await session.close()  # hand the connection back: a stream can stay open for hours
    feed: Feed = request.app.state.feed
    subscriber = feed.subscribe()
    if subscriber is None:
        raise HTTPException(503, "too many live-feed subscribers", headers={"Retry-After": "30"})

    async def events() -> AsyncIterator[str]:
        try:
            yield "retry: 3000\n\n"
            while True:
                try:
                    kind, data = await asyncio.wait_for(subscriber.queue.get(), KEEPALIVE_SECONDS)
                except TimeoutError:
                    yield ": keep-alive\n\n"
                    continue
                if subscriber.dropped:
                    yield f'event: dropped\ndata: {{"count": {subscriber.dropped}}}\n\n'
                    subscriber.dropped = 0
                yield f"event: {kind}\ndata: {data}\n\n"
        finally:
            feed.unsubscribe(subscriber)

    return StreamingResponse(
        events(),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


# ---------------------------------------------------------------- bot


bot = APIRouter(prefix="/api/v1/bot", tags=["bot"])
NOT_MODIFIED = {304: {"description": "Not modified (If-None-Match)"}}


async def build_policy(db: Database, chat_id: int) -> tuple[bytes, str] | None:
    async with db.sessionmaker() as session:
        group = await session.scalar(select(Group).where(col(Group.chat_id) == chat_id))
        if group is None:
            return None
        assert group.id is not None
        policy = Policy.model_validate(
            {
                **group.model_dump(include=set(SETTING_FIELDS)),
                "chat_id": group.chat_id,
                "active": group.is_active,
                "version": group.version,
                "channels": await linked_channels(session, group.id),
            }
        )
    # The row id makes a deleted-and-recreated group's ETag differ from the old one.
    return policy.model_dump_json().encode(), f'"{group.id}.{group.version}"'


async def cached_policy(request: Request, chat_id: int) -> tuple[bytes, str] | None:
    return await policy_of(request.app.state, chat_id)


async def policy_of(state: Any, chat_id: int) -> tuple[bytes, str] | None:
    policies: PolicyCache = state.policies
    try:
        return policies.entries[chat_id]
    except KeyError:
        generation = policies.generation
        entry = await build_policy(state.db, chat_id)
        policies.put(chat_id, entry, generation)
        return entry


def etag_matches(if_none_match: str, tag: str) -> bool:
    tags = {t.strip().removeprefix("W/") for t in if_none_match.split(",")}
    return tag in tags or "*" in tags


def policy_response(entry: tuple[bytes, str] | None, chat_id: int, status: int = 200) -> Response:
    if entry is None:
        raise not_found(f"group {chat_id}")
    body, tag = entry
    return Response(body, status, headers={"ETag": tag}, media_type="application/json")


@bot.get(
    "/groups/{chat_id}/policy",
    response_model=Policy,
    responses={**NOT_MODIFIED, 404: {"description": "Unknown group"}},
    openapi_extra={
        "parameters": [
            {"name": "chat_id", "in": "path", "required": True, "schema": {"type": "integer"}},
            {"name": "If-None-Match", "in": "header", "required": False,
             "schema": {"type": "string"}},
        ]
    },
)  # fmt: skip
async def read_policy(request: Request, _: BotCaller) -> Response:
    """The policy for one group: the hot path, called for every message."""
    chat_id = int64(request.path_params["chat_id"], "chat_id")
    entry = await cached_policy(request, chat_id)
    if_none_match = request.headers.get("if-none-match")
    if entry is not None and if_none_match is not None and etag_matches(if_none_match, entry[1]):
        return Response(status_code=304, headers={"ETag": entry[1]})
    return policy_response(entry, chat_id)


class PolicyEndpoint:
    """`read_policy` as a bare ASGI app: app.py mounts it ahead of the documented FastAPI
    route. Same checks, same answers, same errors (raised to the same handlers), without
    Request objects or dependency solving on the one route called for every message
    (measured in bench/README.md)."""

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        authorization = if_none_match = b""
        for name, value in scope["headers"]:
            if name == b"authorization":
                authorization = value
            elif name == b"if-none-match":
                if_none_match = value
        app = scope["app"]
        await authenticate_bot(
            app, authorization.decode("latin-1"), scope["state"].get("request_id")
        )
        chat_id = int64(scope["path_params"]["chat_id"], "chat_id")
        entry = await policy_of(app.state, chat_id)
        if entry is None:
            raise not_found(f"group {chat_id}")
        body, tag = entry
        if if_none_match and etag_matches(if_none_match.decode("latin-1"), tag):
            headers = [(b"etag", tag.encode())]
            await send({"type": "http.response.start", "status": 304, "headers": headers})
            await send({"type": "http.response.body", "body": b""})
            return
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            (b"etag", tag.encode()),
        ]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": body})


def int64(raw: str, name: str) -> int:
    """A path parameter read by hand: 422 unless a 64-bit integer."""
    try:
        value = int(raw)
        if -INT64 <= value <= INT64:
            return value
    except ValueError:
        pass
    raise RequestValidationError(
        [{"loc": ("path", name), "msg": "must be a 64-bit integer", "type": "int_parsing"}]
    )


@bot.put(
    "/groups/{chat_id}",
    response_model=Policy,
    responses={201: {"model": Policy, "description": "Registered"}},
)
async def register_group(
    chat_id: NewGroupIdPath,
    body: BotGroupPut,
    request: Request,
    session: SessionDep,
    actor: BotCaller,
    policies: PolicyCacheDep,
) -> Response:
    """The bot was added to (or saw) a group: create it with defaults, or refresh its title."""
    group = await session.scalar(
        select(Group).where(col(Group.chat_id) == chat_id).with_for_update()
    )
    created = group is None
    if group is None:
        group = Group.model_validate({"chat_id": chat_id, **body.model_dump(exclude_unset=True)})
        session.add(group)
        try:
            await session.flush()
        except IntegrityError:  # registered concurrently by another replica
            await session.rollback()
            return policy_response(await cached_policy(request, chat_id), chat_id)
        audit(session, actor, "group.register", "group", chat_id, after=snapshot(group))
    else:
        changes = body.model_dump(exclude_unset=True)
        # Counters change all the time: stored, but not a new version of the group.
        for field in ("member_count", "added_by_user_id"):
            if field in changes:
                setattr(group, field, changes.pop(field))
        apply_changes(session, actor, group, changes, "group")
    await commit_policy_change(session, policies, chat_id)
    return policy_response(await cached_policy(request, chat_id), chat_id, 201 if created else 200)


@bot.put(
    "/channels/{chat_id}",
    response_model=ChannelPublic,
    responses={201: {"model": ChannelPublic, "description": "Registered"}},
)
async def register_channel(
    chat_id: NewChannelIdPath,
    body: BotChannelPut,
    session: SessionDep,
    actor: BotCaller,
    response: Response,
    policies: PolicyCacheDep,
) -> ChannelPublic:
    """Create or refresh a channel's metadata."""
    channel = await session.scalar(
        select(Channel).where(col(Channel.chat_id) == chat_id).with_for_update()
    )
    affected: list[int] = []
    if channel is None:
        channel = Channel.model_validate(
            {"chat_id": chat_id, **body.model_dump(exclude_unset=True)}
        )
        session.add(channel)
        try:
            await session.flush()
        except IntegrityError:
            raise conflict(f"channel {chat_id} was registered concurrently; retry") from None
        audit(session, actor, "channel.register", "channel", chat_id, after=snapshot(channel))
        response.status_code = 201
    else:
        changes = body.model_dump(exclude_unset=True)
        if "subscriber_count" in changes:
            channel.subscriber_count = changes.pop("subscriber_count")
        affected = await apply_channel_changes(session, actor, channel, changes)
    await commit_policy_change(session, policies, *affected)
    etag(response, channel.version)
    return await channel_public(session, channel)


@bot.put(
    "/groups/{chat_id}/channels/{channel_id}",
    response_model=Policy,
    responses={201: {"model": Policy, "description": "Linked"}},
)
async def bot_link_channel(
    chat_id: ChatIdPath,
    channel_id: ChannelIdPath,
    request: Request,
    session: SessionDep,
    actor: BotCaller,
    policies: PolicyCacheDep,
) -> Response:
    """Require a channel in a group (the in-chat "protect @channel" command)."""
    _, created = await link_channel(session, policies, actor, chat_id, channel_id)
    return policy_response(await cached_policy(request, chat_id), chat_id, 201 if created else 200)


@bot.delete("/groups/{chat_id}/channels/{channel_id}", status_code=204)
async def bot_unlink_channel(
    chat_id: ChatIdPath,
    channel_id: ChannelIdPath,
    session: SessionDep,
    actor: BotCaller,
    policies: PolicyCacheDep,
) -> None:
    """Stop requiring a channel in a group."""
    await unlink_channel(session, policies, actor, chat_id, channel_id)


@bot.post("/groups/{chat_id}/migrate", response_model=Policy)
async def migrate_group(
    chat_id: ChatIdPath,
    body: GroupMigrate,
    request: Request,
    session: SessionDep,
    actor: BotCaller,
    policies: PolicyCacheDep,
) -> Response:
    """A basic group became a supergroup: move settings, links, members and history."""
    new_id = body.new_chat_id
    if new_id == chat_id:
        raise RequestValidationError(
            [
                {
                    "loc": ("body", "new_chat_id"),
                    "msg": "is the current chat id",
                    "type": "value_error",
                }
            ]
        )
    group = await load_group(session, chat_id, lock=True)
    if await session.scalar(select(col(Group.id)).where(col(Group.chat_id) == new_id)):
        raise conflict(f"group {new_id} already exists")
    await move_members(session, chat_id, new_id)
    for recounted in (chat_id, new_id):
        await recount_members(session, recounted)
    await session.execute(
        update(Verification).where(col(Verification.chat_id) == chat_id).values(chat_id=new_id)
    )
    before = snapshot(group)
    group.chat_id = new_id
    group.version += 1
    group.updated_at = utcnow()
    audit(session, actor, "group.migrate", "group", chat_id, before, snapshot(group))
    try:
        await commit_policy_change(session, policies, chat_id, new_id)
    except IntegrityError:
        raise conflict(f"group {new_id} already exists") from None
    return policy_response(await cached_policy(request, new_id), new_id)


async def move_members(session: AsyncSession, old: int, new: int) -> None:
    """Re-key member states; where the new chat already has a state (the bot reported events
    for the supergroup before migrating), the two are merged."""
    new_states = {
        m.user_id: m
        for m in await session.scalars(select(Member).where(col(Member.chat_id) == new))
    }
    if new_states:
        clashing = await session.scalars(
            select(Member).where(
                col(Member.chat_id) == old, col(Member.user_id).in_(list(new_states))
            )
        )
        for old_state in clashing:
            target = new_states[old_state.user_id]
            target.checks += old_state.checks
            for field in ("verified_at", "restricted_at"):
                mine, theirs = getattr(target, field), getattr(old_state, field)
                if theirs is not None and (mine is None or theirs > mine):
                    setattr(target, field, theirs)
            target.status = local_status(
                MemberDelta(target.verified_at, target.restricted_at, target.checks)
            )
            await session.delete(old_state)
        await session.flush()
    await session.execute(update(Member).where(col(Member.chat_id) == old).values(chat_id=new))


@bot.get("/channels/{chat_id}/groups", response_model=ChatRefList)
async def list_channel_groups(
    chat_id: ChatIdPath, session: SessionDep, _: BotCaller
) -> ChatRefList:
    """Active groups that require this channel (to re-check a user who left it)."""
    channel = await load_channel(session, chat_id)
    rows = await session.scalars(
        select(col(Group.chat_id))
        .join(GroupChannel, col(GroupChannel.group_id) == col(Group.id))
        .where(col(GroupChannel.channel_id) == channel.id, col(Group.is_active))
        .order_by(col(Group.chat_id))
    )
    return ChatRefList(items=[ChatRef(chat_id=c) for c in rows])


@dataclass(slots=True)
class Counter:
    total: int = 0


@bot.post(
    "/verifications",
    response_model=IngestResult,
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {"schema": {"$ref": "#/components/schemas/VerificationBatch"}}
            },
        }
    },
)
async def ingest_verifications(request: Request, session: SessionDep, _: BotCaller) -> IngestResult:
    """Store a batch of verification results (idempotent by event_id)."""
    # Parsed and validated straight from bytes in Rust: FastAPI's json.loads followed by
    # validation of the Python objects was a sixth of a 500-event batch (py-spy).
    try:
        body = VerificationBatch.model_validate_json(await request.body())
    except ValidationError as exc:
        raise RequestValidationError(
            [{**e, "loc": ("body", *e["loc"])} for e in exc.errors(include_url=False)]
        ) from None
    if errors := body.rule_errors():
        raise RequestValidationError(errors)
    inserted = await ingest(session, body.events)
    await session.commit()
    request.app.state.ingested.total += len(inserted)
    return IngestResult(accepted=len(inserted), duplicates=len(body.events) - len(inserted))


@bot.get("/groups/{chat_id}/members/{user_id}", response_model=MemberState)
async def read_member_state(
    chat_id: ChatIdPath,
    user_id: Annotated[UserId, Path()],
    session: SessionDep,
    _: BotCaller,
) -> MemberState:
    """A user's last known state in a group, and until when a pass stays fresh."""
    row = (
        await session.execute(
            select(Member, col(Group.recheck_seconds))
            .outerjoin(Group, col(Group.chat_id) == col(Member.chat_id))
            .where(col(Member.chat_id) == chat_id, col(Member.user_id) == user_id)
        )
    ).first()
    if row is None:
        return MemberState(status="unknown", verified_at=None, restricted_at=None, fresh_until=None)
    member, recheck = row
    fresh_until = None
    if member.status == "verified" and member.verified_at is not None:
        fresh_until = member.verified_at + timedelta(seconds=recheck or DEFAULT_RECHECK_SECONDS)
    return MemberState(
        status=member.status,
        verified_at=member.verified_at,
        restricted_at=member.restricted_at,
        fresh_until=fresh_until,
    )


@bot.post("/heartbeat", status_code=204)
async def heartbeat(body: Heartbeat, session: SessionDep, bot_key: BotCaller) -> None:
    """A bot instance is alive (expected every 30 s)."""
    values = {
        "instance_id": body.instance_id,
        "key_name": bot_key.name or bot_key.id,
        "version": body.version,
        "started_at": body.started_at,
        "last_seen_at": utcnow(),
        "stats": body.stats,
    }
    statement = upsert(session, BotInstance.__table__)  # pyrefly: ignore[missing-attribute]
    statement = statement.on_conflict_do_update(
        index_elements=["instance_id"],
        set_={k: statement.excluded[k] for k in values if k != "instance_id"},
    )
    await session.execute(statement, values)
    await session.commit()


@dashboard.get("/bots", response_model=CountedPage[BotInstancePublic], tags=["bots"])
async def list_bots(
    session: SessionDep, _: CurrentStaff, limit: Limit = 50, cursor: Cursor = None
) -> CountedPage[BotInstancePublic]:
    """Bot instances that sent heartbeats, by instance id."""
    total = await session.scalar(select(func.count()).select_from(BotInstance))
    stmt = select(BotInstance)
    if cursor:
        (after,) = decode_cursor(cursor, "instance_id", [str])
        stmt = stmt.where(col(BotInstance.instance_id) > after)
    rows = list(await session.scalars(stmt.order_by(col(BotInstance.instance_id)).limit(limit + 1)))
    online_since = utcnow() - timedelta(seconds=2 * HEARTBEAT_SECONDS)
    items = [
        BotInstancePublic.model_validate(
            {**b.model_dump(), "online": b.last_seen_at >= online_since}
        )
        for b in rows[:limit]
    ]
    next_cursor = (
        encode_cursor("instance_id", [rows[limit - 1].instance_id]) if len(rows) > limit else None
    )
    return CountedPage[BotInstancePublic](items=items, next_cursor=next_cursor, total=total or 0)


# ---------------------------------------------------------------- service


@service.get("/healthz", tags=["service"])
async def healthz() -> dict[str, str]:
    """The process is up."""
    return {"status": "ok"}


@service.get("/readyz", tags=["service"], responses={503: {"description": "Database down"}})
async def readyz(session: SessionDep) -> dict[str, str]:
    """The database answers."""
    await session.execute(text("SELECT 1"))
    return {"status": "ok"}
