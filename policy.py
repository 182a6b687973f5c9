"""The bot's hot path: a group's policy, served from memory, with `ETag` / `If-None-Match`.

The policy is built once from the database and kept, serialized, until something in it
changes: a write says so with `changed(session, chat_id)` inside its transaction, and the
commit hooks drop the entry here at once and on every replica through NOTIFY (see db.py).
A generation counter keeps a read that raced a change from caching what it read.

`Endpoint` serves `GET /api/v1/bot/groups/{chat_id}/policy` as a bare ASGI app that
app.App calls before FastAPI's own stack (its documented FastAPI twin is never reached):
dependency solving, Request objects, route matching and the layers around the routes were
most of the hot path's cost (measured in bench/README.md).
"""

import time

from fastapi import HTTPException
from fastapi.responses import Response
from sqlalchemy.ext.asyncio import AsyncSession
from sqlmodel import col, select
from starlette.requests import HTTPConnection
from starlette.routing import Route, compile_path
from starlette.types import Receive, Scope, Send

from auth import AuthState, auth_state, authenticate_bot, client_address
from db import POLICY, Database, announce
from models import (
    SETTING_FIELDS,
    Channel,
    ChannelRef,
    Group,
    GroupChannel,
    Policy,
    invalid,
    is_group_chat_id,
)

MAX_ENTRIES = 100_000
UNLINKED_TRUST = 1.0  # seconds an entry is trusted while this replica cannot hear the others
PATH = "/api/v1/bot/groups/{chat_id}/policy"
PATH_RE = compile_path(PATH)[0]  # what Starlette's router matches PATH with

Entry = tuple[bytes, str] | None  # (serialized policy, ETag), or None for "no such group"


def changed(session: AsyncSession, *chat_ids: int) -> None:
    """These groups' policies change when the session commits: drop them from every cache."""
    announce(session, POLICY, chat_ids)


async def linked_channels(session: AsyncSession, group_id: int) -> list[ChannelRef]:
    rows = await session.scalars(
        select(Channel)
        .join(GroupChannel, col(GroupChannel.channel_id) == Channel.id)
        .where(GroupChannel.group_id == group_id)
        .order_by(col(GroupChannel.position))
    )
    return [ChannelRef.model_validate(c, from_attributes=True) for c in rows]


async def build(session: AsyncSession, chat_id: int) -> Entry:
    group = await session.scalar(select(Group).where(Group.chat_id == chat_id))
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


class Policies:
    """chat id -> Entry, dropped after every committed change to a group, its links or a
    linked channel."""

    def __init__(self, db: Database) -> None:
        self.db = db
        self.entries: dict[int, Entry] = {}
        self.generation = 0
        # On PostgreSQL other replicas' changes arrive through the Listener; until it is
        # linked (and whenever it is not) nothing cached is older than UNLINKED_TRUST.
        self.linked = not db.is_postgres
        self.expires = 0.0
        db.on(POLICY, lambda chat_ids: self.invalidate(*map(int, chat_ids)))

    def link(self, linked: bool) -> None:
        """The Listener's link came up or went down: either way, what is cached may have
        missed a change."""
        self.linked = linked
        self.clear()

    def invalidate(self, *chat_ids: int) -> None:
        self.generation += 1
        for chat_id in chat_ids:
            self.entries.pop(chat_id, None)

    def clear(self) -> None:
        self.generation += 1
        self.entries.clear()

    async def get(self, chat_id: int) -> Entry:
        """The cached entry, or one built now through a session of its own: for the hot
        path, which holds no other. A write route answers with `build` through its own
        session, inside its transaction (see DESIGN.md, "Transactions and sessions")."""
        if not self.linked and (now := time.monotonic()) >= self.expires:
            self.clear()
            self.expires = now + UNLINKED_TRUST
        try:
            return self.entries[chat_id]
        except KeyError:
            generation = self.generation
            async with self.db.sessionmaker() as session:
                entry = await build(session, chat_id)
            if generation == self.generation:
                if len(self.entries) >= MAX_ENTRIES:
                    self.entries.clear()
                self.entries[chat_id] = entry
            return entry


def policies(connection: HTTPConnection) -> Policies:
    return connection.app.state.services.policies


def etag_matches(if_none_match: str, tag: str) -> bool:
    tags = {t.strip().removeprefix("W/") for t in if_none_match.split(",")}
    return tag in tags or "*" in tags


def answer(entry: Entry, chat_id: int, status: int = 200) -> Response:
    """The policy as a bot write route answers it."""
    if entry is None:
        raise HTTPException(404, f"group {chat_id} not found")
    body, tag = entry
    return Response(body, status, headers={"ETag": tag}, media_type="application/json")


def chat_id_of(raw: str) -> int:
    """The path's chat id, read by hand: 422 unless a group's id (GroupChatId's rule)."""
    try:
        value = int(raw)
    except ValueError:
        raise invalid(("path", "chat_id"), "must be an integer", "int_parsing") from None
    if not is_group_chat_id(value):
        raise invalid(("path", "chat_id"), "is not a group chat id (negative; supergroups -100…)")
    return value


JSON_TYPE = (b"content-type", b"application/json")


class Endpoint:
    """The whole hot path as an ASGI app: bot key, cached policy, 304 or 200. Errors are
    raised, for the app's problem+json handlers; `path_params` holds the raw chat id."""

    def __init__(self, auth: AuthState, cache: Policies) -> None:
        self.auth = auth
        self.cache = cache
        self.route = Route(PATH, self, methods=["GET"])
        self.route.methods = {"GET"}  # not the HEAD Starlette adds: like every other route

    async def __call__(self, scope: Scope, _receive: Receive, send: Send) -> None:
        scope["route"] = self.route  # as FastAPI's routes do: logs and metrics name it
        authorization = if_none_match = b""
        for name, value in scope["headers"]:
            if name == b"authorization":
                authorization = value
            elif name == b"if-none-match":
                if_none_match = value
        request_id = scope["state"].get("request_id")
        await authenticate_bot(
            self.auth, authorization.decode("latin-1"), request_id, client_address(scope)
        )
        chat_id = chat_id_of(scope["path_params"]["chat_id"])
        entry = await self.cache.get(chat_id)
        if entry is None:
            raise HTTPException(404, f"group {chat_id} not found")
        body, tag = entry
        if if_none_match and etag_matches(if_none_match.decode("latin-1"), tag):
            headers = [(b"etag", tag.encode())]
            await send({"type": "http.response.start", "status": 304, "headers": headers})
            await send({"type": "http.response.body", "body": b""})
            return
        length = (b"content-length", str(len(body)).encode())
        headers = [JSON_TYPE, length, (b"etag", tag.encode())]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": body})


class Answer(Response):
    """What the documented FastAPI twin returns: the same hot path, so the twin (reached
    only if app.App did not serve the path first) cannot drift from it."""

    def __init__(self) -> None:
        super().__init__()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        connection = HTTPConnection(scope)
        await Endpoint(auth_state(connection), policies(connection))(scope, receive, send)
