"""Builders the test modules share: verification events, group and channel bodies (and their
creation through the dashboard or the bot API), event batches, and a poller."""

import asyncio
import inspect
import socket
import uuid
from collections.abc import AsyncGenerator, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import Any

import anyio
import httpx
import uvicorn

from tests.conftest import Harness

GROUP_ID = -1001000000001
CHANNEL_ID = -1002000000001
GROUPS = "/api/v1/groups"
CHANNELS = "/api/v1/channels"
VERIFICATIONS = "/api/v1/bot/verifications"
BATCH = 1000  # the most events one POST /bot/verifications takes
# A group's settings (API.md, "Group settings"): plain fields of the group and of its policy.
SETTINGS = (
    "mode",
    "action",
    "mute_seconds",
    "warning_text",
    "warning_ttl_seconds",
    "check_on_join",
    "on_error",
    "exempt_user_ids",
    "recheck_seconds",
)


def z(at: datetime) -> str:
    """RFC 3339 in UTC with `Z`, the contract's form of a time."""
    return at.astimezone(UTC).isoformat().replace("+00:00", "Z")


# ---------------------------------------------------------------- verification events


def event(
    chat_id: int = GROUP_ID,
    user_id: int = 42,
    result: str = "passed",
    at: datetime | None = None,
    **fields: Any,
) -> dict[str, Any]:
    """One event of a verification batch, `at` now unless given (sent as `z(at)`). A blocked
    event misses CHANNEL_ID unless `missing_channel_ids` says otherwise; any other field of the
    event (trigger, cached, latency_ms, error, occurred_at, event_id...) may be overridden."""
    return {
        "event_id": str(uuid.uuid4()),
        "chat_id": chat_id,
        "user_id": user_id,
        "result": result,
        "trigger": "message",
        "missing_channel_ids": [CHANNEL_ID] if result == "blocked" else [],
        "cached": False,
        "latency_ms": 120,
        "occurred_at": z(at or datetime.now(UTC)),
        **fields,
    }


async def ingest(client: httpx.AsyncClient, bot: dict[str, str], events: list) -> httpx.Response:
    """One POST /bot/verifications, whatever it answers."""
    return await client.post(VERIFICATIONS, json={"events": events}, headers=bot)


async def post_events(
    client: httpx.AsyncClient, bot: dict[str, str], events: list[dict]
) -> dict[str, int]:
    """Store these events (in batches of at most 1000, each of which must be a 200); returns
    the summed `{accepted, duplicates}` (one batch's answer when they fit in one)."""
    totals = {"accepted": 0, "duplicates": 0}
    for start in range(0, len(events), BATCH):
        response = await ingest(client, bot, events[start : start + BATCH])
        assert response.status_code == 200, response.text
        for key, value in response.json().items():
            totals[key] += value
    return totals


# ---------------------------------------------------------------- groups and channels


def group_body(chat_id: int = GROUP_ID, **fields: Any) -> dict[str, Any]:
    """A POST /groups body: `chat_id`, a title made from it unless given, and `fields`."""
    return {"chat_id": chat_id, "title": f"Group {chat_id}", **fields}


def channel_body(chat_id: int = CHANNEL_ID, **fields: Any) -> dict[str, Any]:
    """A POST /channels body: `chat_id`, a title made from it unless given, and `fields`."""
    return {"chat_id": chat_id, "title": f"Channel {chat_id}", **fields}


async def create_group(
    client: httpx.AsyncClient, auth: dict[str, str], chat_id: int = GROUP_ID, **fields: Any
) -> dict[str, Any]:
    """POST /groups as `auth`, which must answer 201; returns the group."""
    response = await client.post(GROUPS, json=group_body(chat_id, **fields), headers=auth)
    assert response.status_code == 201, response.text
    return response.json()


async def create_channel(
    client: httpx.AsyncClient, auth: dict[str, str], chat_id: int = CHANNEL_ID, **fields: Any
) -> dict[str, Any]:
    """POST /channels as `auth`, which must answer 201; returns the channel."""
    response = await client.post(CHANNELS, json=channel_body(chat_id, **fields), headers=auth)
    assert response.status_code == 201, response.text
    return response.json()


async def link(
    client: httpx.AsyncClient, auth: dict[str, str], group: int, channel: int, status: int = 201
) -> dict[str, Any]:
    """PUT /groups/{group}/channels/{channel} (201 when new, 200 when linked already)."""
    response = await client.put(f"{GROUPS}/{group}/channels/{channel}", headers=auth)
    assert response.status_code == status, response.text
    return response.json()


async def register_group(
    client: httpx.AsyncClient,
    bot: dict[str, str],
    chat_id: int = GROUP_ID,
    status: int = 201,
    **fields: Any,
) -> httpx.Response:
    """The bot's PUT /bot/groups/{chat_id} (201 when new, 200 when known); the policy answer."""
    body = {"title": f"Group {chat_id}", **fields}
    response = await client.put(f"/api/v1/bot/groups/{chat_id}", json=body, headers=bot)
    assert response.status_code == status, response.text
    return response


async def register_channel(
    client: httpx.AsyncClient,
    bot: dict[str, str],
    chat_id: int = CHANNEL_ID,
    status: int = 201,
    **fields: Any,
) -> httpx.Response:
    """The bot's PUT /bot/channels/{chat_id} (201 when new, 200 when known)."""
    body = {"title": f"Channel {chat_id}", **fields}
    response = await client.put(f"/api/v1/bot/channels/{chat_id}", json=body, headers=bot)
    assert response.status_code == status, response.text
    return response


# ---------------------------------------------------------------- a real server


@asynccontextmanager
async def served(
    harness: Harness, send_buffer: int | None = None
) -> AsyncGenerator[httpx.AsyncClient]:
    """The harness app behind a real HTTP server; yields a client for it. `send_buffer`
    sizes the kernel's send buffer of every connection (they inherit the listening
    socket's), so that a client that stops reading backs the server up quickly."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if send_buffer is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, send_buffer)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(
        harness.app, lifespan="off", log_level="warning", ws="none", timeout_graceful_shutdown=1
    )
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        await eventually(lambda: server.started)
        base_url = f"http://127.0.0.1:{port}"
        async with httpx.AsyncClient(base_url=base_url, timeout=5.0, trust_env=False) as client:
            yield client
    finally:
        server.should_exit = True
        await task
        # uvicorn cancels the requests still running (stalled streams) and returns without
        # waiting for them; they must be gone before the harness app stops and closes its
        # database, or one may wait forever on a closed SQLite connection's thread.
        if running := set(server.server_state.tasks):
            await asyncio.wait(running, timeout=10)
        sock.close()


# ---------------------------------------------------------------- waiting


async def eventually(
    condition: Callable[[], Any],
    timeout: float = 5.0,  # noqa: ASYNC109 - a poller's deadline is its one parameter
    interval: float = 0.01,
) -> Any:
    """Poll `condition` (a plain or an async callable) until it returns something truthy, and
    return that; fail the test if `timeout` seconds pass first."""
    with anyio.move_on_after(timeout):
        while True:
            value = condition()
            if inspect.isawaitable(value):
                value = await value
            if value:
                return value
            await anyio.sleep(interval)
    name = getattr(condition, "__qualname__", repr(condition))
    raise AssertionError(f"timed out after {timeout} s waiting for {name}")


async def listening(*harnesses: Harness) -> None:
    """On PostgreSQL, wait until each of these app instances LISTENs for the others'
    announcements (even the replica that made a change hears of it only through NOTIFY)."""
    for harness in harnesses:
        if (listener := harness.services.db.listener) is not None:
            await eventually(listener.linked.is_set)
