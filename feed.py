"""The live feed: verifications and audit entries, pushed to dashboard subscribers (SSE).

A committed transaction announces the ids of the rows it wrote (db.announce, topics AUDIT
and VERIFICATION): this process hears it at commit, every other replica through NOTIFY. A
process with subscribers then reads those rows once and fans them out. Each subscriber has a
bounded queue; a slow one loses events (counted, and told) instead of slowing anyone down.
"""

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from fastapi import HTTPException
from fastapi.sse import ServerSentEvent
from sqlmodel import col, select
from starlette.requests import HTTPConnection

from db import AUDIT, VERIFICATION, Database
from metrics import Metrics
from models import AuditLog, AuditPublic, Verification, VerificationPublic

log = logging.getLogger("channelgate.feed")

QUEUE_SIZE = 1000
MAX_SUBSCRIBERS = 1000
RETRY_MS = 3000
END = ""  # the queue's last item when the process drains


@dataclass(eq=False)
class Subscriber:
    queue: asyncio.Queue[tuple[str, str]] = field(default_factory=lambda: asyncio.Queue(QUEUE_SIZE))
    dropped: int = 0

    async def events(self) -> AsyncIterator[ServerSentEvent]:
        """The stream as a browser's EventSource reads it: the reconnection delay first,
        then every event (after a `dropped` count when some were lost)."""
        yield ServerSentEvent(retry=RETRY_MS)
        while True:
            kind, data = await self.queue.get()
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
        self.tasks: set[asyncio.Task[None]] = set()
        self.draining = False
        for topic in (AUDIT, VERIFICATION):
            db.on(topic, lambda ids, kind=topic: self.announced(kind, ids))

    def subscribe(self) -> Subscriber | None:
        if self.draining or len(self.subscribers) >= MAX_SUBSCRIBERS:
            return None
        subscriber = Subscriber()
        self.subscribers.add(subscriber)
        self.metrics.feed_subscribers.inc()
        return subscriber

    def unsubscribe(self, subscriber: Subscriber) -> None:
        if subscriber in self.subscribers:
            self.subscribers.discard(subscriber)
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
            try:
                subscriber.queue.put_nowait((kind, data))
            except asyncio.QueueFull:
                subscriber.dropped += 1
                self.metrics.feed_dropped.inc()

    def announced(self, kind: str, raw_ids: list[str]) -> None:
        """A transaction committed these rows: fetch and publish them, if anyone is
        listening here."""
        ids = [int(i) for i in raw_ids if i.isdigit()]
        if self.subscribers and ids:
            task = asyncio.get_running_loop().create_task(self._fetch(kind, ids))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)

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


async def subscription(connection: HTTPConnection) -> AsyncIterator[Subscriber]:
    """A place in the feed for the request's whole stream (503 when the feed is full)."""
    feed = feed_of(connection)
    subscriber = feed.subscribe()
    if subscriber is None:
        detail = "shutting down" if feed.draining else "too many live-feed subscribers"
        raise HTTPException(503, detail, headers={"Retry-After": "30"})
    try:
        yield subscriber
    finally:
        feed.unsubscribe(subscriber)
