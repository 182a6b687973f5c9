"""client.py against a real channelgate app (SQLite and PostgreSQL) through a network the tests
can break: caching and revalidation, batching, the durable spool, retries, and its models
checked against the OpenAPI document."""

import asyncio
import dataclasses
import subprocess
import sys
import time
import types
import typing
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select
from sqlmodel import col

import client as gate
from models import Verification
from tests.conftest import Harness
from tests.factories import CHANNEL_ID, GROUP_ID, create_channel, create_group, link
from tests.network import Network

pytestmark = pytest.mark.anyio


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def make_client(network: Network, key: str, spool: Path, **options: Any) -> gate.Client:
    options.setdefault("heartbeat_interval", 3600)
    return gate.Client("http://test", key, spool_path=str(spool), transport=network, **options)


@pytest.fixture
async def bot_client(network: Network, key: str, tmp_path: Path) -> AsyncIterator[gate.Client]:
    async with make_client(network, key, tmp_path / "spool.sqlite3") as c:
        yield c


async def stored(harness: Harness, *where: Any) -> int:
    async with harness.sessionmaker() as session:
        query = select(func.count()).select_from(Verification).where(*where)
        return await session.scalar(query) or 0


async def protected_group(harness: Harness, owner: dict[str, str]) -> None:
    await create_group(harness.client, owner)
    await create_channel(harness.client, owner)
    await link(harness.client, owner, GROUP_ID, CHANNEL_ID)


# ---------------------------------------------------------------- the contract


def openapi_schema(harness: Harness, name: str) -> dict[str, Any]:
    return harness.app.openapi()["components"]["schemas"][name]


@pytest.mark.parametrize(
    ("model", "schema"),
    [
        (gate.Policy, "Policy"),
        (gate.ChannelRef, "ChannelRef"),
        (gate.MemberState, "MemberState"),
        (gate.Channel, "ChannelPublic"),
        (gate.GroupRef, "GroupRef"),
        (gate.GroupStats, "GroupStats"),
        (gate.IngestResult, "IngestResult"),
    ],
)
async def test_models_match_the_openapi_document(harness: Harness, model: type, schema: str):
    """Every field the server always sends is a field of the client's model, and nullable
    exactly where the document says so."""
    document = openapi_schema(harness, schema)
    assert {f.name for f in dataclasses.fields(model)} == set(document["properties"])
    assert set(document["required"]) == set(document["properties"])
    hints = typing.get_type_hints(model)
    for name, prop in document["properties"].items():
        nullable = any(option.get("type") == "null" for option in prop.get("anyOf", []))
        args = typing.get_args(hints[name])
        optional = isinstance(hints[name], types.UnionType) and type(None) in args
        assert nullable == optional, (schema, name)
        if "enum" in prop:
            assert set(typing.get_args(hints[name])) == set(prop["enum"]), (schema, name)


def test_importable_without_the_server():
    """client.py needs httpx only: it imports with nothing of the service on the path."""
    code = (
        "import sys; sys.modules.update({m: None for m in "
        "('fastapi', 'sqlmodel', 'sqlalchemy', 'pydantic', 'starlette', 'models', 'settings')});"
        "import client; print(client.Client.__name__)"
    )
    out = subprocess.run(  # noqa: S603
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=Path.cwd()
    )
    assert out.stdout.strip() == "Client"


# ---------------------------------------------------------------- policy


async def test_policy_is_cached_then_revalidated(
    harness: Harness, owner, network: Network, key: str, tmp_path: Path
):
    await protected_group(harness, owner)
    clock = Clock()
    async with make_client(network, key, tmp_path / "s", clock=clock, policy_ttl=2.0) as c:
        path = f"GET /api/v1/bot/groups/{GROUP_ID}/policy"
        first = await c.policy(GROUP_ID)
        assert first is not None and [ch.chat_id for ch in first.channels] == [CHANNEL_ID]
        for _ in range(50):
            assert await c.policy(GROUP_ID) is first
        assert network.calls[path] == 1

        clock.now += 2.5  # past the freshness window: revalidated, 304 keeps the body
        assert await c.policy(GROUP_ID) is first
        assert network.calls[path] == 2 and c.stats.policy_calls == 2

        patched = await harness.client.patch(
            f"/api/v1/groups/{GROUP_ID}", json={"action": "kick"}, headers=owner
        )
        assert patched.status_code == 200
        assert (await c.policy(GROUP_ID)) is first  # still fresh locally
        clock.now += 2.5
        changed = await c.policy(GROUP_ID)
        assert changed is not None and changed.action == "kick"
        assert changed.version > first.version


async def test_concurrent_misses_make_one_request(harness: Harness, owner, network, bot_client):
    await protected_group(harness, owner)
    results = await asyncio.gather(*(bot_client.policy(GROUP_ID) for _ in range(20)))
    assert len({id(r) for r in results}) == 1
    assert network.calls[f"GET /api/v1/bot/groups/{GROUP_ID}/policy"] == 1


async def test_unknown_group_is_none_and_cached(harness: Harness, network, bot_client):
    assert await bot_client.policy(GROUP_ID) is None
    assert await bot_client.policy(GROUP_ID) is None
    assert network.calls[f"GET /api/v1/bot/groups/{GROUP_ID}/policy"] == 1


async def test_outage_serves_the_cached_policy(
    harness: Harness, owner, network: Network, key: str, tmp_path: Path
):
    await protected_group(harness, owner)
    clock = Clock()
    async with make_client(network, key, tmp_path / "s", clock=clock) as c:
        known = await c.policy(GROUP_ID)
        network.down = True
        clock.now += 10
        assert await c.policy(GROUP_ID) is known
        assert c.stats.stale_policies == 1
        with pytest.raises(gate.Unavailable):
            await c.policy(-1009999999999)  # nothing cached: nothing to fall back on
        network.down = False


# ---------------------------------------------------------------- members


async def test_member_state_from_memory_while_fresh(
    harness: Harness, owner, network: Network, bot_client: gate.Client
):
    await protected_group(harness, owner)
    await bot_client.policy(GROUP_ID)
    unknown = await bot_client.member(GROUP_ID, 42)
    assert unknown.status == "unknown" and not unknown.fresh()

    bot_client.record(GROUP_ID, 42, "passed", "message")
    for _ in range(10):
        state = await bot_client.member(GROUP_ID, 42)
        assert state.status == "verified" and state.fresh()
    assert network.calls[f"GET /api/v1/bot/groups/{GROUP_ID}/members/42"] == 1
    assert bot_client.stats.member_hits == 10

    # Another replica of the bot learns it from channelgate once the event is delivered.
    assert await bot_client.flush(5)
    other = gate.Client(
        "http://test",
        bot_client.http.headers["Authorization"][7:],
        spool_path=":memory:",
        transport=network,
        heartbeat_interval=3600,
    )
    async with other:
        remote = await other.member(GROUP_ID, 42)
        assert remote.status == "verified" and remote.fresh()
        assert remote.fresh_until is not None and remote.verified_at is not None
        assert (remote.fresh_until - remote.verified_at).total_seconds() == 600

    bot_client.record(GROUP_ID, 42, "blocked", "recheck", missing_channel_ids=[CHANNEL_ID])
    await bot_client.member(GROUP_ID, 42)  # no longer fresh: asked again
    assert network.calls[f"GET /api/v1/bot/groups/{GROUP_ID}/members/42"] == 3  # 1 other's


async def test_a_cached_pass_does_not_refresh_the_state(
    harness: Harness, owner, bot_client: gate.Client
):
    """Only a check against Telegram makes a member fresher: else a busy member's cached
    passes would keep `fresh_until` moving and Telegram would never be asked again."""
    await protected_group(harness, owner)
    bot_client.record(GROUP_ID, 42, "passed", "message")
    assert await bot_client.flush(5)
    first = await harness.client.get(
        f"/api/v1/bot/groups/{GROUP_ID}/members/42",
        headers={"Authorization": bot_client.http.headers["Authorization"]},
    )
    await asyncio.sleep(0.01)
    bot_client.record(GROUP_ID, 42, "passed", "message", cached=True)
    assert await bot_client.flush(5)
    second = await harness.client.get(
        f"/api/v1/bot/groups/{GROUP_ID}/members/42",
        headers={"Authorization": bot_client.http.headers["Authorization"]},
    )
    assert first.json()["fresh_until"] == second.json()["fresh_until"]
    assert await stored(harness) == 2


# ---------------------------------------------------------------- events


async def test_record_returns_at_once_and_batches(harness: Harness, network, bot_client):
    started = time.perf_counter()
    ids = [bot_client.record(GROUP_ID, 1 + i, "passed", "message") for i in range(2500)]
    assert time.perf_counter() - started < 1.0  # never waits on the network
    assert len(set(ids)) == 2500 and all(isinstance(i, uuid.UUID) for i in ids)
    assert await bot_client.flush(10)
    assert await stored(harness) == 2500
    assert network.calls["POST /api/v1/bot/verifications"] == 3  # 1000 + 1000 + 500
    assert bot_client.stats.delivered == 2500 and bot_client.stats.spooled == 0


async def test_outage_spools_then_delivers_exactly_once(
    harness: Harness, network: Network, key: str, tmp_path: Path
):
    spool = tmp_path / "spool.sqlite3"
    network.down = True
    c = make_client(network, key, spool, batch_interval=0.05)
    await c.start()
    for i in range(1500):
        c.record(GROUP_ID, 1 + i, "blocked", "message", missing_channel_ids=[CHANNEL_ID])
    assert not await c.flush(0.5)
    await c.close(within=0.1)
    assert c.stats.spooled == 1500 and c.stats.retries >= 1
    assert await stored(harness) == 0

    # A restart with a non-empty spool; the first answer is lost after the server stored it.
    network.down = False
    network.lose_answers = 1
    restarted = make_client(network, key, spool, batch_interval=0.05)
    async with restarted:
        assert restarted.stats.spooled == 1500
        assert await restarted.flush(10)
    assert await stored(harness) == 1500  # exactly once
    assert restarted.stats.duplicates == 1000  # the batch whose answer was lost, sent again
    assert restarted.stats.delivered == 1500 and restarted.stats.retries == 1


async def test_retry_after_is_honoured(
    harness: Harness, network: Network, key: str, tmp_path: Path
):
    network.status, network.retry_after = 429, "1"
    network.clock = time.monotonic
    async with make_client(network, key, tmp_path / "s", batch_interval=0.05) as c:
        c.record(GROUP_ID, 42, "passed", "message")
        await asyncio.sleep(0.3)
        network.status = None
        assert await c.flush(10)
    assert len(network.sent_at) == 2
    assert network.sent_at[1] - network.sent_at[0] >= 1.0
    assert await stored(harness) == 1


async def test_spool_bound_drops_the_oldest(
    harness: Harness, network: Network, key: str, tmp_path: Path
):
    network.down = True
    c = make_client(network, key, tmp_path / "s", spool_limit=100, batch_interval=0.05)
    await c.start()
    ids = [c.record(GROUP_ID, 1 + i, "passed", "message") for i in range(250)]
    await c.close(within=0.2)
    assert c.stats.dropped == 150 and c.stats.spooled == 100
    network.down = False
    async with make_client(network, key, tmp_path / "s") as again:
        assert await again.flush(5)
    async with harness.sessionmaker() as session:
        kept = set(await session.scalars(select(col(Verification.event_id))))
    assert kept == set(ids[150:])


async def test_an_invalid_event_is_dropped_not_the_batch(harness: Harness, bot_client):
    bot_client.record(GROUP_ID, 41, "passed", "message")
    bot_client.record(GROUP_ID, 777000, "passed", "message")  # a Telegram service account
    bot_client.record(GROUP_ID, 43, "passed", "message")
    assert await bot_client.flush(5)
    assert bot_client.stats.rejected == 1 and bot_client.stats.delivered == 2
    assert await stored(harness) == 2


async def test_heartbeat_reports_the_client_stats(harness: Harness, owner, bot_client):
    bot_client.record(GROUP_ID, 42, "passed", "message")
    assert await bot_client.flush(5)
    await bot_client.heartbeat()
    bots = (await harness.client.get("/api/v1/bots", headers=owner)).json()["items"]
    assert [b["instance_id"] for b in bots] == [bot_client.options.instance_id]
    assert bots[0]["stats"]["delivered"] == 1 and bots[0]["stats"]["dropped"] == 0


# ---------------------------------------------------------------- the rest of the bot API


async def test_registration_links_and_migration(harness: Harness, bot_client: gate.Client):
    policy = await bot_client.register_group(-4001, "Old group", member_count=12)
    assert policy.chat_id == -4001 and policy.active and policy.channels == []
    channel = await bot_client.register_channel(
        CHANNEL_ID, "News", username="News", invite_link="https://t.me/+abc", subscriber_count=9
    )
    assert channel.username == "news" and channel.subscriber_count == 9
    linked = await bot_client.link(-4001, CHANNEL_ID)
    assert [c.chat_id for c in linked.channels] == [CHANNEL_ID]
    assert await bot_client.policy(-4001) == linked  # kept from the answer: no extra call
    assert await bot_client.channel_groups(CHANNEL_ID) == [-4001]

    moved = await bot_client.migrate(-4001, GROUP_ID)
    assert moved.chat_id == GROUP_ID and [c.chat_id for c in moved.channels] == [CHANNEL_ID]
    assert await bot_client.channel_groups(CHANNEL_ID) == [GROUP_ID]
    assert await bot_client.policy(-4001) is None

    stats = await bot_client.group_stats(GROUP_ID)
    assert stats.checks_24h == 0 and stats.pass_rate_24h is None

    await bot_client.unlink(GROUP_ID, CHANNEL_ID)
    after = await bot_client.policy(GROUP_ID)
    assert after is not None and after.channels == []


async def test_errors_carry_the_problem(harness: Harness, bot_client: gate.Client):
    with pytest.raises(gate.ChannelgateError) as raised:
        await bot_client.link(GROUP_ID, CHANNEL_ID)
    assert raised.value.status == 404
    assert raised.value.problem["status"] == 404 and raised.value.problem["request_id"]
    with pytest.raises(gate.ChannelgateError) as raised:
        await bot_client.register_group(GROUP_ID, "   ")
    assert raised.value.status == 422 and raised.value.problem["errors"]


async def test_a_revoked_key_keeps_events_spooled(
    harness: Harness, owner, network: Network, tmp_path: Path
):
    created = await harness.client.post("/api/v1/bot-keys", json={"name": "b"}, headers=owner)
    key, key_id = created.json()["key"], created.json()["id"]
    await harness.client.delete(f"/api/v1/bot-keys/{key_id}", headers=owner)
    c = make_client(network, key, tmp_path / "s", batch_interval=0.05)
    await c.start()
    c.record(GROUP_ID, 42, "passed", "message")
    assert not await c.flush(0.5)
    await c.close(within=0.1)
    assert c.stats.spooled == 1 and c.stats.dropped == 0
