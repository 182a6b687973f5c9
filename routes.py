"""Every endpoint, in API.md's order, on four routers declared together below. Each router
authenticates by default, so a new route is protected without anyone remembering to ask.

Routes commit; the helpers here and elsewhere only flush.
"""

import asyncio
import csv
import io
import logging
import re
import uuid
from collections.abc import AsyncIterator, Callable, Coroutine, Iterable, Sequence
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Header, HTTPException, Path, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import StreamingResponse
from fastapi.routing import APIRoute
from fastapi.sse import EventSourceResponse, ServerSentEvent
from pydantic import ValidationError
from sqlalchemy import (
    ColumnElement,
    String,
    delete,
    exists,
    func,
    literal,
    or_,
    union_all,
    update,
)
from sqlalchemy import select as core_select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession
from sqlmodel import col, select
from starlette.types import ASGIApp, Message, Receive, Scope, Send

import analytics
import policy
from analytics import Window
from auth import (
    BotCaller,
    CurrentStaff,
    Editor,
    FeedStaff,
    Owner,
    Principal,
    auth_state,
    bot_caller,
    current_staff,
    feed_staff,
    issue_bot_key,
    may_read_audit,
    snapshot,
    still_staff_as,
)
from db import (
    BOT_KEY,
    INT64_MAX,
    INT64_MIN,
    Keyset,
    PageQuery,
    ReadSessionDep,
    SessionDep,
    announce,
    count,
    database,
    paginate,
    schema_head,
    schema_revision,
    upsert,
)
from feed import Subscriber, feed_of
from ingest import ingest, move_chat, recount_members
from metrics import metrics_of
from models import (
    GROUP_ID_SCHEMA,
    LATENCY_COLUMNS,
    MAX_CHANNELS_PER_GROUP,
    NO_NUL,
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
    Readiness,
    Staff,
    StaffPublic,
    StaffPut,
    Time,
    Timeseries,
    TopGroup,
    TopGroups,
    UserId,
    UTCDateTime,
    Verification,
    VerificationBatch,
    VerificationPublic,
    invalid,
    utcnow,
)
from ratelimit import limiter_of

log = logging.getLogger("channelgate.routes")

# ---------------------------------------------------------------- streams that must be read

STALL_SECONDS = 30.0  # a stream whose client reads nothing for this long is ended


class Stalled(Exception):
    """A send of a streamed answer waited STALL_SECONDS: its client reads nothing."""


async def unless_stalled(app: ASGIApp, scope: Scope, receive: Receive, send: Send) -> None:
    """Run `app` with every send bounded, the response start and the closing one too (any
    may wait on a full socket); a send that waits STALL_SECONDS ends it. Unfinished on
    purpose: the server then closes the connection, as any last send would wait on the same
    full socket."""

    async def bounded(message: Message) -> None:
        try:
            async with asyncio.timeout(STALL_SECONDS):
                await send(message)
        except TimeoutError:
            raise Stalled from None

    try:
        await app(scope, receive, bounded)
    except* Stalled:
        log.warning("%s ended: its client read nothing for %.0f s", scope["path"], STALL_SECONDS)


class StallBounded(Response):
    """Another response, sent by `unless_stalled`."""

    def __init__(self, response: Response) -> None:
        self.response = response

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await unless_stalled(self.response, scope, receive, send)


class StallBoundedRoute(APIRoute):
    """A route whose answers are `StallBounded`: the live feed's, whose stream FastAPI
    makes (a stalled stream otherwise kept its place, and never saw its token expire)."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def bounded(request: Request) -> Response:
            return StallBounded(await handler(request))

        return bounded


dashboard = APIRouter(prefix="/api/v1", dependencies=[Depends(current_staff)])
# The live feed: staff too, but its token may come as ?access_token= (EventSource sends no
# headers), so it has a router of its own.
live = APIRouter(
    prefix="/api/v1", dependencies=[Depends(feed_staff)], route_class=StallBoundedRoute
)
bot = APIRouter(prefix="/api/v1/bot", tags=["bot"], dependencies=[Depends(bot_caller)])
service = APIRouter(tags=["service"])

# Path and query ids follow the Telegram id rules too: a group id that cannot exist is a 422.
GroupIdPath = Annotated[GroupChatId, Path()]
ChannelIdPath = Annotated[ChannelChatId, Path()]
Search = Annotated[str | None, Query(min_length=1, max_length=255, pattern=NO_NUL)]
Since = Annotated[Time | None, Query(description="inclusive")]
Until = Annotated[Time | None, Query(description="exclusive")]
GroupQuery = Annotated[GroupChatId | None, Query()]
IfMatch = Annotated[str | None, Header(alias="If-Match")]
CHAT_ID_RE = re.compile(r"-?[0-9]{1,19}")
HEARTBEAT_SECONDS = 30
DEFAULT_RECHECK_SECONDS = 600


# ---------------------------------------------------------------- helpers of the endpoints

ETAG = {
    "description": 'the version as "N" (groups, channels); opaque for policies',
    "schema": {"type": "string"},
}


def answers(*errors: int, etag: tuple[int, ...] = ()) -> dict[int | str, dict[str, Any]]:
    """What a route answers beyond its success and the errors app.py documents on every
    route from what the route takes (credentials, parameters, a body, the database):
    `errors` are its own (404, 409, 412), `etag` the statuses that carry the ETag."""
    documented: dict[int | str, dict[str, Any]] = {status: {} for status in errors}
    for status in etag:
        documented.setdefault(status, {})["headers"] = {"ETag": ETAG}
    return documented


def not_found(what: str) -> HTTPException:
    return HTTPException(404, f"{what} not found")


def conflict(detail: str) -> HTTPException:
    return HTTPException(409, detail)


def if_match(header: str | None, version: int) -> None:
    """412 unless the If-Match header (if any) names the current version."""
    if header is None or header.strip() == "*":
        return
    tags = {t.strip().removeprefix("W/").strip('"') for t in header.split(",")}
    if str(version) not in tags:
        raise HTTPException(412, f"version {version} is current; reload and retry")


def etag(response: Response, version: int) -> None:
    response.headers["ETag"] = f'"{version}"'


def search(model: type[Group] | type[Channel], q: str) -> ColumnElement[bool]:
    """`q` as API.md has it: a case-insensitive substring of the title or the username (`%`
    and `_` literal), or exactly a chat id."""
    match = [
        col(model.title).icontains(q, autoescape=True),
        col(model.username).icontains(q.removeprefix("@"), autoescape=True),
    ]
    if CHAT_ID_RE.fullmatch(q) and INT64_MIN <= int(q) <= INT64_MAX:
        match.append(col(model.chat_id) == int(q))
    return or_(*match)


async def load_group(session: AsyncSession, chat_id: int, *, lock: bool = False) -> Group:
    statement = select(Group).where(Group.chat_id == chat_id)
    group = await session.scalar(statement.with_for_update() if lock else statement)
    if group is None:
        raise not_found(f"group {chat_id}")
    return group


async def load_channel(session: AsyncSession, chat_id: int, *, lock: bool = False) -> Channel:
    statement = select(Channel).where(Channel.chat_id == chat_id)
    channel = await session.scalar(statement.with_for_update() if lock else statement)
    if channel is None:
        raise not_found(f"channel {chat_id}")
    return channel


async def register_row[Row: (Group, Channel)](
    session: AsyncSession, model: type[Row], chat_id: int, values: dict[str, Any]
) -> tuple[Row, bool]:
    """The row of a chat id, locked, and whether this call created it from `values` (the
    bot's registrations, which API.md makes upserts). INSERT … ON CONFLICT DO NOTHING waits
    for a concurrent registration of the same id and then yields to it, so of two replicas
    registering one chat at once the second answers 200 with its changes applied, not a
    409; the loop ends unless the row is deleted each time between the two statements."""
    table: Any = model.__table__  # pyrefly: ignore[missing-attribute]
    locked = select(model).where(model.chat_id == chat_id).with_for_update()
    created = False
    while (row := await session.scalar(locked)) is None:
        new = model.model_validate({"chat_id": chat_id, **values})
        statement = upsert(session, table).values(new.model_dump(exclude={"id"}))
        statement = statement.on_conflict_do_nothing(index_elements=["chat_id"])
        created = await session.scalar(statement.returning(table.c.id)) is not None
    return row, created


async def group_dep(chat_id: GroupIdPath, session: SessionDep) -> Group:
    return await load_group(session, chat_id)


GroupDep = Annotated[Group, Depends(group_dep)]


def link_count(model: type[Group] | type[Channel], link: Any) -> Any:
    """A correlated count of a row's links (a group's channels, a channel's groups)."""
    return select(func.count()).where(link == model.id).correlate(model).scalar_subquery()


async def group_stats(session: AsyncSession, chat_id: int) -> GroupStats:
    members = (
        await session.execute(
            select(
                func.count().filter(col(Member.status) == "verified"),
                func.count().filter(col(Member.status) == "restricted"),
            ).where(Member.chat_id == chat_id)
        )
    ).one()
    checks = (
        await session.execute(
            select(func.count(), func.count().filter(col(Verification.result) == "passed")).where(
                Verification.chat_id == chat_id,
                Verification.occurred_at >= utcnow() - timedelta(hours=24),
            )
        )
    ).one()
    return GroupStats(
        verified_members=members[0],
        restricted_members=members[1],
        checks_24h=checks[0],
        pass_rate_24h=analytics.rate(checks[1], checks[0]),
    )


async def group_public(session: AsyncSession, group: Group) -> GroupPublic:
    assert group.id is not None
    channels = await policy.linked_channels(session, group.id)
    return GroupPublic.model_validate(
        {
            **group.model_dump(),
            "channel_count": len(channels),
            "channels": channels,
            "stats": await group_stats(session, group.chat_id),
        }
    )


async def channel_public(session: AsyncSession, channel: Channel) -> ChannelPublic:
    groups = (
        await session.execute(
            select(Group.chat_id, Group.title)
            .join(GroupChannel, col(GroupChannel.group_id) == Group.id)
            .where(GroupChannel.channel_id == channel.id)
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


async def apply_changes(
    session: AsyncSession, actor: Principal, row: Group | Channel, changes: dict[str, Any]
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
    resource = "group" if isinstance(row, Group) else "channel"
    await actor.audit(session, f"{resource}.update", resource, row.chat_id, before, snapshot(row))
    if isinstance(row, Group):
        policy.changed(session, row.chat_id)
    return True


async def update_channel_row(
    session: AsyncSession, actor: Principal, channel: Channel, changes: dict[str, Any]
) -> None:
    """Change a channel; every group requiring it has a new policy version then."""
    if await apply_changes(session, actor, channel, changes):
        assert channel.id is not None
        policy.changed(session, *await bump_groups_linked_to(session, channel.id))


async def bump_groups_linked_to(session: AsyncSession, channel_id: int) -> list[int]:
    """A linked channel changed, so the policy of every group requiring it changed."""
    linked = select(GroupChannel.group_id).where(GroupChannel.channel_id == channel_id)
    result = await session.execute(
        update(Group)
        .where(col(Group.id).in_(linked))
        .values(version=col(Group.version) + 1)
        .returning(col(Group.chat_id))
    )
    return list(result.scalars())


async def link_channel(
    session: AsyncSession, actor: Principal, chat_id: int, channel_chat_id: int
) -> tuple[Group, bool]:
    """Require a channel in a group; (group, False) when it already was."""
    group = await load_group(session, chat_id, lock=True)  # serializes links per group
    channel = await load_channel(session, channel_chat_id)
    assert group.id is not None and channel.id is not None
    links = await session.execute(
        select(GroupChannel.channel_id, GroupChannel.position).where(
            GroupChannel.group_id == group.id
        )
    )
    positions = {channel_id: position for channel_id, position in links}
    if channel.id in positions:
        return group, False
    if len(positions) >= MAX_CHANNELS_PER_GROUP:
        raise conflict(f"a group can require at most {MAX_CHANNELS_PER_GROUP} channels")
    position = max(positions.values(), default=-1) + 1
    session.add(GroupChannel(group_id=group.id, channel_id=channel.id, position=position))
    group.version += 1
    group.updated_at = utcnow()
    try:
        await session.flush()
    except IntegrityError:  # the channel was deleted while this link was being made
        await session.rollback()
        raise not_found(f"channel {channel_chat_id}") from None
    after = {"channel_id": channel_chat_id, "position": position}
    await actor.audit(session, "group.link_channel", "group", chat_id, after=after)
    policy.changed(session, chat_id)
    return group, True


async def unlink_channel(
    session: AsyncSession, actor: Principal, chat_id: int, channel_chat_id: int
) -> None:
    group = await load_group(session, chat_id, lock=True)
    channel_id = select(Channel.id).where(Channel.chat_id == channel_chat_id).scalar_subquery()
    result = await session.execute(
        delete(GroupChannel).where(
            col(GroupChannel.group_id) == group.id, col(GroupChannel.channel_id) == channel_id
        )
    )
    if not result.rowcount:  # pyrefly: ignore[missing-attribute]
        raise not_found(f"channel {channel_chat_id} linked to group {chat_id}")
    group.version += 1
    group.updated_at = utcnow()
    before = {"channel_id": channel_chat_id}
    await actor.audit(session, "group.unlink_channel", "group", chat_id, before=before)
    policy.changed(session, chat_id)


async def titles_of(session: AsyncSession, model: Any, chat_ids: list[int]) -> dict[int, str]:
    """Current titles; a group or channel deleted since has none (its numbers stay)."""
    if not chat_ids:
        return {}
    rows = await session.execute(
        select(model.chat_id, model.title).where(model.chat_id.in_(chat_ids))
    )
    return {chat_id: title for chat_id, title in rows}


# ---------------------------------------------------------------- me


@dashboard.get("/me", response_model=Me, tags=["staff"])
async def read_me(staff: CurrentStaff) -> Me:
    """Who the token belongs to, and their role."""
    assert staff.role is not None
    return Me(user_id=uuid.UUID(staff.id), email=staff.name, role=staff.role, aal=staff.aal)


# ---------------------------------------------------------------- groups

GroupSort = Literal["title", "-title", "created_at", "-created_at"]
GROUP_ORDERS = {
    sort: Keyset(
        f"groups:{sort}",
        (col(Group.title if "title" in sort else Group.created_at), col(Group.id)),
        descending=sort.startswith("-"),
    )
    for sort in ("title", "-title", "created_at", "-created_at")
}


@dashboard.get("/groups", response_model=CountedPage[GroupSummary], tags=["groups"])
async def list_groups(
    session: SessionDep,
    page: PageQuery,
    q: Search = None,
    active: bool | None = None,
    sort: GroupSort = "-created_at",
) -> CountedPage[GroupSummary]:
    """List protected groups."""
    statement = select(Group, link_count(Group, GroupChannel.group_id))
    if q is not None:
        statement = statement.where(search(Group, q))
    if active is not None:
        statement = statement.where(Group.is_active == active)
    total = await count(session, statement)
    rows, next_cursor = await paginate(session, statement, GROUP_ORDERS[sort], page)
    items = [
        GroupSummary.model_validate({**group.model_dump(), "channel_count": n}) for group, n in rows
    ]
    return CountedPage[GroupSummary](items=items, next_cursor=next_cursor, total=total)


@dashboard.post(
    "/groups",
    response_model=GroupPublic,
    status_code=201,
    responses=answers(409, etag=(201,)),
    tags=["groups"],
)
async def create_group(
    body: GroupCreate, session: SessionDep, actor: Editor, response: Response
) -> GroupPublic:
    """Protect a group."""
    group = Group.model_validate(body)
    session.add(group)
    try:
        await session.flush()
    except IntegrityError:
        raise conflict(f"group {body.chat_id} already exists") from None
    await actor.audit(session, "group.create", "group", group.chat_id, after=snapshot(group))
    policy.changed(session, group.chat_id)
    await session.commit()
    etag(response, group.version)
    return await group_public(session, group)


@dashboard.get(
    "/groups/{chat_id}",
    response_model=GroupPublic,
    responses=answers(404, etag=(200,)),
    tags=["groups"],
)
async def read_group(group: GroupDep, session: SessionDep, response: Response) -> GroupPublic:
    """One group with its settings, required channels and member stats."""
    etag(response, group.version)
    return await group_public(session, group)


@dashboard.patch(
    "/groups/{chat_id}",
    response_model=GroupPublic,
    responses=answers(404, 412, etag=(200,)),
    tags=["groups"],
)
async def update_group(
    chat_id: GroupIdPath,
    body: GroupUpdate,
    session: SessionDep,
    actor: Editor,
    response: Response,
    if_match_header: IfMatch = None,
) -> GroupPublic:
    """Change a group's title, state or settings."""
    group = await load_group(session, chat_id, lock=True)
    if_match(if_match_header, group.version)
    await apply_changes(session, actor, group, body.model_dump(exclude_unset=True))
    await session.commit()
    etag(response, group.version)
    return await group_public(session, group)


@dashboard.delete("/groups/{chat_id}", status_code=204, responses=answers(404), tags=["groups"])
async def delete_group(chat_id: GroupIdPath, session: SessionDep, actor: Editor) -> None:
    """Stop protecting a group; its verification history stays."""
    group = await load_group(session, chat_id, lock=True)
    before = snapshot(group)
    await session.execute(delete(GroupChannel).where(col(GroupChannel.group_id) == group.id))
    await session.execute(delete(Member).where(col(Member.chat_id) == chat_id))
    await recount_members(session, chat_id)
    await session.delete(group)
    await actor.audit(session, "group.delete", "group", chat_id, before=before)
    policy.changed(session, chat_id)
    await session.commit()


@dashboard.put(
    "/groups/{chat_id}/channels/{channel_id}",
    response_model=GroupPublic,
    responses={
        201: {"model": GroupPublic, "description": "Linked"},
        **answers(404, 409, etag=(200, 201)),
    },
    tags=["groups"],
)
async def link_group_channel(
    chat_id: GroupIdPath,
    channel_id: ChannelIdPath,
    session: SessionDep,
    actor: Editor,
    response: Response,
) -> GroupPublic:
    """Require a channel in a group (idempotent: 201 when new, 200 when already linked)."""
    group, created = await link_channel(session, actor, chat_id, channel_id)
    public = await group_public(session, group)
    await session.commit()
    response.status_code = 201 if created else 200
    etag(response, group.version)
    return public


@dashboard.delete(
    "/groups/{chat_id}/channels/{channel_id}",
    status_code=204,
    responses=answers(404),
    tags=["groups"],
)
async def unlink_group_channel(
    chat_id: GroupIdPath, channel_id: ChannelIdPath, session: SessionDep, actor: Editor
) -> None:
    """Stop requiring a channel in a group."""
    await unlink_channel(session, actor, chat_id, channel_id)
    await session.commit()


MEMBER_ORDER = Keyset("members:user_id", (col(Member.user_id),))


@dashboard.get(
    "/groups/{chat_id}/members",
    response_model=Page[MemberPublic],
    responses=answers(404),
    tags=["groups"],
)
async def list_members(
    group: GroupDep,
    session: SessionDep,
    page: PageQuery,
    status: Literal["verified", "restricted"] | None = None,
) -> Page[MemberPublic]:
    """Member verification states of a group, by user id."""
    statement = select(Member).where(Member.chat_id == group.chat_id)
    if status is not None:
        statement = statement.where(Member.status == status)
    rows, next_cursor = await paginate(session, statement, MEMBER_ORDER, page)
    items = [MemberPublic.model_validate(m, from_attributes=True) for (m,) in rows]
    return Page[MemberPublic](items=items, next_cursor=next_cursor)


# ---------------------------------------------------------------- channels

CHANNEL_ORDER = Keyset(
    "channels:-created_at", (col(Channel.created_at), col(Channel.id)), descending=True
)


@dashboard.get("/channels", response_model=CountedPage[ChannelSummary], tags=["channels"])
async def list_channels(
    session: SessionDep, page: PageQuery, q: Search = None
) -> CountedPage[ChannelSummary]:
    """List channels, newest first."""
    statement = select(Channel, link_count(Channel, GroupChannel.channel_id))
    if q is not None:
        statement = statement.where(search(Channel, q))
    total = await count(session, statement)
    rows, next_cursor = await paginate(session, statement, CHANNEL_ORDER, page)
    items = [
        ChannelSummary.model_validate({**channel.model_dump(), "group_count": n})
        for channel, n in rows
    ]
    return CountedPage[ChannelSummary](items=items, next_cursor=next_cursor, total=total)


@dashboard.post(
    "/channels",
    response_model=ChannelPublic,
    status_code=201,
    responses=answers(409, etag=(201,)),
    tags=["channels"],
)
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
    after = snapshot(channel)
    await actor.audit(session, "channel.create", "channel", channel.chat_id, after=after)
    await session.commit()
    etag(response, channel.version)
    return await channel_public(session, channel)


@dashboard.get(
    "/channels/{chat_id}",
    response_model=ChannelPublic,
    responses=answers(404, etag=(200,)),
    tags=["channels"],
)
async def read_channel(
    chat_id: ChannelIdPath, session: SessionDep, response: Response
) -> ChannelPublic:
    """One channel and the groups that require it."""
    channel = await load_channel(session, chat_id)
    etag(response, channel.version)
    return await channel_public(session, channel)


@dashboard.patch(
    "/channels/{chat_id}",
    response_model=ChannelPublic,
    responses=answers(404, 412, etag=(200,)),
    tags=["channels"],
)
async def update_channel(
    chat_id: ChannelIdPath,
    body: ChannelUpdate,
    session: SessionDep,
    actor: Editor,
    response: Response,
    if_match_header: IfMatch = None,
) -> ChannelPublic:
    """Change a channel's title, username or invite link."""
    channel = await load_channel(session, chat_id, lock=True)
    if_match(if_match_header, channel.version)
    await update_channel_row(session, actor, channel, body.model_dump(exclude_unset=True))
    await session.commit()
    etag(response, channel.version)
    return await channel_public(session, channel)


@dashboard.delete(
    "/channels/{chat_id}", status_code=204, responses=answers(404, 409), tags=["channels"]
)
async def delete_channel(
    chat_id: ChannelIdPath, session: SessionDep, actor: Editor, force: bool = False
) -> None:
    """Forget a channel; 409 while groups require it, unless force=true unlinks it first."""
    channel = await load_channel(session, chat_id, lock=True)
    assert channel.id is not None
    linked = await session.scalar(select(func.count()).where(GroupChannel.channel_id == channel.id))
    if linked and not force:
        raise conflict(
            f"channel {chat_id} is required by {linked} group(s); "
            "unlink it first or pass force=true"
        )
    affected = await bump_groups_linked_to(session, channel.id)
    before = {**snapshot(channel), "unlinked_from": sorted(affected)}
    await session.execute(delete(GroupChannel).where(col(GroupChannel.channel_id) == channel.id))
    await session.delete(channel)
    await actor.audit(session, "channel.delete", "channel", chat_id, before=before)
    policy.changed(session, *affected)
    await session.commit()


# ---------------------------------------------------------------- verification log

ResultFilter = Annotated[Literal["passed", "blocked", "error"] | None, Query()]
TriggerFilter = Annotated[
    Literal["message", "join", "button", "channel_leave", "recheck"] | None, Query()
]


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
    if since is not None:
        filters.append(col(Verification.occurred_at) >= since)
    if until is not None:
        filters.append(col(Verification.occurred_at) < until)
    return filters


VerificationFilters = Annotated[list[ColumnElement[bool]], Depends(verification_filters)]
LOG_ORDER = Keyset(
    "verifications:-occurred_at",
    (col(Verification.occurred_at), col(Verification.id)),
    descending=True,
)


@dashboard.get("/verifications", response_model=Page[VerificationPublic], tags=["verifications"])
async def list_verifications(
    session: ReadSessionDep, filters: VerificationFilters, page: PageQuery
) -> Page[VerificationPublic]:
    """The verification log, newest first."""
    statement = select(Verification).where(*filters)
    rows, next_cursor = await paginate(session, statement, LOG_ORDER, page)
    items = [VerificationPublic.model_validate(v, from_attributes=True) for (v,) in rows]
    return Page[VerificationPublic](items=items, next_cursor=next_cursor)


CSV_COLUMNS = tuple(VerificationPublic.model_fields)
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def csv_cell(value: object) -> object:
    """Text that a spreadsheet would run as a formula gets a leading apostrophe. Numbers are
    written as numbers (a negative chat id is data, not a formula)."""
    if isinstance(value, str) and value.startswith(FORMULA_STARTS):
        return "'" + value
    return value


def csv_row(v: Verification) -> list[object]:
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


def csv_text(rows: Iterable[Sequence[object]]) -> str:
    buffer = io.StringIO()
    csv.writer(buffer).writerows(rows)  # RFC 4180: CRLF, quotes doubled, quoted when needed
    return buffer.getvalue()


EXPORT_PAGE = 2000  # rows per read: one short transaction each
# Rows per send (~30 KB at a seeded log's ~151 bytes a row), not a page a send: Granian takes
# sends into its buffer before one waits (a whole 20,000-row export, for a client that read
# nothing). Two stalled 100,000-row exports grew its worker by 13.8 MB, against 18.1 with
# a page a send.
EXPORT_CHUNK = 200


class Export(StreamingResponse):
    """A streamed answer whose client must keep reading: a send that waits STALL_SECONDS
    (the client's socket full, nothing read) ends the stream. `done` runs when the answer
    ends, however it ends (finished, stalled, or the client gone)."""

    def __init__(self, content: AsyncIterator[str], done: Callable[[], None], **kw: Any) -> None:
        super().__init__(content, **kw)
        self.done = done

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await unless_stalled(super().__call__, scope, receive, send)
        finally:
            self.done()


@dashboard.get(
    "/verifications/export",
    response_class=StreamingResponse,
    responses={200: {"content": {"text/csv": {}}, "description": "RFC 4180 CSV"}},
    tags=["verifications"],
)
async def export_verifications(
    request: Request, filters: VerificationFilters, staff: CurrentStaff
) -> StreamingResponse:
    """The verification log as CSV (same filters, newest first, streamed)."""
    db = database(request)
    give_back = limiter_of(request).exports.take(staff.id)  # 429 beyond its cap

    async def lines() -> AsyncIterator[str]:
        # Page by page, each read in a short transaction of its own: waiting on a slow
        # client never holds a connection (nor, on SQLite, the only one).
        yield csv_text([CSV_COLUMNS])
        after: list[Any] | None = None
        while True:
            statement = select(Verification).where(*filters)
            if after is not None:
                statement = statement.where(LOG_ORDER.where_after(after))
            statement = statement.order_by(*LOG_ORDER.order()).limit(EXPORT_PAGE)
            async with db.reading() as page_session:
                rows = list(await page_session.scalars(statement))
            for start in range(0, len(rows), EXPORT_CHUNK):
                yield csv_text(map(csv_row, rows[start : start + EXPORT_CHUNK]))
            if len(rows) < EXPORT_PAGE:
                return
            after = [rows[-1].occurred_at, rows[-1].id]

    stamp = utcnow().strftime("%Y%m%dT%H%M%SZ")
    return Export(
        lines(),
        give_back,
        media_type="text/csv; charset=utf-8",
        headers={
            "Content-Disposition": f'attachment; filename="channelgate-verifications-{stamp}.csv"'
        },
    )


# ---------------------------------------------------------------- analytics


@dashboard.get("/analytics/summary", response_model=AnalyticsSummary, tags=["analytics"])
async def analytics_summary(
    session: ReadSessionDep, since: Since = None, until: Until = None, group: GroupQuery = None
) -> AnalyticsSummary:
    """Totals over a window (default: the last 7 days)."""
    window = Window.of(since, until)
    sums = await analytics.counters(session, window, group)
    verified, restricted = await analytics.member_totals(session, group)
    histogram = [sums[name] for name in LATENCY_COLUMNS]
    users, estimated = await analytics.unique_users(session, window, group)
    return AnalyticsSummary(
        since=window.since,
        until=window.until,
        checks=sums["checks"],
        passed=sums["passed"],
        blocked=sums["blocked"],
        errors=sums["errors"],
        pass_rate=analytics.rate(sums["passed"], sums["checks"]),
        unique_users=users,
        unique_users_estimated=estimated,
        cache_hit_rate=analytics.rate(sums["cached"], sums["checks"]),
        latency_ms=Latency(
            p50=analytics.percentile(histogram, 0.5), p95=analytics.percentile(histogram, 0.95)
        ),
        active_groups=sums["active_groups"],
        verified_members=verified,
        restricted_members=restricted,
    )


MAX_POINTS = 2000


@dashboard.get("/analytics/timeseries", response_model=Timeseries, tags=["analytics"])
async def analytics_timeseries(
    session: ReadSessionDep,
    bucket: Literal["hour", "day"] = "hour",
    since: Since = None,
    until: Until = None,
    group: GroupQuery = None,
) -> Timeseries:
    """Checks per hour or per day, every bucket present (zeros filled)."""
    grain = "h" if bucket == "hour" else "d"
    window = Window.of(since, until, grain)
    step = timedelta(hours=1) if grain == "h" else timedelta(days=1)
    if (window.until - window.since) / step > MAX_POINTS:
        raise invalid(("query", "since"), f"the window holds more than {MAX_POINTS} {bucket}s")
    points = await analytics.timeseries(session, grain, window.since, window.until, group)
    return Timeseries.model_validate(
        {"bucket": bucket, "since": window.since, "until": window.until, "points": points}
    )


@dashboard.get("/analytics/top-groups", response_model=TopGroups, tags=["analytics"])
async def analytics_top_groups(
    session: ReadSessionDep,
    since: Since = None,
    until: Until = None,
    limit: Annotated[int, Query(ge=1, le=50)] = 10,
) -> TopGroups:
    """The groups with the most checks in a window."""
    window = Window.of(since, until)
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
    session: ReadSessionDep, since: Since = None, until: Until = None, group: GroupQuery = None
) -> ChannelBlocksList:
    """Which required channels users were missing when blocked, most first."""
    window = Window.of(since, until)
    rows = await analytics.channel_blocks(session, window, group)
    titles = await titles_of(session, Channel, [r.channel_id for r in rows])
    items = [
        ChannelBlocks(chat_id=r.channel_id, title=titles.get(r.channel_id), blocks=int(r.blocks))
        for r in rows
    ]
    return ChannelBlocksList(since=window.since, until=window.until, items=items)


# ---------------------------------------------------------------- live feed


async def subscription(request: Request, staff: FeedStaff) -> AsyncIterator[Subscriber]:
    """A place in the feed for the request's whole stream (429/503 when there is none)."""
    feed = feed_of(request)
    subscriber = feed.subscribe(staff.id, may_read_audit(staff, auth_state(request).settings))
    try:
        yield subscriber
    finally:
        feed.unsubscribe(subscriber)


@live.get("/events", response_class=EventSourceResponse, tags=["events"])
async def stream_events(
    request: Request,
    staff: FeedStaff,
    subscriber: Annotated[Subscriber, Depends(subscription)],
) -> AsyncIterator[ServerSentEvent]:
    """Live feed of verifications and (for owners) audit entries (server-sent events)."""
    state = auth_state(request)
    async for event in subscriber.events(lambda: still_staff_as(state, staff), staff.expires_at):
        yield event


# ---------------------------------------------------------------- audit

AUDIT_ORDER = Keyset("audit:-at", (col(AuditLog.at), col(AuditLog.id)), descending=True)


@dashboard.get("/audit", response_model=Page[AuditPublic], tags=["audit"])
async def list_audit(
    session: ReadSessionDep,
    _: Owner,
    page: PageQuery,
    actor: Annotated[str | None, Query(max_length=64, pattern=NO_NUL)] = None,
    action: Annotated[str | None, Query(max_length=64, pattern=NO_NUL)] = None,
    resource: Annotated[str | None, Query(max_length=32, pattern=NO_NUL)] = None,
    since: Since = None,
    until: Until = None,
) -> Page[AuditPublic]:
    """The audit log, newest first."""
    statement = select(AuditLog)
    if actor is not None:
        statement = statement.where(AuditLog.actor_id == actor)
    if action is not None:
        statement = statement.where(AuditLog.action == action)
    if resource is not None:
        statement = statement.where(AuditLog.resource == resource)
    if since is not None:
        statement = statement.where(AuditLog.at >= since)
    if until is not None:
        statement = statement.where(AuditLog.at < until)
    rows, next_cursor = await paginate(session, statement, AUDIT_ORDER, page)
    return Page[AuditPublic](
        items=[AuditPublic.from_row(a) for (a,) in rows], next_cursor=next_cursor
    )


# ---------------------------------------------------------------- staff

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def staff_listing(env_owners: set[str]) -> Any:
    """Everyone who can use the dashboard, in list order: owners only in OWNER_USER_IDS first
    (by user id), then the staff rows by creation. One statement, so one keyset pages it."""
    user_id_type = Staff.__table__.c.user_id.type  # pyrefly: ignore[missing-attribute]
    env_only = [
        core_select(
            literal(0).label("rank"),
            literal(EPOCH, UTCDateTime).label("sort_at"),
            literal(uuid.UUID(user_id), user_id_type).label("user_id"),
            literal(None, String).label("email"),
            literal("owner").label("role"),
            literal(None, UTCDateTime).label("created_at"),
        ).where(~exists().where(col(Staff.user_id) == uuid.UUID(user_id)))
        for user_id in sorted(env_owners)
    ]
    rows = core_select(
        literal(1).label("rank"),
        col(Staff.created_at).label("sort_at"),
        col(Staff.user_id),
        col(Staff.email),
        col(Staff.role),
        col(Staff.created_at),
    )
    return union_all(*env_only, rows).subquery("staff_listing")


@dashboard.get("/staff", response_model=CountedPage[StaffPublic], tags=["staff"])
async def list_staff(
    request: Request, session: SessionDep, _: Owner, page: PageQuery
) -> CountedPage[StaffPublic]:
    """Everyone who can use the dashboard, with their role."""
    env_owners = auth_state(request).owner_ids
    listing = staff_listing(env_owners)
    order = Keyset("staff:created_at", (listing.c.rank, listing.c.sort_at, listing.c.user_id))
    statement = select(listing)
    total = await count(session, statement)
    rows, next_cursor = await paginate(session, statement, order, page)
    items = [StaffPublic.from_row(row, env_owners) for row in rows]
    return CountedPage[StaffPublic](items=items, next_cursor=next_cursor, total=total)


async def lock_staff(
    session: AsyncSession, actor: Principal, user_id: uuid.UUID
) -> tuple[Staff | None, set[str]]:
    """The staff row of `user_id` and the user ids of the database owners, with the rows a
    staff change reads (the target's, the actor's, every owner's) locked in one statement,
    in user-id order. Two changes then never each hold a row the other waits for (two
    owners demoting each other deadlocked), and the one that waits reads what the other
    did: it neither leaves no owner nor acts as an owner it no longer is (403)."""
    actor_id = uuid.UUID(actor.id) if actor.source == "database" else user_id
    rows = await session.scalars(
        select(Staff)
        .where(or_(col(Staff.user_id).in_({user_id, actor_id}), col(Staff.role) == "owner"))
        .order_by(col(Staff.user_id))
        .with_for_update()
    )
    by_id = {row.user_id: row for row in rows}
    acting = by_id.get(actor_id)
    if actor.source == "database" and (acting is None or acting.role != "owner"):
        raise HTTPException(403, "this needs the owner role")
    return by_id.get(user_id), {str(u) for u, row in by_id.items() if row.role == "owner"}


@dashboard.put(
    "/staff/{user_id}",
    response_model=StaffPublic,
    responses={201: {"model": StaffPublic, "description": "Added"}, **answers(409)},
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
    env_owners = auth_state(request).owner_ids
    if str(user_id) in env_owners and body.role != "owner":
        raise conflict("this user is an owner through OWNER_USER_IDS; change it there")
    for attempt in (1, 2):  # the second time, a concurrent add of the same user is a change
        staff, owners = await lock_staff(session, actor, user_id)
        demoting = staff is not None and staff.role == "owner" and body.role != "owner"
        if demoting and not (env_owners | owners) - {str(user_id)}:
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
            response.status_code = 200
        try:
            await session.flush()
            break
        except IntegrityError:
            await session.rollback()
            if attempt == 2:
                raise conflict("this user was added concurrently; retry") from None
    await actor.audit(session, "staff.put", "staff", user_id, before, snapshot(staff))
    await session.commit()
    return StaffPublic.from_row(staff, env_owners)


@dashboard.delete("/staff/{user_id}", status_code=204, responses=answers(404, 409), tags=["staff"])
async def delete_staff(
    user_id: uuid.UUID, request: Request, session: SessionDep, actor: Owner
) -> None:
    """Remove a staff member."""
    env_owners = auth_state(request).owner_ids
    if str(user_id) in env_owners:
        raise conflict("this user is an owner through OWNER_USER_IDS; remove them there")
    staff, owners = await lock_staff(session, actor, user_id)
    if staff is None:
        raise not_found(f"staff member {user_id}")
    if staff.role == "owner" and not (env_owners | owners) - {str(user_id)}:
        raise conflict("this is the last owner")
    await actor.audit(session, "staff.delete", "staff", user_id, before=snapshot(staff))
    await session.delete(staff)
    await session.commit()


# ---------------------------------------------------------------- bot keys

KEY_ORDER = Keyset("bot_keys:-id", (col(BotKey.id),), descending=True)


@dashboard.get("/bot-keys", response_model=CountedPage[BotKeyPublic], tags=["bot keys"])
async def list_bot_keys(
    session: SessionDep, _: Owner, page: PageQuery
) -> CountedPage[BotKeyPublic]:
    """Bot API keys, newest first (never the key itself)."""
    statement = select(BotKey)
    total = await count(session, statement)
    rows, next_cursor = await paginate(session, statement, KEY_ORDER, page)
    items = [BotKeyPublic.model_validate(k, from_attributes=True) for (k,) in rows]
    return CountedPage[BotKeyPublic](items=items, next_cursor=next_cursor, total=total)


@dashboard.post("/bot-keys", response_model=BotKeyCreated, status_code=201, tags=["bot keys"])
async def create_bot_key(body: BotKeyCreate, session: SessionDep, actor: Owner) -> BotKeyCreated:
    """Create a bot API key; the response is the only time the key is shown."""
    created = await issue_bot_key(session, actor, body.name)
    await session.commit()
    return created


@dashboard.delete("/bot-keys/{key_id}", status_code=204, responses=answers(404), tags=["bot keys"])
async def revoke_bot_key(
    key_id: Annotated[int, Path(ge=1, le=2**31 - 1)],
    session: SessionDep,
    actor: Owner,
) -> None:
    """Revoke a bot key: it stops working at commit, on every replica within a second."""
    row = await session.scalar(select(BotKey).where(BotKey.id == key_id).with_for_update())
    if row is None:
        raise not_found(f"bot key {key_id}")
    if row.revoked_at is None:
        before = snapshot(row)
        row.revoked_at = utcnow()
        await actor.audit(session, "bot_key.revoke", "bot_key", key_id, before, snapshot(row))
        announce(session, BOT_KEY, [row.key_hash])  # dead at commit, here and on every replica
        await session.commit()


# ---------------------------------------------------------------- bots

BOT_ORDER = Keyset("bots:instance_id", (col(BotInstance.instance_id),))


@dashboard.get("/bots", response_model=CountedPage[BotInstancePublic], tags=["bots"])
async def list_bots(session: SessionDep, page: PageQuery) -> CountedPage[BotInstancePublic]:
    """Bot instances that sent heartbeats, by instance id."""
    statement = select(BotInstance)
    total = await count(session, statement)
    rows, next_cursor = await paginate(session, statement, BOT_ORDER, page)
    online_since = utcnow() - timedelta(seconds=2 * HEARTBEAT_SECONDS)
    items = [
        BotInstancePublic.model_validate(
            {**b.model_dump(), "online": b.last_seen_at >= online_since}
        )
        for (b,) in rows
    ]
    return CountedPage[BotInstancePublic](items=items, next_cursor=next_cursor, total=total)


# ---------------------------------------------------------------- bot: the policy

NOT_MODIFIED = {304: {"description": "Not modified (If-None-Match)"}}


@bot.get(
    "/groups/{chat_id}/policy",
    response_model=Policy,
    responses={**NOT_MODIFIED, **answers(404, 422, etag=(200, 304))},
    openapi_extra={
        "parameters": [
            {"name": "chat_id", "in": "path", "required": True, "schema": GROUP_ID_SCHEMA},
            {"name": "If-None-Match", "in": "header", "required": False,
             "schema": {"type": "string"}},
        ]
    },
)  # fmt: skip
async def read_policy() -> Response:
    """The policy for one group: the hot path, called for every message."""
    return policy.Answer()  # the documented twin of policy.Endpoint (app.App serves first)


# ---------------------------------------------------------------- bot: registration, links


@bot.put(
    "/groups/{chat_id}",
    response_model=Policy,
    responses={201: {"model": Policy, "description": "Registered"}, **answers(etag=(200, 201))},
)
async def register_group(
    chat_id: GroupIdPath, body: BotGroupPut, session: SessionDep, actor: BotCaller
) -> Response:
    """The bot was added to (or saw) a group: create it with defaults, or refresh its title."""
    changes = body.model_dump(exclude_unset=True)
    group, created = await register_row(session, Group, chat_id, changes)
    if created:
        await actor.audit(session, "group.register", "group", chat_id, after=snapshot(group))
        policy.changed(session, chat_id)
    else:
        # Counters change all the time: stored, but not a new version of the group.
        for field in ("member_count", "added_by_user_id"):
            if field in changes:
                setattr(group, field, changes.pop(field))
        await apply_changes(session, actor, group, changes)
    entry = await policy.build(session, chat_id)
    await session.commit()
    return policy.answer(entry, chat_id, 201 if created else 200)


@bot.put(
    "/channels/{chat_id}",
    response_model=ChannelPublic,
    responses={
        201: {"model": ChannelPublic, "description": "Registered"},
        **answers(etag=(200, 201)),
    },
)
async def register_channel(
    chat_id: ChannelIdPath,
    body: BotChannelPut,
    session: SessionDep,
    actor: BotCaller,
    response: Response,
) -> ChannelPublic:
    """Create or refresh a channel's metadata."""
    changes = body.model_dump(exclude_unset=True)
    channel, created = await register_row(session, Channel, chat_id, changes)
    if created:
        after = snapshot(channel)
        await actor.audit(session, "channel.register", "channel", chat_id, after=after)
        response.status_code = 201
    else:
        if "subscriber_count" in changes:
            channel.subscriber_count = changes.pop("subscriber_count")
        await update_channel_row(session, actor, channel, changes)
    await session.commit()
    etag(response, channel.version)
    return await channel_public(session, channel)


@bot.put(
    "/groups/{chat_id}/channels/{channel_id}",
    response_model=Policy,
    responses={
        201: {"model": Policy, "description": "Linked"},
        **answers(404, 409, etag=(200, 201)),
    },
)
async def bot_link_channel(
    chat_id: GroupIdPath, channel_id: ChannelIdPath, session: SessionDep, actor: BotCaller
) -> Response:
    """Require a channel in a group (the in-chat "protect @channel" command)."""
    _, created = await link_channel(session, actor, chat_id, channel_id)
    entry = await policy.build(session, chat_id)
    await session.commit()
    return policy.answer(entry, chat_id, 201 if created else 200)


@bot.delete("/groups/{chat_id}/channels/{channel_id}", status_code=204, responses=answers(404))
async def bot_unlink_channel(
    chat_id: GroupIdPath, channel_id: ChannelIdPath, session: SessionDep, actor: BotCaller
) -> None:
    """Stop requiring a channel in a group."""
    await unlink_channel(session, actor, chat_id, channel_id)
    await session.commit()


@bot.post(
    "/groups/{chat_id}/migrate", response_model=Policy, responses=answers(404, 409, etag=(200,))
)
async def migrate_group(
    chat_id: GroupIdPath, body: GroupMigrate, session: SessionDep, actor: BotCaller
) -> Response:
    """A basic group became a supergroup: move settings, links, members and history."""
    new_id = body.new_chat_id
    if new_id == chat_id:
        raise invalid(("body", "new_chat_id"), "is the current chat id")
    group = await load_group(session, chat_id, lock=True)
    if await session.scalar(select(Group.id).where(Group.chat_id == new_id)):
        raise conflict(f"group {new_id} already exists")
    await move_chat(session, chat_id, new_id)
    before = snapshot(group)
    group.chat_id = new_id
    group.version += 1
    group.updated_at = utcnow()
    try:
        await session.flush()
    except IntegrityError:  # the new id was registered concurrently
        raise conflict(f"group {new_id} already exists") from None
    await actor.audit(session, "group.migrate", "group", chat_id, before, snapshot(group))
    policy.changed(session, chat_id, new_id)
    entry = await policy.build(session, new_id)
    await session.commit()
    return policy.answer(entry, new_id)


@bot.get("/channels/{chat_id}/groups", response_model=ChatRefList, responses=answers(404))
async def list_channel_groups(chat_id: ChannelIdPath, session: SessionDep) -> ChatRefList:
    """Active groups that require this channel (to re-check a user who left it)."""
    channel = await load_channel(session, chat_id)
    rows = await session.scalars(
        select(Group.chat_id)
        .join(GroupChannel, col(GroupChannel.group_id) == Group.id)
        .where(GroupChannel.channel_id == channel.id, Group.is_active)
        .order_by(col(Group.chat_id))
    )
    return ChatRefList(items=[ChatRef(chat_id=c) for c in rows])


# ---------------------------------------------------------------- bot: verifications, members


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
async def ingest_verifications(request: Request, session: SessionDep) -> IngestResult:
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
    accepted = await ingest(session, body.events)
    await session.commit()
    metrics_of(request).ingested.inc(accepted)
    return IngestResult(accepted=accepted, duplicates=len(body.events) - accepted)


@bot.get("/groups/{chat_id}/members/{user_id}", response_model=MemberState)
async def read_member_state(
    chat_id: GroupIdPath, user_id: Annotated[UserId, Path()], session: SessionDep
) -> MemberState:
    """A user's last known state in a group, and until when a pass stays fresh."""
    row = (
        await session.execute(
            select(Member, Group.recheck_seconds)
            .outerjoin(Group, col(Group.chat_id) == Member.chat_id)
            .where(Member.chat_id == chat_id, Member.user_id == user_id)
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


@bot.get("/groups/{chat_id}/stats", response_model=GroupStats, responses=answers(404))
async def read_group_stats(group: GroupDep, session: SessionDep) -> GroupStats:
    """The group's member counts and last day's checks, for the in-chat `/status` command."""
    return await group_stats(session, group.chat_id)


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


# ---------------------------------------------------------------- service


@service.get("/healthz")
async def healthz() -> dict[str, str]:
    """The process is up."""
    return {"status": "ok"}


@service.get("/readyz", responses={503: {"description": "Not ready: see the problem's detail"}})
async def readyz(request: Request, session: SessionDep) -> Readiness:
    """Ready for traffic: the database answers, its schema is the one this code needs, and
    (on PostgreSQL) the link that tells this replica of the others' changes is up."""
    at, head = await schema_revision(session), schema_head()
    listener = database(request).listener
    link = "none" if listener is None else "up" if listener.linked.is_set() else "down"
    if at != head:
        raise HTTPException(
            503, f"the schema is at {at or 'nothing'}, this code needs {head}: "
            "run `channelgate migrate`", headers={"Retry-After": "30"},
        )  # fmt: skip
    if link == "down":
        raise HTTPException(
            503, "the link to the other replicas (LISTEN) is down; reconnecting",
            headers={"Retry-After": "5"},
        )  # fmt: skip
    return Readiness(status="ok", schema_revision=head, replica_link=link)


@service.get(
    "/metrics",
    response_class=Response,
    responses={
        200: {"content": {"text/plain": {}}, "description": "Prometheus text format"},
        **answers(404),
    },
)
async def read_metrics(request: Request) -> Response:
    """Prometheus metrics (METRICS_ENABLED=true; else 404)."""
    if not auth_state(request).settings.metrics_enabled:
        raise HTTPException(404, "metrics are off (METRICS_ENABLED=false)")
    return Response(metrics_of(request).exposition(), media_type="text/plain; version=0.0.4")
