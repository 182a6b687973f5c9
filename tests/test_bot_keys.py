"""Bot keys: creation (shown once), listing, revocation, the key cache, audit."""

import asyncio
import re
from typing import Any

import httpx
import pytest
from sqlalchemy import select
from sqlmodel import col

from auth import BotCaller, hash_key
from models import BotKey
from tests.conftest import ENV_BOT_KEY, ENV_OWNER, Harness, problem

pytestmark = pytest.mark.anyio

KEY_RE = re.compile(r"^cgk_[A-Za-z0-9_-]{43}$")
PROBE = "/api/v1/bot/_probe_bot_keys"


async def create(client: httpx.AsyncClient, auth: dict[str, str], name: str) -> dict[str, Any]:
    response = await client.post("/api/v1/bot-keys", json={"name": name}, headers=auth)
    assert response.status_code == 201, response.text
    return response.json()


async def list_keys(client: httpx.AsyncClient, auth: dict[str, str], **params: Any) -> dict:
    response = await client.get("/api/v1/bot-keys", params=params, headers=auth)
    assert response.status_code == 200, response.text
    return response.json()


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def add_probe(harness: Harness) -> None:
    """A throwaway route behind the real bot-key dependency, so these tests do not depend on
    which bot endpoints exist."""

    @harness.app.get(PROBE)
    async def probe(caller: BotCaller) -> dict[str, str]:
        return {"id": caller.id, "name": caller.name or ""}


async def test_create_shows_the_key_once(harness: Harness, owner):
    client = harness.client
    created = await create(client, owner, "  fleet-1  ")
    assert set(created) == {"id", "name", "prefix", "key", "created_at"}
    assert KEY_RE.fullmatch(created["key"]), created["key"]
    assert created["prefix"] == created["key"][:12]
    assert created["name"] == "fleet-1" and created["created_at"].endswith("Z")

    listed = await list_keys(client, owner)
    assert listed["total"] == 1 and listed["next_cursor"] is None
    (item,) = listed["items"]
    assert item == {
        "id": created["id"],
        "name": "fleet-1",
        "prefix": created["prefix"],
        "created_at": created["created_at"],
        "last_used_at": None,
        "revoked_at": None,
    }
    assert created["key"] not in (await client.get("/api/v1/bot-keys", headers=owner)).text

    async with harness.sessionmaker() as session:
        row = await session.scalar(select(BotKey).where(col(BotKey.id) == created["id"]))
    assert row is not None and row.key_hash == hash_key(created["key"])
    assert created["key"] not in row.model_dump_json()


async def test_keys_are_unique(harness: Harness, owner):
    keys = {(await create(harness.client, owner, "same"))["key"] for _ in range(3)}
    assert len(keys) == 3


@pytest.mark.parametrize(
    ("body", "loc", "error_type"),
    [
        ({}, ["body", "name"], "missing"),
        ({"name": ""}, ["body", "name"], "string_too_short"),
        ({"name": "   "}, ["body", "name"], "string_too_short"),
        ({"name": "x" * 65}, ["body", "name"], "string_too_long"),
        ({"name": 5}, ["body", "name"], "string_type"),
        ({"name": "ok", "key": ENV_BOT_KEY}, ["body", "key"], "extra_forbidden"),
    ],
)
async def test_create_invalid_is_422(harness: Harness, owner, body, loc, error_type):
    response = await harness.client.post("/api/v1/bot-keys", json=body, headers=owner)
    errors = problem(response, 422)["errors"]
    assert [(e["loc"], e["type"]) for e in errors] == [(loc, error_type)]
    assert (await list_keys(harness.client, owner))["total"] == 0


@pytest.mark.parametrize(
    ("method", "path", "json"),
    [
        ("GET", "/api/v1/bot-keys", None),
        ("POST", "/api/v1/bot-keys", {"name": "x"}),
        ("DELETE", "/api/v1/bot-keys/1", None),
    ],
)
async def test_bot_key_routes_need_an_owner(harness: Harness, editor, bot, method, path, json):
    response = await harness.client.request(method, path, json=json, headers=editor)
    assert problem(response, 403)["detail"] == "this needs the owner role"
    response = await harness.client.request(method, path, json=json, headers=bot)
    assert problem(response, 401)["detail"] == "bot keys are not accepted on dashboard routes"


async def test_list_is_newest_first_and_paginates(harness: Harness, owner):
    client = harness.client
    ids = [(await create(client, owner, f"k{i}"))["id"] for i in range(5)]
    seen: list[int] = []
    params: dict[str, Any] = {"limit": 2}
    while True:
        page = await list_keys(client, owner, **params)
        assert page["total"] == 5 and len(page["items"]) <= 2
        seen += [item["id"] for item in page["items"]]
        if page["next_cursor"] is None:
            break
        params["cursor"] = page["next_cursor"]
    assert seen == ids[::-1]


@pytest.mark.parametrize("params", [{"cursor": "garbage"}, {"limit": 0}, {"limit": 201}])
async def test_list_bad_query_is_422(harness: Harness, owner, params):
    response = await harness.client.get("/api/v1/bot-keys", params=params, headers=owner)
    problem(response, 422)


async def test_new_key_works_and_records_last_use(harness: Harness, owner):
    add_probe(harness)
    created = await create(harness.client, owner, "fleet")
    response = await harness.client.get(PROBE, headers=bearer(created["key"]))
    assert response.status_code == 200, response.text
    assert response.json() == {"id": f"key:{created['id']}", "name": "fleet"}
    (item,) = (await list_keys(harness.client, owner))["items"]
    assert item["last_used_at"] is not None


async def test_environment_key_works(harness: Harness):
    add_probe(harness)
    response = await harness.client.get(PROBE, headers=bearer(ENV_BOT_KEY))
    assert response.json() == {"id": "env:envbot", "name": "envbot"}


@pytest.mark.parametrize(
    ("key", "detail"),
    [
        ("cgk_" + "A" * 43, "unknown or revoked bot key"),
        ("cgk_" + "A" * 42, "bot routes need a bot key (cgk_…)"),
        ("cgk_" + "A" * 42 + "!", "bot routes need a bot key (cgk_…)"),
    ],
)
async def test_unknown_or_malformed_key_is_401(harness: Harness, key, detail):
    add_probe(harness)
    response = await harness.client.get(PROBE, headers=bearer(key))
    assert problem(response, 401)["detail"] == detail
    assert response.headers["www-authenticate"].startswith("Bearer")


async def test_revoke_stops_the_key_at_once(harness: Harness, owner):
    add_probe(harness)
    client = harness.client
    created, other = await create(client, owner, "gone"), await create(client, owner, "stays")
    # Both keys are used first, so they sit in the in-process cache when one is revoked.
    for key in (created["key"], other["key"]):
        assert (await client.get(PROBE, headers=bearer(key))).status_code == 200
    assert harness.services.auth.bot_keys.get(hash_key(created["key"])) is not None

    response = await client.delete(f"/api/v1/bot-keys/{created['id']}", headers=owner)
    assert response.status_code == 204 and response.content == b""
    assert harness.services.auth.bot_keys.get(hash_key(created["key"])) is None

    denied = problem(await client.get(PROBE, headers=bearer(created["key"])), 401)
    assert denied["detail"] == "unknown or revoked bot key"
    assert (await client.get(PROBE, headers=bearer(other["key"]))).status_code == 200

    items = {i["id"]: i for i in (await list_keys(client, owner))["items"]}
    assert items[created["id"]]["revoked_at"] is not None
    assert items[other["id"]]["revoked_at"] is None

    again = await client.delete(f"/api/v1/bot-keys/{created['id']}", headers=owner)
    assert again.status_code == 204  # idempotent; the revocation time stays the first one
    after = {i["id"]: i for i in (await list_keys(client, owner))["items"]}
    assert after[created["id"]]["revoked_at"] == items[created["id"]]["revoked_at"]


async def test_revoked_key_is_rejected_on_a_real_bot_route(harness: Harness, owner):
    path = "/api/v1/bot/groups/-1001234567890/policy"
    created = await create(harness.client, owner, "fleet")
    accepted = problem(await harness.client.get(path, headers=bearer(created["key"])), 404)
    assert accepted["detail"] == "group -1001234567890 not found"
    await harness.client.delete(f"/api/v1/bot-keys/{created['id']}", headers=owner)
    response = await harness.client.get(path, headers=bearer(created["key"]))
    assert problem(response, 401)["detail"] == "unknown or revoked bot key"


@pytest.mark.parametrize(
    ("key_id", "status"), [("999", 404), ("0", 422), ("abc", 422), (str(2**31), 422)]
)
async def test_revoke_unknown_or_invalid_id(harness: Harness, owner, key_id, status):
    response = await harness.client.delete(f"/api/v1/bot-keys/{key_id}", headers=owner)
    body = problem(response, status)
    if status == 404:
        assert body["detail"] == "bot key 999 not found"


async def test_create_and_revoke_are_audited_without_the_key(harness: Harness, owner):
    client = harness.client
    created = await create(client, owner, "fleet")
    await client.delete(f"/api/v1/bot-keys/{created['id']}", headers=owner)

    response = await client.get("/api/v1/audit", params={"resource": "bot_key"}, headers=owner)
    assert response.status_code == 200
    revoke, create_row = response.json()["items"]
    assert created["key"] not in response.text
    assert hash_key(created["key"]) not in response.text
    for row, action in ((create_row, "bot_key.create"), (revoke, "bot_key.revoke")):
        assert row["action"] == action and row["resource_id"] == str(created["id"])
        assert row["actor"]["kind"] == "staff" and row["actor"]["id"] == ENV_OWNER
        for snapshot in (row["before"] or {}, row["after"]):
            assert not {"key", "key_hash"} & set(snapshot)
    assert create_row["before"] is None
    assert create_row["after"]["name"] == "fleet"
    assert create_row["after"]["prefix"] == created["prefix"]
    assert revoke["before"]["revoked_at"] is None and revoke["after"]["revoked_at"] is not None


async def test_a_key_lookup_racing_a_revocation_is_not_cached(harness: Harness):
    created = await harness.client.post(
        "/api/v1/bot-keys", json={"name": "racer"}, headers=harness.auth(ENV_OWNER)
    )
    key_hash = hash_key(created.json()["key"])
    cache = harness.services.auth.bot_keys
    # The lookup starts (and reads the key as live); the revocation lands before it ends.
    lookup = asyncio.ensure_future(cache.load(key_hash))
    await asyncio.sleep(0)
    cache.invalidate(key_hash)
    assert (await lookup) is not None  # the read itself was from before the revocation
    assert cache.get(key_hash) is None  # but what it read is not kept
    assert key_hash not in cache.loading  # and the next request reads afresh
    # Without a revocation in between, a lookup is cached as before.
    assert await cache.load(key_hash) is not None and cache.get(key_hash) is not None
