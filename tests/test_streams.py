"""Long streams cannot hold the database: CSV exports read page by page in short transactions
and end when their client stops reading; live-feed streams hold no connection. With 25
stalled exports and 25 stalled feeds open on a real server, a bot's batch still answers in
under a second (on SQLite, whose pool has one connection, as on PostgreSQL)."""

import asyncio
import socket
import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager

import pytest
from sqlalchemy.pool import QueuePool

import routes
from tests.conftest import Harness, problem
from tests.factories import BATCH, event, eventually, post_events, served

pytestmark = pytest.mark.anyio
EXPORT = "/api/v1/verifications/export"


@asynccontextmanager
async def stalled(port: int, path: str, auth: dict[str, str]) -> AsyncIterator[None]:
    """A client that sends its request and then never reads: a tiny receive window, so
    the server's writes back up at once."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
    _, writer = await asyncio.open_connection(sock=sock)
    request = f"GET {path} HTTP/1.1\r\nHost: test\r\nAuthorization: {auth['Authorization']}\r\n\r\n"
    writer.write(request.encode())
    await writer.drain()
    try:
        yield
    finally:
        writer.transport.abort()


async def fill_log(harness: Harness, bot: dict[str, str], events: int) -> None:
    for start in range(0, events, BATCH):
        batch = [event(user_id=n + 1) for n in range(start, min(start + BATCH, events))]
        await post_events(harness.client, bot, batch)


async def test_stalled_exports_and_feeds_leave_ingestion_fast(harness: Harness, bot):
    await fill_log(harness, bot, 4000)  # two export pages: the first backs up the socket
    exporters = [await harness.add_staff("viewer") for _ in range(13)]  # 2 exports each
    watchers = [await harness.add_staff("viewer") for _ in range(5)]  # 5 streams each
    pool = harness.services.db.engine.sync_engine.pool
    assert isinstance(pool, QueuePool)
    async with served(harness, send_buffer=8192) as http, AsyncExitStack() as stack:
        port = int(str(http.base_url).rsplit(":", 1)[1])
        held = harness.services.limiter.exports.held
        for n in range(25):
            # One after the other (25 first pages at once would only measure this 2-core
            # VM): each export reads its first page, writes what its socket takes and waits,
            # and then holds no connection.
            await stack.enter_async_context(stalled(port, EXPORT, exporters[n // 2]))
            await stack.enter_async_context(stalled(port, "/api/v1/events", watchers[n // 5]))
            await eventually(lambda n=n: sum(held.values()) == n + 1, timeout=15)
            await eventually(lambda: pool.checkedout() == 0, timeout=15)
        await eventually(lambda: len(harness.services.feed.subscribers) == 25, timeout=15)
        await asyncio.sleep(0.2)
        assert sum(held.values()) == 25  # all still open, all waiting on their clients
        # None holds a connection (the folder's pass every 0.5 s may, for a moment).
        await eventually(lambda: pool.checkedout() == 0)
        started = time.monotonic()
        stored = await post_events(harness.client, bot, [event(user_id=n) for n in range(1, 101)])
        seconds = time.monotonic() - started
        assert stored == {"accepted": 100, "duplicates": 0}
        assert seconds < 1, f"a batch took {seconds:.2f}s beside 50 stalled streams"
        print(
            f"\n100 events beside 25 stalled exports and 25 stalled feeds: {seconds * 1e3:.0f} ms"
        )
        # A third export of one user is refused while two of theirs are open.
        third = await harness.client.get(EXPORT, headers=exporters[0])
        assert "at most 2 exports at a time per user" in problem(third, 429)["detail"]


@pytest.mark.parametrize(
    "events", [4000, 1900], ids=["a later page waits", "the closing send waits"]
)
async def test_an_export_that_makes_no_progress_is_ended(
    harness: Harness, bot, viewer, monkeypatch, events: int
):
    monkeypatch.setattr(routes, "STALL_SECONDS", 0.3)
    await fill_log(harness, bot, events)
    exports = harness.services.limiter.exports
    async with served(harness, send_buffer=8192) as http:
        port = int(str(http.base_url).rsplit(":", 1)[1])
        async with stalled(port, EXPORT, viewer):
            await eventually(lambda: exports.held)
            await eventually(lambda: not exports.held, timeout=5)  # ended; its slot is back
        # A reading client gets the whole export, header plus every row.
        async with http.stream("GET", EXPORT, headers=viewer) as response:
            assert response.status_code == 200
            lines = [line async for line in response.aiter_lines() if line]
        assert len(lines) == 1 + events
    assert not exports.held


async def test_a_feed_stream_that_makes_no_progress_is_ended(
    harness: Harness, bot, viewer, monkeypatch
):
    """A live-feed client that stops reading while events come (its socket full) loses its
    stream and its place, as an export's does; one that reads gets every event."""
    monkeypatch.setattr(routes, "STALL_SECONDS", 0.3)
    feed = harness.services.feed
    async with served(harness, send_buffer=8192) as http:
        port = int(str(http.base_url).rsplit(":", 1)[1])
        async with stalled(port, "/api/v1/events", viewer):
            await eventually(lambda: len(feed.subscribers) == 1)
            await fill_log(harness, bot, 1000)  # ~300 bytes an event: far past both buffers
            await eventually(lambda: not feed.subscribers, timeout=5)  # ended; place given back
        async with http.stream("GET", "/api/v1/events", headers=viewer) as response:
            assert response.status_code == 200
            lines = response.aiter_lines()
            assert await anext(lines) == "retry: 3000"
            await eventually(lambda: len(feed.subscribers) == 1)
            await fill_log(harness, bot, 1000)
            got = 0
            async with asyncio.timeout(30):
                async for line in lines:
                    got += line == "event: verification"
                    if got == 1000:
                        break
    assert not feed.subscribers
