"""Rate limits: per bot key, per staff user, per client address (unauthenticated calls and
failed authentication).

The limits are the `limits` library's: its string notation ("100/second;3000/minute"), its
RateLimitItem windows and, with RATE_LIMIT_STORAGE_URL=redis://…, its async Redis storage.
The counting on the request path is done here, in process, as fixed windows aligned to the
clock: measured, the library's own limiter over MemoryStorage costs 11 µs a request for two
limits (about a fifth of the policy route's whole budget), these counters well under one
(bench/README.md). With Redis, each process adds what it counted to the shared window
counters every FLUSH_SECONDS (one INCRBY per active key) and decides on the shared total
plus what it has not sent yet: every worker and replica meets the same limit, overshooting
it by at most what the others admit in one flush interval, and a request never waits for
Redis. If Redis is unreachable each process goes on counting alone (logged).
"""

import asyncio
import contextlib
import logging
import math
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

from fastapi import HTTPException
from limits import RateLimitItem, parse_many
from starlette.requests import HTTPConnection

log = logging.getLogger("channelgate.ratelimit")

FLUSH_SECONDS = 0.2
MAX_EXPORTS_PER_USER = 2
MAX_COUNTERS = 200_000  # a sweep drops ended windows beyond this many (a flood of addresses)


@dataclass(slots=True)
class Window:
    """One identity's count in one window of one limit."""

    index: int  # the window's number since the epoch (time // its length)
    pending: int = 0  # admitted here, not sent to the shared store yet
    shared: int = 0  # the shared store's total at the last flush (every process's, ours too)

    @property
    def count(self) -> int:
        return self.shared + self.pending


class TooManyRequests(HTTPException):
    def __init__(self, kind: str, item: RateLimitItem, reset: int) -> None:
        seconds = item.get_expiry()
        super().__init__(
            429,
            f"rate limit for {kind} calls exceeded ({item}); retry in {reset} s",
            headers={
                "Retry-After": str(reset),
                "RateLimit-Policy": f'"{kind}";q={item.amount};w={seconds}',
                "RateLimit": f'"{kind}";r=0;t={reset}',
            },
        )


class Slots:
    """At most `cap` things at a time per identity (exports being streamed, say): `take`
    or 429; the caller gives the slot back with `give_back`."""

    def __init__(self, what: str, cap: int) -> None:
        self.what = what
        self.cap = cap
        self.held: Counter[str] = Counter()

    def take(self, identity: str) -> Callable[[], None]:
        if self.held[identity] >= self.cap:
            raise HTTPException(
                429,
                f"at most {self.cap} {self.what} at a time per user; wait for one to finish",
                headers={"Retry-After": "10"},
            )
        self.held[identity] += 1
        returned = False

        def give_back() -> None:
            nonlocal returned
            if not returned:
                returned = True
                self.held[identity] -= 1
                if not self.held[identity]:
                    del self.held[identity]

        return give_back


class Limiter:
    """Counters for each kind of caller ("bot", "staff", "anonymous", "auth-failure")."""

    def __init__(self, policies: dict[str, str], storage_url: str = "") -> None:
        self.items: dict[str, list[tuple[RateLimitItem, int]]] = {
            kind: [(item, item.get_expiry()) for item in parse_many(text)]
            for kind, text in policies.items()
            if text
        }
        self.windows: dict[tuple[str, str, int], Window] = {}
        self.exports = Slots("exports", MAX_EXPORTS_PER_USER)
        self.storage_url = storage_url
        self.storage = None
        self.flusher: asyncio.Task[None] | None = None

    async def start(self) -> None:
        if self.storage_url:
            from limits.storage import storage_from_string

            self.storage = storage_from_string(f"async+{self.storage_url}")
            self.flusher = asyncio.create_task(self.flush_forever(), name="channelgate-limits")

    async def stop(self) -> None:
        if self.flusher is not None:
            self.flusher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.flusher
            await self.flush()

    def hit(self, kind: str, identity: str) -> None:
        """Count one call of `identity`; raise 429 if it is over any of its kind's limits
        (a refused call is not counted)."""
        items = self.items.get(kind)
        if not items:
            return
        now = time.time()
        windows = []
        for item, seconds in items:
            index = int(now // seconds)
            key = (kind, identity, seconds)
            window = self.windows.get(key)
            if window is None or window.index != index:
                if len(self.windows) >= MAX_COUNTERS:
                    self.sweep(now)
                window = self.windows[key] = Window(index)
            if window.count >= item.amount:
                raise TooManyRequests(kind, item, math.ceil((index + 1) * seconds - now))
            windows.append(window)
        for window in windows:
            window.pending += 1

    def check(self, kind: str, identity: str) -> None:
        """Raise 429 if `identity` is over a limit already, without counting a call."""
        now = time.time()
        for item, seconds in self.items.get(kind, ()):
            window = self.windows.get((kind, identity, seconds))
            index = int(now // seconds)
            if window is not None and window.index == index and window.count >= item.amount:
                raise TooManyRequests(kind, item, math.ceil((index + 1) * seconds - now))

    def sweep(self, now: float) -> None:
        self.windows = {
            key: window
            for key, window in self.windows.items()
            if window.index == int(now // key[2])
        }

    async def flush_forever(self) -> None:
        while True:
            await asyncio.sleep(FLUSH_SECONDS)
            try:
                await self.flush()
            except Exception as error:
                log.warning("rate-limit storage unavailable, counting per process: %r", error)
                await asyncio.sleep(5)

    async def flush(self) -> None:
        """Send what was counted here since the last flush; learn every process's totals."""
        if self.storage is None:
            return
        now = time.time()
        for (kind, identity, seconds), window in list(self.windows.items()):
            if window.index != int(now // seconds):
                continue  # ended: nothing more to tell or learn
            amount, window.pending = window.pending, 0
            key = f"channelgate/{kind}/{identity}/{seconds}/{window.index}"
            try:
                window.shared = await self.storage.incr(key, seconds, amount=amount)
            except BaseException:
                window.pending += amount  # sent next time
                raise


def limiter_of(connection: HTTPConnection) -> Limiter:
    return connection.app.state.services.limiter
