"""GET /metrics: Prometheus text from prometheus-client, every route labelled by its template
(the bare policy route too), streams counted but not timed, and one consistent set of
counters across `channelgate serve --workers N`."""

import os
import socket
import sys

import anyio
import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import ENV_BOT_KEY, ROOT, Harness, clean_database, problem, start_harness
from tests.factories import eventually

pytestmark = pytest.mark.anyio

GROUP = -1001000000001


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """(sample name, labels) -> value, parsed by prometheus-client's own parser."""
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(found: dict, name: str, **labels: str) -> float | None:
    return found.get((name, frozenset(labels.items())))


@pytest.fixture
async def metered(database_url, jwks_server, tokens):
    await clean_database(database_url)
    async for h in start_harness(database_url, jwks_server.url, tokens, metrics_enabled=True):
        yield h


async def test_metrics_are_off_by_default(client):
    problem(await client.get("/metrics"), 404)


async def test_requests_are_counted_by_route_template(metered: Harness):
    client, bot = metered.client, {"Authorization": f"Bearer {ENV_BOT_KEY}"}
    await client.get("/healthz")
    await client.get("/api/v1/groups/-1001/members")  # 401, still counted
    await client.put(f"/api/v1/bot/groups/{GROUP}", json={"title": "G"}, headers=bot)
    for _ in range(3):  # the bare ASGI policy route, not "unmatched"
        assert (await client.get(f"/api/v1/bot/groups/{GROUP}/policy", headers=bot)).is_success
    await client.get("/no/such/route")
    response = await client.get("/metrics")
    assert response.headers["content-type"].startswith("text/plain")
    found = samples(response.text)
    requests = "channelgate_requests_total"
    assert value(found, requests, method="GET", route="/healthz", status="200") == 1
    members = "/api/v1/groups/{chat_id}/members"
    assert value(found, requests, method="GET", route=members, status="401") == 1
    policy = "/api/v1/bot/groups/{chat_id}/policy"
    assert value(found, requests, method="GET", route=policy, status="200") == 3
    assert value(found, requests, method="GET", route="unmatched", status="404") == 1
    timed = "channelgate_request_seconds_count"
    assert value(found, timed, method="GET", route=policy) == 3
    assert value(found, "channelgate_ingested_events_total") == 0
    assert value(found, "channelgate_db_pool_connections", state="checked_out") is not None
    assert "# HELP channelgate_requests_total " in response.text


async def test_streams_are_counted_but_not_timed(metered: Harness):
    owner = metered.auth("00000000-0000-4000-8000-00000000e0e0")
    export = await metered.client.get("/api/v1/verifications/export", headers=owner)
    assert export.status_code == 200
    found = samples((await metered.client.get("/metrics")).text)
    route = "/api/v1/verifications/export"
    assert value(found, "channelgate_requests_total", method="GET", route=route, status="200")
    assert value(found, "channelgate_request_seconds_count", method="GET", route=route) is None


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.parametrize("server", ["uvicorn", "granian"])
async def test_workers_share_one_set_of_counters(database_url, tmp_path, server):
    """Under `serve --workers 2` whichever worker answers a scrape reports every worker's
    requests: the count is the same on every scrape, and never goes back."""
    if not database_url.startswith("postgresql"):
        pytest.skip("several workers need PostgreSQL")
    port = free_port()
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("PROMETHEUS", "DATABASE"))},
        "DATABASE_URL": database_url,
        "METRICS_ENABLED": "true",
        "LOG_LEVEL": "warning",
        "PYTHONPATH": str(ROOT),
    }
    command = [sys.executable, "-m", "cli", "serve", "--port", str(port), "--workers", "2"]
    command += ["--server", server]
    async with await anyio.open_process(command, cwd=tmp_path, env=env) as server:
        try:
            base = f"http://127.0.0.1:{port}"
            await eventually(lambda: up(f"{base}/healthz"), timeout=60)  # a loaded CI machine
            requests = 40
            for _ in range(requests):  # a new connection each time: the workers share them
                async with httpx.AsyncClient() as client:
                    assert (await client.get(f"{base}/readyz")).is_success
            counts = []
            async with httpx.AsyncClient() as client:
                for _ in range(8):
                    found = samples((await client.get(f"{base}/metrics")).text)
                    route = {"method": "GET", "route": "/readyz", "status": "200"}
                    counts.append(value(found, "channelgate_requests_total", **route))
            assert counts == [requests] * 8, counts
        finally:
            server.terminate()


async def up(url: str) -> bool:
    try:
        async with httpx.AsyncClient() as client:
            return (await client.get(url, timeout=1)).is_success
    except httpx.HTTPError:
        return False
