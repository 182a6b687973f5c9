"""Bot API: the policy hot path and its cache, registration, migration, ingestion, members."""

import asyncio
from collections import Counter
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import httpx
import pytest
from sqlalchemy import func, select
from sqlmodel import col

from models import Member, Verification, rollups, user_sketches
from tests.conftest import Harness, JWKSServer, Tokens, audit_log, problem, start_harness
from tests.factories import (
    CHANNEL_ID,
    GROUP_ID,
    create_group,
    event,
    eventually,
    ingest,
    listening,
    post_events,
    register_channel,
    register_group,
    z,
)

pytestmark = pytest.mark.anyio

GROUP = GROUP_ID
GROUP2 = -1002222222222
CHANNEL = CHANNEL_ID
CHANNEL2 = -1004444444444
ANALYTICS = "/api/v1/analytics/summary"


def now() -> datetime:
    return datetime.now(UTC)


async def policy(client: httpx.AsyncClient, bot: dict, chat_id: int = GROUP) -> httpx.Response:
    return await client.get(f"/api/v1/bot/groups/{chat_id}/policy", headers=bot)


async def count(harness: Harness, model: Any, *where: Any) -> int:
    async with harness.sessionmaker() as session:
        return await session.scalar(select(func.count()).select_from(model).where(*where)) or 0


# ---------------------------------------------------------------- policy and its cache


async def test_register_group_then_policy(client: httpx.AsyncClient, bot):
    problem(await policy(client, bot), 404)
    created = await register_group(client, bot)
    assert created.status_code == 201
    body = created.json()
    assert body["chat_id"] == GROUP and body["active"] is True and body["channels"] == []
    assert body["mode"] == "all" and body["recheck_seconds"] == 600 and body["version"] == 1
    again = await register_group(client, bot, status=200)
    assert again.status_code == 200 and again.json() == body
    read = await policy(client, bot)
    assert read.status_code == 200 and read.json() == body
    assert read.headers["etag"] == created.headers["etag"]


async def test_if_none_match_gives_304_until_something_changes(client, bot, editor):
    await register_group(client, bot)
    tag = (await policy(client, bot)).headers["etag"]
    url = f"/api/v1/bot/groups/{GROUP}/policy"
    not_modified = await client.get(url, headers={**bot, "If-None-Match": tag})
    assert not_modified.status_code == 304 and not_modified.content == b""
    assert not_modified.headers["etag"] == tag
    await client.patch(f"/api/v1/groups/{GROUP}", json={"action": "kick"}, headers=editor)
    changed = await client.get(url, headers={**bot, "If-None-Match": tag})
    assert changed.status_code == 200 and changed.json()["action"] == "kick"
    assert changed.headers["etag"] != tag


async def test_policy_cache_is_invalidated_by_every_kind_of_change(client, bot, editor):
    await register_group(client, bot)
    await register_channel(client, bot)
    seen = [(await policy(client, bot)).json()]

    async def changed() -> dict:
        body = (await policy(client, bot)).json()
        assert body != seen[-1] and body["version"] > seen[-1]["version"]
        seen.append(body)
        return body

    # dashboard: settings
    await client.patch(f"/api/v1/groups/{GROUP}", json={"mode": "any"}, headers=editor)
    assert (await changed())["mode"] == "any"
    # dashboard: link
    await client.put(f"/api/v1/groups/{GROUP}/channels/{CHANNEL}", headers=editor)
    assert [c["chat_id"] for c in (await changed())["channels"]] == [CHANNEL]
    # dashboard: linked channel renamed
    await client.patch(f"/api/v1/channels/{CHANNEL}", json={"title": "Renamed"}, headers=editor)
    assert (await changed())["channels"][0]["title"] == "Renamed"
    # bot: linked channel metadata
    await client.put(
        f"/api/v1/bot/channels/{CHANNEL}",
        json={"title": "Renamed", "invite_link": "https://t.me/+abc"},
        headers=bot,
    )
    assert (await changed())["channels"][0]["invite_link"] == "https://t.me/+abc"
    # bot: link and unlink
    await register_channel(client, bot, CHANNEL2)
    await client.put(f"/api/v1/bot/groups/{GROUP}/channels/{CHANNEL2}", headers=bot)
    assert len((await changed())["channels"]) == 2
    await client.delete(f"/api/v1/bot/groups/{GROUP}/channels/{CHANNEL2}", headers=bot)
    assert len((await changed())["channels"]) == 1
    # dashboard: unlink, deactivate
    await client.delete(f"/api/v1/groups/{GROUP}/channels/{CHANNEL}", headers=editor)
    assert (await changed())["channels"] == []
    await client.patch(f"/api/v1/groups/{GROUP}", json={"is_active": False}, headers=editor)
    assert (await changed())["active"] is False
    # dashboard: force-deleting a linked channel
    await client.put(f"/api/v1/groups/{GROUP}/channels/{CHANNEL}", headers=editor)
    await changed()
    await client.delete(f"/api/v1/channels/{CHANNEL}?force=true", headers=editor)
    assert (await changed())["channels"] == []
    # dashboard: delete, then re-create (a cached 404 must not survive either)
    await client.delete(f"/api/v1/groups/{GROUP}", headers=editor)
    problem(await policy(client, bot), 404)
    await create_group(client, editor, GROUP)
    recreated = await policy(client, bot)
    assert recreated.status_code == 200
    assert recreated.headers["etag"] not in {None, ""}


async def test_unrelated_channel_change_keeps_policy_version(client, bot, editor):
    await register_group(client, bot)
    await register_channel(client, bot, CHANNEL2)
    before = await policy(client, bot)
    await client.patch(f"/api/v1/channels/{CHANNEL2}", json={"title": "Other"}, headers=editor)
    after = await policy(client, bot)
    assert after.headers["etag"] == before.headers["etag"]


async def test_member_count_refresh_is_not_a_new_version(client, bot):
    await register_group(client, bot)
    tag = (await policy(client, bot)).headers["etag"]
    response = await register_group(client, bot, status=200, member_count=1234)
    assert response.headers["etag"] == tag
    assert response.json()["version"] == 1


async def test_policy_change_reaches_another_replica(
    harness: Harness, database_url: str, jwks_server: JWKSServer, tokens: Tokens, bot, editor
):
    if not database_url.startswith("postgresql"):
        pytest.skip("cross-replica invalidation rides on PostgreSQL NOTIFY")
    client = harness.client
    await register_group(client, bot)
    async for other in start_harness(database_url, jwks_server.url, tokens):
        await listening(harness, other)  # both replicas LISTEN; now warm the other's cache
        assert (await policy(other.client, bot)).json()["mode"] == "all"
        await client.patch(f"/api/v1/groups/{GROUP}", json={"mode": "any"}, headers=editor)

        async def other_sees_any(other: Harness = other) -> bool:
            return (await policy(other.client, bot)).json()["mode"] == "any"

        await eventually(other_sees_any)


async def test_bot_registration_validates_ids(client, bot):
    body = problem(await client.put("/api/v1/bot/groups/5", json={"title": "G"}, headers=bot), 422)
    assert "group chat id" in body["detail"]
    body = problem(
        await client.put("/api/v1/bot/channels/-5", json={"title": "C"}, headers=bot), 422
    )
    assert "channel chat id" in body["detail"]
    problem(
        await client.put(f"/api/v1/bot/groups/{GROUP}", json={"title": "G", "x": 1}, headers=bot),
        422,
    )


async def test_bot_writes_are_audited_as_the_key(client, bot, owner):
    await register_group(client, bot)
    await register_channel(client, bot)
    await client.put(f"/api/v1/bot/groups/{GROUP}/channels/{CHANNEL}", headers=bot)
    entries = (await client.get("/api/v1/audit", headers=owner)).json()["items"]
    actions = [e["action"] for e in entries]
    assert actions[:3] == ["group.link_channel", "channel.register", "group.register"]
    for entry in entries[:3]:
        assert entry["actor"]["kind"] == "bot" and entry["actor"]["name"] == "bot"
        assert entry["actor"]["id"].startswith("key:")


async def test_concurrent_registrations_are_201_then_200(harness, replica, bot, owner):
    """Two replicas registering one new group or channel at once (each with its own title):
    one creates it, the other then finds it and applies its change, as an upsert does."""
    for each in (harness, replica):  # the key checked and a connection open on both
        problem(await policy(each.client, bot, -1009999999999), 404)
    for n in range(5):
        for path in (f"groups/{GROUP - n}", f"channels/{CHANNEL - n}"):
            pair = await asyncio.gather(
                *(
                    each.client.put(f"/api/v1/bot/{path}", json={"title": name}, headers=bot)
                    for each, name in ((harness, "A"), (replica, "B"))
                )
            )
            pair.sort(key=lambda r: r.status_code)
            assert [r.status_code for r in pair] == [200, 201], [r.text for r in pair]
            assert [r.json()["version"] for r in pair] == [2, 1]  # the title changed
            if path.startswith("channels"):  # a channel answers itself, a group its policy
                assert {r.json()["title"] for r in pair} == {"A", "B"}
    actions = Counter(e["action"] for e in await audit_log(harness.client, owner))
    assert actions == {
        "group.register": 5, "group.update": 5, "channel.register": 5, "channel.update": 5,
        "bot_key.create": 1,
    }  # fmt: skip


async def test_bot_writes_answer_through_the_requests_session(client, bot):
    """Each answers its policy (or channel) from inside its own transaction. On SQLite the
    pool holds one connection: a route that opened a second session there while its own
    held it would wait 30 s for the pool, then answer 503."""
    link = f"/api/v1/bot/groups/{GROUP}/channels/{CHANNEL}"
    async with asyncio.timeout(10):
        await register_group(client, bot)
        await register_group(client, bot, status=200)
        await register_channel(client, bot)
        await register_channel(client, bot, status=200)
        for status in (201, 200):  # linked, then linked already
            response = await client.put(link, headers=bot)
            assert response.status_code == status, response.text
            assert [c["chat_id"] for c in response.json()["channels"]] == [CHANNEL]
        migrate = f"/api/v1/bot/groups/{GROUP}/migrate"
        response = await client.post(migrate, json={"new_chat_id": GROUP2}, headers=bot)
        assert response.status_code == 200, response.text
        assert response.json()["chat_id"] == GROUP2


async def test_supabase_token_is_refused_on_bot_routes(client, editor):
    body = problem(await policy(client, editor), 401)
    assert body["detail"] == "bot routes need a bot key (cgk_…)"


# ---------------------------------------------------------------- migrate and channel groups


async def test_migrate_moves_settings_links_members_and_history(harness, client, bot, editor):
    await register_group(client, bot)
    await register_channel(client, bot)
    await client.put(f"/api/v1/bot/groups/{GROUP}/channels/{CHANNEL}", headers=bot)
    await client.patch(f"/api/v1/groups/{GROUP}", json={"action": "warn"}, headers=editor)
    await post_events(client, bot, [event(user_id=1), event(user_id=2, result="blocked")])
    # the bot already reported an event under the new id before migrating
    await post_events(client, bot, [event(chat_id=GROUP2, user_id=1, result="blocked")])

    migrated = await client.post(
        f"/api/v1/bot/groups/{GROUP}/migrate", json={"new_chat_id": GROUP2}, headers=bot
    )
    assert migrated.status_code == 200, migrated.text
    body = migrated.json()
    assert body["chat_id"] == GROUP2 and body["action"] == "warn"
    assert [c["chat_id"] for c in body["channels"]] == [CHANNEL]
    problem(await policy(client, bot), 404)
    assert (await policy(client, bot, GROUP2)).json() == body
    assert await count(harness, Verification, Verification.chat_id == GROUP2) == 3
    assert await count(harness, Verification, Verification.chat_id == GROUP) == 0
    members = (await client.get(f"/api/v1/groups/{GROUP2}/members", headers=editor)).json()
    by_user = {m["user_id"]: m for m in members["items"]}
    assert by_user[1]["checks"] == 2 and by_user[1]["status"] == "restricted"
    assert by_user[2]["status"] == "restricted"
    assert await count(harness, Member, Member.chat_id == GROUP) == 0


async def test_events_for_the_old_id_follow_a_migration_however_they_race_it(
    harness, client, bot, viewer
):
    """Batches for the old id sent while the migration runs (each on its own connection on
    PostgreSQL) and after it (batched before it, or from a replica that has not heard):
    every event is stored under the new id, in the log, the member states and the
    analytics. Nothing stays behind under the old one."""
    for n in range(3):
        old, new = GROUP - n, GROUP2 - n
        await register_group(client, bot, old)
        batches = [[event(old, user_id=u, result="blocked") for u in range(1, 30)]]
        batches += [[event(old, user_id=u) for u in range(b, b + 30)] for b in range(1, 300, 30)]
        await post_events(client, bot, batches[0])
        migrate = client.post(
            f"/api/v1/bot/groups/{old}/migrate", json={"new_chat_id": new}, headers=bot
        )
        calls = [ingest(client, bot, batch) for batch in batches[1:]]
        responses = await asyncio.gather(*calls[:5], migrate, *calls[5:])
        assert all(r.status_code == 200 for r in responses), [r.text for r in responses]
        late = await post_events(client, bot, [event(old, user_id=1)])
        assert late == {"accepted": 1, "duplicates": 0}
        total = sum(map(len, batches)) + 1
        assert await count(harness, Verification, Verification.chat_id == new) == total
        for table, column in (
            (Verification, Verification.chat_id),
            (Member, Member.chat_id),
            (rollups, rollups.c.chat_id),
            (user_sketches, user_sketches.c.chat_id),
        ):
            assert await count(harness, table, column == old) == 0, table
        summary = (await client.get(ANALYTICS, params={"group": new}, headers=viewer)).json()
        assert summary["checks"] == total and abs(summary["unique_users"] - 300) <= 2
        assert (summary["verified_members"], summary["restricted_members"]) == (300, 0)


async def test_migrate_conflicts_and_unknowns(client, bot):
    await register_group(client, bot)
    await register_group(client, bot, GROUP2)
    url = f"/api/v1/bot/groups/{GROUP}/migrate"
    body = problem(await client.post(url, json={"new_chat_id": GROUP2}, headers=bot), 409)
    assert body["detail"] == f"group {GROUP2} already exists"
    problem(await client.post(url, json={"new_chat_id": GROUP}, headers=bot), 422)
    problem(await client.post(url, json={"new_chat_id": 12}, headers=bot), 422)
    unknown = "/api/v1/bot/groups/-1009999999999/migrate"
    problem(await client.post(unknown, json={"new_chat_id": -1009999999998}, headers=bot), 404)


async def test_channel_groups_lists_active_requiring_groups(client, bot, editor):
    await register_channel(client, bot)
    for chat_id in (GROUP, GROUP2):
        await register_group(client, bot, chat_id)
        await client.put(f"/api/v1/bot/groups/{chat_id}/channels/{CHANNEL}", headers=bot)
    await client.patch(f"/api/v1/groups/{GROUP2}", json={"is_active": False}, headers=editor)
    response = await client.get(f"/api/v1/bot/channels/{CHANNEL}/groups", headers=bot)
    assert response.json() == {"items": [{"chat_id": GROUP}]}
    problem(await client.get(f"/api/v1/bot/channels/{CHANNEL2}/groups", headers=bot), 404)


# ---------------------------------------------------------------- ingestion


async def test_ingest_is_idempotent_within_and_across_batches(harness, client, bot):
    first = [event(user_id=u) for u in range(1, 6)]
    duplicate_inside = [*first, first[0], first[1]]
    assert await post_events(client, bot, duplicate_inside) == {"accepted": 5, "duplicates": 2}
    retried = await post_events(client, bot, [*first, event(user_id=9)])
    assert retried == {"accepted": 1, "duplicates": 5}
    assert await count(harness, Verification) == 6
    async with harness.sessionmaker() as session:
        rows = await session.execute(select(col(Member.user_id), col(Member.checks)))
        checks = {user_id: n for user_id, n in rows}
    assert checks == {1: 1, 2: 1, 3: 1, 4: 1, 5: 1, 9: 1}


async def test_older_events_never_overwrite_newer_state(client, bot, viewer):
    await register_group(client, bot)
    t = now() - timedelta(hours=1)
    await post_events(client, bot, [event(result="blocked", at=t + timedelta(minutes=10))])
    await post_events(client, bot, [event(result="passed", at=t)])  # older, arrives late
    state = (await client.get(f"/api/v1/bot/groups/{GROUP}/members/42", headers=bot)).json()
    assert state["status"] == "restricted" and state["fresh_until"] is None
    await post_events(client, bot, [event(result="passed", at=t + timedelta(minutes=20))])
    state = (await client.get(f"/api/v1/bot/groups/{GROUP}/members/42", headers=bot)).json()
    assert state["status"] == "verified"
    verified_at = datetime.fromisoformat(state["verified_at"])
    assert verified_at == t + timedelta(minutes=20)
    assert datetime.fromisoformat(state["fresh_until"]) == verified_at + timedelta(seconds=600)
    assert datetime.fromisoformat(state["restricted_at"]) == t + timedelta(minutes=10)
    # in one batch, out of order
    await post_events(
        client,
        bot,
        [
            event(user_id=7, result="passed", at=t + timedelta(minutes=5)),
            event(user_id=7, result="blocked", at=t + timedelta(minutes=6)),
            event(user_id=7, result="passed", at=t + timedelta(minutes=1)),
            event(user_id=7, result="error", at=t + timedelta(minutes=9)),
        ],
    )
    members = (await client.get(f"/api/v1/groups/{GROUP}/members", headers=viewer)).json()
    seven = next(m for m in members["items"] if m["user_id"] == 7)
    assert seven["status"] == "restricted" and seven["checks"] == 4


async def test_unknown_member_state(client, bot):
    state = await client.get(f"/api/v1/bot/groups/{GROUP}/members/42", headers=bot)
    assert state.json() == {
        "status": "unknown",
        "verified_at": None,
        "restricted_at": None,
        "fresh_until": None,
    }


async def test_fresh_until_follows_the_groups_recheck_seconds(client, bot, editor):
    await register_group(client, bot)
    await client.patch(f"/api/v1/groups/{GROUP}", json={"recheck_seconds": 3600}, headers=editor)
    at = now() - timedelta(minutes=1)
    await post_events(client, bot, [event(at=at)])
    state = (await client.get(f"/api/v1/bot/groups/{GROUP}/members/42", headers=bot)).json()
    assert datetime.fromisoformat(state["fresh_until"]) == at + timedelta(hours=1)


async def test_occurred_at_is_read_as_an_instant_whatever_its_offset(client, bot, viewer):
    at = now().replace(microsecond=0) - timedelta(minutes=5)
    india = timezone(timedelta(hours=5, minutes=30))
    forms = [z(at), at.isoformat(), at.astimezone(india).isoformat()]
    assert forms[1].endswith("+00:00") and forms[2].endswith("+05:30")
    sent = [event(user_id=i + 1, occurred_at=form) for i, form in enumerate(forms)]
    assert await post_events(client, bot, sent) == {"accepted": 3, "duplicates": 0}
    log = (await client.get("/api/v1/verifications", headers=viewer)).json()["items"]
    assert sorted((v["user_id"], v["occurred_at"]) for v in log) == [
        (1, z(at)),
        (2, z(at)),
        (3, z(at)),
    ]


@pytest.mark.parametrize(
    ("bad", "loc_tail"),
    [
        ({"user_id": 777000}, "user_id"),
        ({"user_id": 0}, "user_id"),
        ({"chat_id": 5}, "chat_id"),
        ({"result": "maybe"}, "result"),
        ({"trigger": "cron"}, "trigger"),
        ({"latency_ms": 600_001}, "latency_ms"),
        ({"error": "x" * 201}, "error"),
        ({"event_id": "not-a-uuid"}, "event_id"),
        ({"occurred_at": "2026-01-01T00:00:00"}, "occurred_at"),
        ({"missing_channel_ids": [-5]}, "missing_channel_ids"),
        ({"surprise": 1}, "surprise"),
    ],
)
async def test_one_bad_event_rejects_the_whole_batch(harness, client, bot, bad, loc_tail):
    events = [event(user_id=1), event(user_id=2), {**event(user_id=3), **bad}, event(user_id=4)]
    body = problem(await ingest(client, bot, events), 422)
    locs = [e["loc"] for e in body["errors"]]
    assert any(loc[:3] == ["body", "events", 2] and loc_tail in map(str, loc) for loc in locs)
    assert await count(harness, Verification) == 0
    assert await count(harness, Member) == 0


async def test_future_events_are_rejected(harness, client, bot):
    soon = now() + timedelta(minutes=4)
    later = now() + timedelta(minutes=6)
    assert (await ingest(client, bot, [event(at=soon)])).status_code == 200
    body = problem(await ingest(client, bot, [event(at=soon), event(at=later)]), 422)
    assert body["errors"][0]["loc"][:3] == ["body", "events", 1]
    assert "future" in body["detail"]
    assert await count(harness, Verification) == 1


async def test_batch_size_limits(client, bot):
    problem(await ingest(client, bot, []), 422)
    body = problem(await ingest(client, bot, [event(user_id=1)] * 1001), 422)
    assert body["errors"][0]["loc"] == ["body", "events"]


async def test_events_for_unregistered_groups_are_kept(harness, client, bot):
    response = await post_events(client, bot, [event(chat_id=-1005555555555)])
    assert response == {"accepted": 1, "duplicates": 0}
    assert await count(harness, Verification, Verification.chat_id == -1005555555555) == 1


async def test_concurrent_batches_lose_and_double_nothing(harness, client, bot):
    pool = [event(user_id=u % 40 + 1) for u in range(400)]
    # eight clients, overlapping slices: every event is sent by two of them
    slices = [pool[i * 50 : i * 50 + 100] for i in range(8)]
    slices[-1] = pool[350:] + pool[:50]
    responses = await asyncio.gather(*(ingest(client, bot, s) for s in slices))
    assert all(r.status_code == 200 for r in responses), [r.text for r in responses]
    assert sum(r.json()["accepted"] for r in responses) == 400
    assert sum(r.json()["duplicates"] for r in responses) == 400
    assert await count(harness, Verification) == 400
    async with harness.sessionmaker() as session:
        total_checks = await session.scalar(select(func.sum(Member.checks)))
    assert total_checks == 400


async def test_group_stats_and_members_list(client, bot, viewer):
    await register_group(client, bot)
    await post_events(
        client,
        bot,
        [
            event(user_id=1),
            event(user_id=2),
            event(user_id=3, result="blocked"),
            event(user_id=4, result="error", error="timeout"),
            event(user_id=5, at=now() - timedelta(days=2)),
        ],
    )
    group = (await client.get(f"/api/v1/groups/{GROUP}", headers=viewer)).json()
    assert group["stats"] == {
        "verified_members": 3,
        "restricted_members": 1,
        "checks_24h": 4,
        "pass_rate_24h": 0.5,
    }
    url = f"/api/v1/groups/{GROUP}/members"
    verified = (await client.get(f"{url}?status=verified", headers=viewer)).json()
    assert [m["user_id"] for m in verified["items"]] == [1, 2, 5]
    first = (await client.get(f"{url}?limit=2", headers=viewer)).json()
    second = await client.get(f"{url}?limit=2&cursor={first['next_cursor']}", headers=viewer)
    third = await client.get(f"{url}?limit=2&cursor={second.json()['next_cursor']}", headers=viewer)
    users = [m["user_id"] for page in (first, second.json(), third.json()) for m in page["items"]]
    assert users == [1, 2, 3, 4, 5]
    assert third.json()["next_cursor"] is None
    problem(await client.get(f"{url}?cursor=abc", headers=viewer), 422)


# ---------------------------------------------------------------- heartbeats


async def test_heartbeats_show_up_in_bots(harness, client, bot, viewer):
    beat = {
        "instance_id": "bot-1",
        "version": "1.4.2",
        "started_at": (now() - timedelta(hours=1)).isoformat(),
        "stats": {"messages": 120, "cache_hits": 99.5},
    }
    assert (await client.post("/api/v1/bot/heartbeat", json=beat, headers=bot)).status_code == 204
    stale = {**beat, "instance_id": "bot-0"}
    assert (await client.post("/api/v1/bot/heartbeat", json=stale, headers=bot)).status_code == 204
    async with harness.sessionmaker() as session:
        from sqlalchemy import update

        from models import BotInstance

        await session.execute(
            update(BotInstance)
            .where(col(BotInstance.instance_id) == "bot-0")
            .values(last_seen_at=now() - timedelta(seconds=61))
        )
        await session.commit()
    bots = (await client.get("/api/v1/bots", headers=viewer)).json()
    assert bots["total"] == 2
    assert [(b["instance_id"], b["online"]) for b in bots["items"]] == [
        ("bot-0", False),
        ("bot-1", True),
    ]
    assert bots["items"][1]["key_name"] == "bot"
    assert bots["items"][1]["stats"] == {"messages": 120, "cache_hits": 99.5}
    too_many = {**beat, "stats": {f"s{i}": i for i in range(51)}}
    problem(await client.post("/api/v1/bot/heartbeat", json=too_many, headers=bot), 422)
    problem(
        await client.post(
            "/api/v1/bot/heartbeat", json={**beat, "stats": {"x": "many"}}, headers=bot
        ),
        422,
    )


async def member_counts_match_members(harness: Harness, viewer: dict, group: int | None = None):
    url = "/api/v1/analytics/summary" + (f"?group={group}" if group else "")
    summary = (await harness.client.get(url, headers=viewer)).json()
    async with harness.sessionmaker() as session:
        where = [] if group is None else [col(Member.chat_id) == group]
        rows = await session.execute(
            select(col(Member.status), func.count()).where(*where).group_by(col(Member.status))
        )
        states = {status: n for status, n in rows}
    assert summary["verified_members"] == states.get("verified", 0)
    assert summary["restricted_members"] == states.get("restricted", 0)


async def test_member_counts_follow_transitions_races_migrations_and_deletes(
    harness, client, bot, editor, viewer
):
    await register_group(client, bot)
    t = now() - timedelta(hours=2)
    batches = [
        [
            event(user_id=u, result=("passed" if (u + b) % 3 else "blocked"),
                  at=t + timedelta(seconds=b * 7 + u))
            for u in range(1, 40)
        ]
        for b in range(8)
    ]  # fmt: skip
    await asyncio.gather(*(post_events(client, bot, b) for b in batches))
    retry = await post_events(client, bot, batches[0])  # a retry changes nothing
    assert retry == {"accepted": 0, "duplicates": len(batches[0])}
    await post_events(client, bot, [event(user_id=99, result="error")])  # unknown: not counted
    await member_counts_match_members(harness, viewer)
    await member_counts_match_members(harness, viewer, GROUP)
    await post_events(client, bot, [event(chat_id=GROUP2, user_id=1, result="blocked")])
    await client.post(
        f"/api/v1/bot/groups/{GROUP}/migrate", json={"new_chat_id": GROUP2}, headers=bot
    )
    await member_counts_match_members(harness, viewer, GROUP2)
    await member_counts_match_members(harness, viewer, GROUP)
    await client.delete(f"/api/v1/groups/{GROUP2}", headers=editor)
    await member_counts_match_members(harness, viewer)
