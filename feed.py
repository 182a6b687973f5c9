"""The live feed: verifications and audit entries, pushed to dashboard subscribers (SSE).

A committed transaction announces the ids of the rows it wrote: on PostgreSQL with NOTIFY, so
every replica hears it; on SQLite to this process only. A process with subscribers then reads
those rows once and fans them out. Each subscriber has a bounded queue; a slow one loses
events (counted, and told) instead of slowing anyone down.
"""

import asyncio
import logging
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import event, select, text
from sqlalchemy.orm import Session
from sqlmodel import col

from db import Database
from models import AuditLog, AuditPublic, Verification, VerificationPublic

log = logging.getLogger("channelgate.feed")

FEED_CHANNEL = "channelgate_feed"
QUEUE_SIZE = 1000
MAX_SUBSCRIBERS = 1000
IDS_PER_NOTIFY = 500  # keeps each payload under PostgreSQL's 8000-byte limit
KINDS = {"v": "verification", "a": "audit"}
NOTIFY_MANY = text(
    "SELECT pg_notify(:channel, payload) FROM unnest(CAST(:payloads AS text[])) AS payload"
)


@dataclass(eq=False)
class Subscriber:
    queue: asyncio.Queue[tuple[str, str]] = field(default_factory=lambda: asyncio.Queue(QUEUE_SIZE))
    dropped: int = 0


class Feed:
    def __init__(self, db: Database) -> None:
        self.db = db
        self.subscribers: set[Subscriber] = set()
        self.dropped = 0
        self.tasks: set[asyncio.Task[None]] = set()

    def subscribe(self) -> Subscriber | None:
        if len(self.subscribers) >= MAX_SUBSCRIBERS:
            return None
        subscriber = Subscriber()
        self.subscribers.add(subscriber)
        return subscriber

    def unsubscribe(self, subscriber: Subscriber) -> None:
        self.subscribers.discard(subscriber)

    def publish(self, kind: str, data: str) -> None:
        for subscriber in self.subscribers:
            try:
                subscriber.queue.put_nowait((kind, data))
            except asyncio.QueueFull:
                subscriber.dropped += 1
                self.dropped += 1

    def announced(self, payload: str) -> None:
        """A transaction committed rows ("v:1,2,3" or "a:7"): fetch and publish them, if
        anyone is listening here."""
        if not self.subscribers:
            return
        code, _, raw_ids = payload.partition(":")
        ids = [int(i) for i in raw_ids.split(",") if i.isdigit()]
        if code in KINDS and ids:
            task = asyncio.get_running_loop().create_task(self._fetch(KINDS[code], ids))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)

    async def _fetch(self, kind: str, ids: list[int]) -> None:
        try:
            async with self.db.sessionmaker() as session:
                if kind == "verification":
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


def announce(session: Session, code: str, ids: list[int]) -> None:
    """Queue ids for announcement when `session` commits (call inside the transaction)."""
    session.info.setdefault("announce", []).append((code, ids))


@event.listens_for(Session, "before_commit")
def _notify_before_commit(session: Session) -> None:
    audit_rows = session.info.pop("audit_rows", None)
    if audit_rows:
        session.flush()
        announce(session, "a", [row.id for row in audit_rows])
    pending = session.info.get("announce")
    if not pending or session.bind is None or session.bind.dialect.name != "postgresql":
        return
    payloads = [
        f"{code}:{','.join(map(str, ids[i : i + IDS_PER_NOTIFY]))}"
        for code, ids in pending
        for i in range(0, len(ids), IDS_PER_NOTIFY)
    ]
    session.info["announce"] = []
    # One statement however many payloads; delivered to every LISTENer at commit.
    session.execute(NOTIFY_MANY, {"channel": FEED_CHANNEL, "payloads": payloads})


@event.listens_for(Session, "after_commit")
def _publish_after_commit(session: Session) -> None:
    pending = session.info.pop("announce", None)
    feed: Feed | None = session.info.get("feed")
    if pending and feed is not None:  # SQLite: this process is the only one
        for code, ids in pending:
            feed.announced(f"{code}:{','.join(map(str, ids))}")


@event.listens_for(Session, "after_rollback")
def _forget_after_rollback(session: Session) -> None:
    session.info.pop("announce", None)
    session.info.pop("audit_rows", None)


def audit_rows(session: Any) -> list[Any]:
    """Where `routes.audit` registers the rows it adds, for announcement at commit."""
    return session.info.setdefault("audit_rows", [])
