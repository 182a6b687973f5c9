"""Rate limits: per bot key, per staff user, per address for unauthenticated calls and failed
authentication; 429 problem+json with Retry-After and the IETF RateLimit headers; counters in
process, or shared through a real Redis across two app instances."""

import asyncio
import re
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import pytest

from tests.conftest import ENV_OWNER, Harness, JWKSServer, Tokens, problem, start_harness
from tests.factories import GROUP_ID, register_group

pytestmark = pytest.mark.anyio
POLICY = f"/api/v1/bot/groups/{GROUP_ID}/policy"
REDIS_URL = "redis://127.0.0.1:6379/0"


@asynccontextmanager
async def limited(
    database_url: str, jwks_server: JWKSServer, tokens: Tokens, **limits: str
) -> AsyncIterator[Harness]:
    """An app with these rate limits (the others off), on a clean database. Hour-long
    windows: a test never straddles one."""
    from tests.conftest import clean_database

    await clean_database(database_url)
    async for harness in start_harness(database_url, jwks_server.url, tokens, **limits):
        yield harness


def from_address(harness: Harness, address: str) -> httpx.AsyncClient:
    transport = httpx.ASGITransport(app=harness.app, client=(address, 40000))
    return httpx.AsyncClient(transport=transport, base_url="http://test")


def assert_limited(response: httpx.Response, kind: str, amount: int, window: int) -> None:
    body = problem(response, 429)
    assert body["type"] == "https://channelgate.dev/problems/rate-limited"
    assert f"rate limit for {kind} calls exceeded" in body["detail"]
    retry_after = int(response.headers["retry-after"])
    assert 0 < retry_after <= window
    assert response.headers["ratelimit-policy"] == f'"{kind}";q={amount};w={window}'
    assert response.headers["ratelimit"] == f'"{kind}";r=0;t={retry_after}'


async def test_a_bot_key_over_its_limit_gets_429_and_other_keys_do_not(
    database_url: str, jwks_server: JWKSServer, tokens: Tokens
):
    async with limited(
        database_url, jwks_server, tokens, rate_limit_bot="5/hour;1000/day"
    ) as harness:
        first, second = await harness.bot_key("one"), await harness.bot_key("two")
        await register_group(harness.client, first)  # 1 call of `first`
        for _ in range(4):
            assert (await harness.client.get(POLICY, headers=first)).status_code == 200
        assert_limited(await harness.client.get(POLICY, headers=first), "bot", 5, 3600)
        # Refused calls are not counted; every bot route shares the key's budget.
        assert_limited(
            await harness.client.post(
                "/api/v1/bot/verifications", json={"events": []}, headers=first
            ),
            "bot",
            5,
            3600,
        )
        assert (await harness.client.get(POLICY, headers=second)).status_code == 200


async def test_a_staff_user_over_the_limit_gets_429_and_others_do_not(
    database_url: str, jwks_server: JWKSServer, tokens: Tokens
):
    async with limited(database_url, jwks_server, tokens, rate_limit_staff="3/hour") as harness:
        owner, other = harness.auth(ENV_OWNER), await harness.add_staff("viewer")
        for _ in range(3):
            assert (await harness.client.get("/api/v1/groups", headers=owner)).status_code == 200
        assert_limited(await harness.client.get("/api/v1/me", headers=owner), "staff", 3, 3600)
        assert (await harness.client.get("/api/v1/me", headers=other)).status_code == 200


async def test_unauthenticated_calls_are_limited_per_address(
    database_url: str, jwks_server: JWKSServer, tokens: Tokens
):
    async with (
        limited(database_url, jwks_server, tokens, rate_limit_anonymous="3/hour") as harness,
        from_address(harness, "10.0.0.1") as one,
        from_address(harness, "10.0.0.2") as two,
    ):
        for path in ("/healthz", "/readyz", "/openapi.json"):
            assert (await one.get(path)).status_code == 200
        assert_limited(await one.get("/healthz"), "anonymous", 3, 3600)
        assert (await two.get("/healthz")).status_code == 200
        # Authenticated routes are not anonymous calls.
        owner = harness.auth(ENV_OWNER)
        assert (await one.get("/api/v1/groups", headers=owner)).status_code == 200


async def test_failed_authentication_is_limited_per_address_before_any_lookup(
    database_url: str, jwks_server: JWKSServer, tokens: Tokens
):
    async with limited(
        database_url, jwks_server, tokens, rate_limit_auth_failures="3/hour"
    ) as harness:
        good, fresh = await harness.bot_key(), await harness.bot_key("not used yet")
        await register_group(harness.client, good)  # `good` is now cached here
        async with from_address(harness, "10.0.0.9") as guesser:
            for _ in range(3):
                guess = {"Authorization": f"Bearer cgk_{uuid.uuid4().hex}{'A' * 11}"}
                assert (await guesser.get(POLICY, headers=guess)).status_code == 401
            loads = harness.services.auth.bot_keys.loading
            assert_limited(await guesser.get(POLICY, headers=guess), "auth-failure", 3, 3600)
            assert not loads  # refused before the key was looked up
            # A key that needs a lookup is refused from there too, and a staff token;
            assert_limited(await guesser.get(POLICY, headers=fresh), "auth-failure", 3, 3600)
            owner = harness.auth(ENV_OWNER)
            assert_limited(
                await guesser.get("/api/v1/groups", headers=owner), "auth-failure", 3, 3600
            )
            # a key known without a lookup still works (a fleet behind the guesser's NAT).
            assert (await guesser.get(POLICY, headers=good)).status_code == 200
        assert (await harness.client.get(POLICY, headers=fresh)).status_code == 200


async def test_429_is_in_the_openapi_document_of_every_operation(harness: Harness):
    document = (await harness.client.get("/openapi.json")).json()
    for path, operations in document["paths"].items():
        for method, operation in operations.items():
            answer = operation["responses"].get("429")
            assert answer is not None, (method, path)
            assert set(answer["headers"]) >= {"Retry-After", "RateLimit", "RateLimit-Policy"}


async def test_limits_are_shared_through_redis_across_replicas(
    database_url: str, jwks_server: JWKSServer, tokens: Tokens
):
    """Two app instances, one Redis: a staff user's calls on either count together."""
    coredis = pytest.importorskip("coredis")
    redis = coredis.Redis.from_url(REDIS_URL)
    try:
        await redis.ping()
    except Exception:
        pytest.skip("Redis is not running at 127.0.0.1:6379")
    user = str(uuid.uuid4())  # this test's own counters
    settings: dict[str, Any] = {"rate_limit_staff": "6/hour", "rate_limit_storage_url": REDIS_URL}
    try:
        async with limited(database_url, jwks_server, tokens, **settings) as one:
            async for two in start_harness(database_url, jwks_server.url, tokens, **settings):
                headers = await one.add_staff("viewer", user)
                for _ in range(3):
                    assert (await one.client.get("/api/v1/me", headers=headers)).is_success
                    assert (await two.client.get("/api/v1/me", headers=headers)).is_success
                await asyncio.sleep(0.5)  # both replicas have told Redis what they counted
                assert_limited(
                    await one.client.get("/api/v1/me", headers=headers), "staff", 6, 3600
                )
                assert_limited(
                    await two.client.get("/api/v1/me", headers=headers), "staff", 6, 3600
                )
                other = await one.add_staff("viewer")
                assert (await two.client.get("/api/v1/me", headers=other)).is_success
    finally:
        keys = [key async for key in redis.scan_iter(match=f"*channelgate/staff/{user}/*")]
        assert keys and all(re.search(r"/3600/\d+$", key.decode()) for key in keys)
        await redis.delete(keys)
