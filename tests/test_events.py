"""The live feed (GET /events, server-sent events): what subscribers receive, keep-alives,
`?access_token=`, cross-replica delivery on PostgreSQL, bounded queues, disconnects.

httpx's ASGITransport collects the whole body before returning a response, so an endless
stream never arrives through it. Streams are therefore read from the harness app served by a
real uvicorn server on 127.0.0.1 (random port, lifespan off: the harness already runs it), in
the test's own event loop; one-shot answers (401, 403, 503) still go through the harness
client."""

import asyncio
import json
import logging
import uuid
from collections.abc import AsyncGenerator, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import Any

import anyio
import asyncpg
import fastapi.routing
import httpx
import pytest
from sqlalchemy import make_url
from sqlmodel import col, select

import db as db_module
import feed as feed_module
from db import Database
from feed import Feed
from ingest import ingest as ingest_events
from models import Verification, VerificationBatch
from tests.conftest import Harness, JWKSServer, Tokens, make_settings, problem, start_harness
from tests.factories import (
    GROUP_ID,
    create_group,
    event,
    eventually,
    ingest,
    listening,
    post_events,
    served,
)

pytestmark = pytest.mark.anyio

EVENTS = "/api/v1/events"
GROUP = GROUP_ID
WAIT = 5.0


def dropped(harness: Harness) -> float | None:
    """channelgate_feed_dropped_total of the harness app, as a scrape would read it."""
    registry = harness.services.metrics.registry
    assert registry is not None
    return registry.get_sample_value("channelgate_feed_dropped_total")


class SSE:
    """Reads one server-sent-events stream message by message."""

    def __init__(self, response: httpx.Response) -> None:
        self.response = response
        self.lines = response.aiter_lines()

    async def message(self) -> dict[str, Any]:
        """The next message: its fields (`data` parsed as JSON), comments under `comment`."""
        fields: dict[str, Any] = {}
        async with asyncio.timeout(WAIT):
            async for line in self.lines:
                if line == "":
                    if fields:
                        return fields
                    continue
                name, _, value = line.partition(":")
                value = value.removeprefix(" ")
                fields[name or "comment"] = json.loads(value) if name == "data" else value
        raise AssertionError(f"the stream ended; last fields {fields}")

    async def rest(self, ignore: str | None = None) -> list[dict[str, Any]]:
        """Every message until the server ends the stream (keep-alive comments and `ignore`
        events left out)."""
        messages: list[dict[str, Any]] = []
        fields: dict[str, Any] = {}
        async for line in self.lines:
            if line == "":
                if fields and "comment" not in fields and fields.get("event") != ignore:
                    messages.append(fields)
                fields = {}
                continue
            name, _, value = line.partition(":")
            fields[name or "comment"] = value.removeprefix(" ")
        return messages

    async def next(self, kind: str, where: Callable[[dict], bool] = lambda _: True) -> dict:
        """The data of the next `kind` event that satisfies `where` (others are skipped: the
        feed carries every audit entry and verification, some from the fixtures' setup)."""
        while True:
            message = await self.message()
            if message.get("event") == kind and where(message["data"]):
                return message["data"]


@asynccontextmanager
async def subscribe(
    client: httpx.AsyncClient, auth: dict | None = None, **params: str
) -> AsyncGenerator[SSE]:
    async with client.stream("GET", EVENTS, headers=auth or {}, params=params) as response:
        assert response.status_code == 200, await response.aread()
        assert response.headers["content-type"].startswith("text/event-stream")
        assert response.headers["cache-control"] == "no-cache"
        stream = SSE(response)
        assert await stream.message() == {"retry": "3000"}  # first, and the subscription is live
        yield stream


def token_of(auth: dict[str, str]) -> str:
    return auth["Authorization"].removeprefix("Bearer ")


# ---------------------------------------------------------------- what subscribers receive


async def test_verification_events_after_an_ingest(harness: Harness, bot, viewer):
    await listening(harness)
    async with served(harness) as http, subscribe(http, viewer) as stream:
        first, second = event(user_id=1, result="blocked"), event(user_id=2)
        stored = await post_events(harness.client, bot, [first, second])
        assert stored == {"accepted": 2, "duplicates": 0}
        got = [await stream.next("verification"), await stream.next("verification")]
        log = (await harness.client.get("/api/v1/verifications", headers=viewer)).json()["items"]
        # As in the log, oldest first.
        assert got == sorted(log, key=lambda v: (v["occurred_at"], v["id"]))
        assert {v["event_id"] for v in got} == {first["event_id"], second["event_id"]}

        # A retried batch stores nothing, so it announces nothing; a refused one neither.
        retried = await post_events(harness.client, bot, [first, second])
        assert retried == {"accepted": 0, "duplicates": 2}
        problem(await ingest(harness.client, bot, [event(), {"x": 1}]), 422)
        marker = event(user_id=3)
        await post_events(harness.client, bot, [marker])
        assert (await stream.next("verification"))["event_id"] == marker["event_id"]


async def test_a_full_batch_arrives_whole(harness: Harness, bot, viewer):
    """1000 events in one batch: announced in several NOTIFY payloads on PostgreSQL (8000-byte
    limit); each subscriber queue holds them all."""
    await listening(harness)
    async with served(harness) as http, subscribe(http, viewer) as stream:
        batch = [event(user_id=i + 1) for i in range(1000)]
        await post_events(harness.client, bot, batch)
        got = [(await stream.next("verification"))["event_id"] for _ in batch]
        assert sorted(got) == sorted(e["event_id"] for e in batch)
        assert dropped(harness) == 0


async def test_audit_event_after_a_dashboard_write(harness: Harness, editor, owner):
    await listening(harness)
    async with served(harness) as http, subscribe(http, owner) as stream:
        await create_group(harness.client, editor, GROUP, title="Alpha")
        got = await stream.next("audit", lambda a: a["action"] == "group.create")
        entry = (await harness.client.get("/api/v1/audit", headers=owner)).json()["items"][0]
        assert got == entry
        assert (got["resource"], got["resource_id"]) == ("group", str(GROUP))
        assert got["actor"]["kind"] == "staff"
        assert got["after"]["title"] == "Alpha"


async def test_keep_alive_comment(harness: Harness, viewer, monkeypatch):
    monkeypatch.setattr(fastapi.routing, "_PING_INTERVAL", 0.1)  # read from there
    async with served(harness) as http, subscribe(http, viewer) as stream:
        assert await stream.message() == {"comment": "ping"}
        assert await stream.message() == {"comment": "ping"}


async def test_keep_alive_is_15_seconds():
    assert fastapi.routing._PING_INTERVAL == 15


# ---------------------------------------------------------------- who may subscribe


async def test_access_token_query_parameter(harness: Harness, bot, viewer):
    await listening(harness)
    async with (
        served(harness) as http,
        subscribe(http, access_token=token_of(viewer)) as stream,
    ):
        marker = event()
        await post_events(harness.client, bot, [marker])
        assert (await stream.next("verification"))["event_id"] == marker["event_id"]


async def test_access_token_is_not_logged(harness: Harness, viewer):
    records: list[logging.LogRecord] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    handler = Collect()
    access = logging.getLogger("channelgate.access")
    level = access.level
    access.addHandler(handler)
    access.setLevel(logging.INFO)
    try:
        secret = token_of(viewer)[:-4] + "AAAA"  # a bad signature: refused
        response = await harness.client.get(EVENTS, params={"access_token": secret})
        problem(response, 401)
        assert secret not in response.text
    finally:
        access.removeHandler(handler)
        access.setLevel(level)
    assert records, "no access log record was written"
    for record in records:
        assert secret not in repr(record.__dict__)
        assert getattr(record, "path", None) == EVENTS


@pytest.mark.parametrize(
    ("token", "status", "detail"),
    [
        (None, 401, "missing bearer token"),
        ("not-a-jwt", 401, None),
        ("cgk_" + "A" * 43, 401, "bot keys are not accepted on dashboard routes"),
        ("expired", 401, None),
        ("outsider", 403, "this account is not channelgate staff"),
    ],
)
async def test_refused_subscribers(
    harness: Harness, tokens: Tokens, token: str | None, status: int, detail: str | None
):
    if token == "expired":
        token = tokens.mint(str(uuid.uuid4()), exp=int(datetime.now(UTC).timestamp()) - 3600)
    elif token == "outsider":
        token = tokens.mint(str(uuid.uuid4()))
    ways: list[tuple[dict, dict]] = [({}, {})]
    if token:
        ways = [({"access_token": token}, {}), ({}, {"Authorization": f"Bearer {token}"})]
    for params, headers in ways:
        response = await harness.client.get(EVENTS, params=params, headers=headers)
        body = problem(response, status)
        if detail:
            assert body["detail"] == detail
        if status == 401:
            assert response.headers["www-authenticate"].startswith("Bearer")
    assert harness.services.feed.subscribers == set()


async def test_subscriber_limit_is_503(harness: Harness, viewer, monkeypatch):
    monkeypatch.setattr(feed_module, "MAX_SUBSCRIBERS", 1)
    feed: Feed = harness.services.feed
    taken = feed.subscribe("someone", sees_audit=False)
    response = await harness.client.get(EVENTS, headers=viewer)
    assert problem(response, 503)["detail"] == "too many live-feed subscribers"
    assert response.headers["retry-after"] == "30"
    feed.unsubscribe(taken)


# ---------------------------------------------------------------- replicas, slow readers, leaving


async def test_events_reach_a_subscriber_on_another_replica(
    harness: Harness, database_url: str, jwks_server: JWKSServer, tokens: Tokens, bot, editor
):
    if not database_url.startswith("postgresql"):
        pytest.skip("cross-replica delivery rides on PostgreSQL NOTIFY")
    async for other in start_harness(database_url, jwks_server.url, tokens):
        await listening(harness, other)
        owner = await other.add_staff("owner")
        async with served(other) as http, subscribe(http, owner) as stream:
            marker = event()
            await post_events(harness.client, bot, [marker])  # written through the first replica
            got = await stream.next("verification")
            assert got["event_id"] == marker["event_id"]
            await create_group(harness.client, editor, -1001000000002, title="B")
            audit = await stream.next("audit", lambda a: a["action"] == "group.create")
            assert audit["resource_id"] == "-1001000000002"
        assert other.services.feed.subscribers == set()


@asynccontextmanager
async def verification_notifies(database_url: str) -> AsyncGenerator[list[set[str]]]:
    """The ids of each verification NOTIFY that PostgreSQL delivers meanwhile."""
    heard: list[set[str]] = []

    def hear(*args: Any) -> None:
        _origin, topic, items = args[3].split(" ", 2)
        if topic == "verification":
            heard.append(set(items.split(",")))

    listener = await asyncpg.connect(
        make_url(database_url).set(drivername="postgresql").render_as_string(False)
    )
    await listener.add_listener(db_module.NOTIFY_CHANNEL, hear)
    try:
        yield heard
    finally:
        await listener.close()


async def test_the_feed_is_announced_after_the_commit_gathered_and_sent_on_stop(
    harness: Harness, database_url: str, jwks_server: JWKSServer, tokens: Tokens, monkeypatch
):
    """Verification ids reach the other replicas through the announcer: not in the ingesting
    transaction (whose NOTIFY would take PostgreSQL's notify lock through its commit), but
    gathered for ANNOUNCE_EVERY into one NOTIFY, and what is queued when a replica stops
    is still sent."""
    if not database_url.startswith("postgresql"):
        pytest.skip("cross-replica delivery rides on PostgreSQL NOTIFY")
    monkeypatch.setattr(db_module, "ANNOUNCE_EVERY", 3.0)
    last: set[str] = set()
    async with verification_notifies(database_url) as heard:
        async for other in start_harness(database_url, jwks_server.url, tokens):
            bot = await other.bot_key()
            ids: list[set[str]] = []
            for user_id in (1, 2, 3):  # three batches, each acknowledged within the window
                await post_events(other.client, bot, [event(user_id=user_id)])
                ids.append(set(map(str, await logged_ids(other, user_id))))
            assert heard == []  # committed and acknowledged, not yet announced
            await eventually(lambda: heard, timeout=10)
            assert heard == [ids[0] | ids[1] | ids[2]]  # one NOTIFY
            await post_events(other.client, bot, [event(user_id=4)])
            last = set(map(str, await logged_ids(other, 4)))
        # The replica has stopped (well within the window): it sent what it had queued.
        await eventually(lambda: len(heard) == 2)
        assert heard[1] == last != set()


async def test_a_process_without_an_announcer_notifies_in_the_commit(
    harness: Harness, database_url: str
):
    """A CLI command that ingests (seed-demo) runs no announcer: its events still reach the
    replicas' feeds, through a NOTIFY in the ingesting transaction as before."""
    if not database_url.startswith("postgresql"):
        pytest.skip("cross-replica delivery rides on PostgreSQL NOTIFY")
    database = Database(make_settings(database_url, ""))
    try:
        async with verification_notifies(database_url) as heard:
            async with database.sessionmaker() as session:
                body = VerificationBatch.model_validate_json(
                    json.dumps({"events": [event(user_id=5)]})
                )
                assert await ingest_events(session, body.events) == 1
                await session.commit()
            await eventually(lambda: heard)
            assert heard == [set(map(str, await logged_ids(harness, 5)))]
    finally:
        await database.dispose()


async def logged_ids(harness: Harness, user_id: int) -> list[int]:
    async with harness.sessionmaker() as session:
        return list(
            await session.scalars(
                select(col(Verification.id)).where(Verification.user_id == user_id)
            )
        )


async def test_a_full_queue_drops_and_counts(harness: Harness, monkeypatch):
    monkeypatch.setattr(feed_module, "QUEUE_SIZE", 3)
    feed: Feed = harness.services.feed
    slow, fast = feed.subscribe("a", sees_audit=True), feed.subscribe("b", sees_audit=True)
    received = []
    for batch in (range(2), range(2, 5)):
        for i in batch:
            feed.publish("verification", json.dumps({"n": i}))
        while not fast.queue.empty():
            received.append(json.loads(fast.queue.get_nowait()[1])["n"])
    # The fast reader lost nothing; the slow one kept the oldest 3 and lost 2, counted.
    assert received == [0, 1, 2, 3, 4]
    assert (fast.dropped, slow.dropped, dropped(harness)) == (0, 2, 2)
    assert [json.loads(slow.queue.get_nowait()[1])["n"] for _ in range(3)] == [0, 1, 2]
    feed.unsubscribe(slow)
    feed.unsubscribe(fast)
    assert feed.subscribers == set()


async def test_a_slow_subscriber_is_told_what_it_lost(harness: Harness, owner, monkeypatch):
    monkeypatch.setattr(feed_module, "QUEUE_SIZE", 2)
    feed: Feed = harness.services.feed
    async with served(harness) as http, subscribe(http, owner) as stream:
        for i in range(5):  # at once: the stream cannot drain between these
            feed.publish("verification", json.dumps({"n": i}))
        assert dropped(harness) == 3
        assert await stream.message() == {"event": "dropped", "data": {"count": 3}}
        assert await stream.message() == {"event": "verification", "data": {"n": 0}}
        assert await stream.message() == {"event": "verification", "data": {"n": 1}}
        feed.publish("audit", json.dumps({"n": 5}))
        assert await stream.message() == {"event": "audit", "data": {"n": 5}}  # no new drops


async def test_disconnect_removes_the_subscriber(harness: Harness, viewer):
    feed: Feed = harness.services.feed
    async with served(harness) as http:
        async with subscribe(http, viewer), subscribe(http, viewer):
            assert len(feed.subscribers) == 2
        await eventually(lambda: not feed.subscribers)
        feed.publish("verification", "{}")  # nobody left to queue it for
        assert dropped(harness) == 0


# ---------------------------------------------------------------- what each staff member may see


async def test_audit_entries_reach_owners_only(harness: Harness, bot, editor, viewer, owner):
    """GET /audit is owner-only: so are the feed's audit entries (staff e-mails are in them)."""
    await listening(harness)
    async with (
        served(harness) as http,
        subscribe(http, viewer) as seen_by_viewer,
        subscribe(http, editor) as seen_by_editor,
        subscribe(http, owner) as seen_by_owner,
    ):
        await create_group(harness.client, editor, GROUP, title="Alpha")
        marker = event()
        await post_events(harness.client, bot, [marker])
        assert (await seen_by_owner.next("audit"))["action"] == "group.create"
        for stream in (seen_by_viewer, seen_by_editor, seen_by_owner):
            got = await stream.message()
            while got.get("event") == "audit" and stream is seen_by_owner:
                got = await stream.message()
            assert got == {"event": "verification", "data": got["data"]}  # no audit before it
            assert got["data"]["event_id"] == marker["event_id"]


async def test_streams_per_user_are_capped(harness: Harness, viewer, monkeypatch):
    monkeypatch.setattr(feed_module, "MAX_PER_USER", 2)
    async with served(harness) as http, subscribe(http, viewer), subscribe(http, viewer):
        response = await harness.client.get(EVENTS, headers=viewer)
        assert "at most 2 live-feed streams per user" in problem(response, 429)["detail"]
        other = await harness.add_staff("viewer")
        async with subscribe(http, other):
            pass


async def test_a_stream_ends_when_its_token_expires(harness: Harness):
    staff = str(uuid.uuid4())
    await harness.add_staff("viewer", staff)
    soon = int(datetime.now(UTC).timestamp()) + 2
    async with served(harness) as http, subscribe(http, harness.auth(staff, exp=soon)) as stream:
        with anyio.fail_after(10):
            assert await stream.rest() == []  # the server ends it: nothing more, no error


async def test_a_stream_ends_soon_after_its_staff_member_is_removed_or_demoted(
    harness: Harness, owner, monkeypatch
):
    monkeypatch.setattr(feed_module, "RECHECK_SECONDS", 0.2)
    removed, demoted = str(uuid.uuid4()), str(uuid.uuid4())
    await harness.add_staff("viewer", removed)
    await harness.add_staff("owner", demoted)
    async with (
        served(harness) as http,
        subscribe(http, harness.auth(removed)) as first,
        subscribe(http, harness.auth(demoted)) as second,
    ):
        gone = await harness.client.delete(f"/api/v1/staff/{removed}", headers=owner)
        assert gone.status_code == 204, gone.text
        changed = await harness.client.put(
            f"/api/v1/staff/{demoted}", json={"role": "viewer"}, headers=owner
        )
        assert changed.status_code == 200, changed.text
        with anyio.fail_after(10):
            await first.rest(ignore="audit")
            await second.rest(ignore="audit")
