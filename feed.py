"""The live feed: verifications and audit entries, pushed to dashboard subscribers (SSE).

A committed transaction announces the ids of the rows it wrote (db.announce, topics AUDIT
and VERIFICATION): this process hears it at commit, every other replica through NOTIFY. A
process with subscribers then reads those rows once and fans them out. Each subscriber has a
bounded queue; a slow one loses events (counted, and told) instead of slowing anyone down.
"""

import asyncio
import json
import logging
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

from fastapi import HTTPException
from fastapi.sse import ServerSentEvent
from sqlmodel import col, select
from starlette.requests import HTTPConnection

from db import AUDIT, VERIFICATION, Database
from metrics import Metrics
from models import AuditLog, AuditPublic, Verification, VerificationPublic

log = logging.getLogger("channelgate.feed")

QUEUE_SIZE = 1000  # per stream: one whole batch; MAX_SUBSCRIBERS * QUEUE_SIZE events at most
MAX_SUBSCRIBERS = 200
MAX_PER_USER = 5
RECHECK_SECONDS = 15.0  # how often a stream asks whether its staff member is still the same
MAX_PENDING = 10_000  # announced ids waiting for their fetch, per kind (beyond: dropped)
RETRY_MS = 3000
END = ""  # the queue's last item when the process drains


@dataclass(eq=False)
class Subscriber:
    user: str
    sees_audit: bool
    queue: asyncio.Queue[tuple[str, str]] = field(default_factory=lambda: asyncio.Queue(QUEUE_SIZE))
    dropped: int = 0

    async def events(
        self, unchanged: Callable[[], Awaitable[bool]], expires_at: float | None
    ) -> AsyncIterator[ServerSentEvent]:
        """The stream as a browser's EventSource reads it: the reconnection delay first,
        then every event (after a `dropped` count when some were lost). It ends when the
        token expires, and within RECHECK_SECONDS of `unchanged()` saying the staff member
        was removed or their role changed: the client reconnects with what it now may see."""
        yield ServerSentEvent(retry=RETRY_MS)
        recheck_at = time.monotonic() + RECHECK_SECONDS
        while True:
            left = recheck_at - time.monotonic()
            if expires_at is not None:
                left = min(left, expires_at - time.time())
            try:
                kind, data = await asyncio.wait_for(self.queue.get(), timeout=max(left, 0))
            except TimeoutError:
                if expires_at is not None and time.time() >= expires_at:
                    return
                if not await unchanged():
                    return
                recheck_at = time.monotonic() + RECHECK_SECONDS
                continue
            if kind == END:
                return  # the process is shutting down: the client reconnects elsewhere
            if self.dropped:
                yield ServerSentEvent(event="dropped", raw_data=json.dumps({"count": self.dropped}))
                self.dropped = 0
            yield ServerSentEvent(event=kind, raw_data=data)


class Feed:
    def __init__(self, db: Database, metrics: Metrics) -> None:
        self.db = db
        self.metrics = metrics
        self.subscribers: set[Subscriber] = set()
        self.per_user: Counter[str] = Counter()
        # Announced ids waiting to be fetched, and the one fetch task of each kind: however
        # fast the commits come, at most two feed queries run at a time.
        self.pending: dict[str, list[int]] = {AUDIT: [], VERIFICATION: []}
        self.fetching: dict[str, asyncio.Task[None]] = {}
        self.draining = False
        for topic in (AUDIT, VERIFICATION):
            db.on(topic, lambda ids, kind=topic: self.announced(kind, ids))

    def subscribe(self, user: str, sees_audit: bool) -> Subscriber:
        """A place in the feed, or 503 (shutting down, or the feed is full) or 429 (this
        user has MAX_PER_USER streams open already)."""
        if self.draining:
            raise HTTPException(503, "shutting down", headers={"Retry-After": "5"})
        if len(self.subscribers) >= MAX_SUBSCRIBERS:
            raise HTTPException(
                503, "too many live-feed subscribers", headers={"Retry-After": "30"}
            )
        if self.per_user[user] >= MAX_PER_USER:
            raise HTTPException(
                429,
                f"at most {MAX_PER_USER} live-feed streams per user; close one first",
                headers={"Retry-After": "30"},
            )
        subscriber = Subscriber(user, sees_audit)
        self.subscribers.add(subscriber)
        self.per_user[user] += 1
        self.metrics.feed_subscribers.inc()
        return subscriber

    def unsubscribe(self, subscriber: Subscriber) -> None:
        if subscriber in self.subscribers:
            self.subscribers.discard(subscriber)
            self.per_user[subscriber.user] -= 1
            if not self.per_user[subscriber.user]:
                del self.per_user[subscriber.user]
            self.metrics.feed_subscribers.dec()

    def drain(self) -> None:
        """End every stream (after what is queued; a full queue makes room) and take no
        new subscribers: the process is about to stop."""
        self.draining = True
        for subscriber in self.subscribers:
            if subscriber.queue.full():
                subscriber.queue.get_nowait()
                subscriber.dropped += 1
            subscriber.queue.put_nowait((END, ""))

    def publish(self, kind: str, data: str) -> None:
        for subscriber in self.subscribers:
            if kind == AUDIT and not subscriber.sees_audit:
                continue
            try:
                subscriber.queue.put_nowait((kind, data))
            except asyncio.QueueFull:
                subscriber.dropped += 1
                self.metrics.feed_dropped.inc()

    def announced(self, kind: str, raw_ids: list[str]) -> None:
        """A transaction committed these rows: fetch and publish them, if anyone is
        listening here (coalesced with what is still waiting, one fetch at a time)."""
        if not self.subscribers:
            return
        pending = self.pending[kind]
        pending.extend(int(i) for i in raw_ids if i.isdigit())
        if len(pending) > MAX_PENDING:
            lost = len(pending) - MAX_PENDING
            del pending[:lost]
            for subscriber in self.subscribers:
                subscriber.dropped += lost
            self.metrics.feed_dropped.inc(lost)
        if pending and kind not in self.fetching:
            task = asyncio.get_running_loop().create_task(self._fetch_pending(kind))
            self.fetching[kind] = task
            task.add_done_callback(lambda _, kind=kind: self.fetching.pop(kind, None))

    async def _fetch_pending(self, kind: str) -> None:
        pending = self.pending[kind]
        while pending:
            ids, pending[:] = pending[:1000], pending[1000:]
            await self._fetch(kind, ids)

    async def _fetch(self, kind: str, ids: list[int]) -> None:
        try:
            async with self.db.sessionmaker() as session:
                if kind == VERIFICATION:
                    rows = await session.scalars(
                        select(Verification).where(col(Verification.id).in_(ids))
                        .order_by(col(Verification.occurred_at), col(Verification.id))
                    )  # fmt: skip
                    for row in rows:
                        data = VerificationPublic.model_validate(row, from_attributes=True)
                        self.publish(kind, data.model_dump_json())
                else:
                    rows = await session.scalars(
                        select(AuditLog).where(col(AuditLog.id).in_(ids)).order_by(col(AuditLog.id))
                    )
                    for row in rows:
                        self.publish(kind, AuditPublic.from_row(row).model_dump_json())
        except Exception:
            log.exception("could not load %s rows %s for the live feed", kind, ids[:5])


def feed_of(connection: HTTPConnection) -> Feed:
    return connection.app.state.services.feed
