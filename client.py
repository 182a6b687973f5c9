"""channelgate's client for bot authors: the bot API with the caching, batching, retries and
outage handling a bot needs, on httpx alone (nothing of the server is imported).

    async with Client("https://gate.example.org", key) as gate:
        policy = await gate.policy(chat_id)          # cached, revalidated with If-None-Match
        state = await gate.member(chat_id, user_id)  # skip Telegram while fresh_until holds
        gate.record(chat_id, user_id, "passed", "message")  # returns at once; delivered later

- `policy()` keeps each group's policy for `policy_ttl` seconds, then revalidates it with its
  ETag (a 304 keeps the body). While channelgate cannot answer, the last policy keeps being
  served (`stale_policies` counts it); with none cached, `Unavailable` is raised.
- `member()` answers from memory while a `verified` state is fresh; `record()` of a check
  updates that memory too, so a busy group's messages cost no call at all.
- `record()` gives the event its `event_id` at once and queues it. A background task writes
  queued events to a SQLite spool (one transaction per batch), sends the oldest ≤ 1000 in
  one request, and deletes them once channelgate acknowledged them: events survive outages
  and restarts, and are counted exactly once (the server ignores an `event_id` it has).
  Failures are retried with exponential backoff and jitter, honouring `Retry-After`.
- Bounds: at most `queue_limit` events wait in memory and `spool_limit` in the spool. Past
  either, the *oldest* events are dropped and counted (`dropped`): the newest checks decide
  member states, the oldest are history. An event the server refuses as invalid (422) is
  dropped and counted too (`rejected`), so one bad event never blocks the rest.
- Events still in memory when the process dies without `close()` (at most `batch_interval`
  of them) are lost; `close()` spools and delivers what it can within its timeout.
"""

import asyncio
import contextlib
import json
import logging
import os
import random
import socket
import sqlite3
import threading
import time
import uuid
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, fields
from datetime import UTC, datetime, timedelta
from typing import Any, Literal, Self

import httpx

__all__ = [
    "ChannelRef",
    "ChannelgateError",
    "Client",
    "Delivery",
    "GroupRef",
    "GroupStats",
    "IngestResult",
    "MemberState",
    "Policy",
    "Unavailable",
]

log = logging.getLogger("channelgate.client")

VERSION = "channelgate-client/1"
BATCH_LIMIT = 1000  # the server's limit per POST /bot/verifications
RETRY_STATUSES = frozenset({408, 429, 500, 502, 503, 504})

Result = Literal["passed", "blocked", "error"]
Trigger = Literal["message", "join", "button", "channel_leave", "recheck"]


# ---------------------------------------------------------------- errors


class ChannelgateError(Exception):
    """channelgate answered with an error: `status` and the problem+json body (`problem`)."""

    def __init__(self, status: int, problem: dict[str, Any] | None = None) -> None:
        self.status = status
        self.problem = problem or {}
        self.title = str(self.problem.get("title", ""))
        self.detail = str(self.problem.get("detail", ""))
        self.retry_after: float | None = None
        super().__init__(f"{status} {self.title}: {self.detail}".strip(": "))


class Unavailable(ChannelgateError):
    """channelgate could not be reached, or answered 429/503 through every retry."""


# ---------------------------------------------------------------- typed results


def _time(value: str | None) -> datetime | None:
    return None if value is None else datetime.fromisoformat(value)


class Model:
    """A result of the API: a plain dataclass built from its JSON (unknown fields ignored, so
    a newer server does not break an older client). tests/test_client.py checks every model
    against the OpenAPI document."""

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Self:
        values = {}
        for f in fields(cls):  # pyrefly: ignore[bad-argument-type]
            value = data[f.name]
            if f.name in cls.nested():
                value = [cls.nested()[f.name].from_json(v) for v in value]
            elif f.name in cls.times():
                value = _time(value)
            values[f.name] = value
        return cls(**values)

    @classmethod
    def nested(cls) -> dict[str, type["Model"]]:
        return {}

    @classmethod
    def times(cls) -> frozenset[str]:
        return frozenset()


@dataclass(frozen=True, slots=True)
class ChannelRef(Model):
    chat_id: int
    title: str
    username: str | None
    invite_link: str | None


@dataclass(frozen=True, slots=True)
class Policy(Model):
    """A group's policy, the fields of API.md's group settings."""

    chat_id: int
    active: bool
    version: int
    mode: Literal["all", "any"]
    action: Literal["mute", "delete", "kick", "warn"]
    mute_seconds: int
    warning_text: str
    warning_ttl_seconds: int
    check_on_join: bool
    on_error: Literal["allow", "block"]
    exempt_user_ids: list[int]
    recheck_seconds: int
    channels: list[ChannelRef]

    @classmethod
    def nested(cls) -> dict[str, type[Model]]:
        return {"channels": ChannelRef}


@dataclass(frozen=True, slots=True)
class MemberState(Model):
    status: Literal["verified", "restricted", "unknown"]
    verified_at: datetime | None
    restricted_at: datetime | None
    fresh_until: datetime | None

    @classmethod
    def times(cls) -> frozenset[str]:
        return frozenset({"verified_at", "restricted_at", "fresh_until"})

    def fresh(self, now: datetime | None = None) -> bool:
        """Verified, and recently enough that Telegram need not be asked again."""
        return (
            self.status == "verified"
            and self.fresh_until is not None
            and self.fresh_until > (now or datetime.now(UTC))
        )


@dataclass(frozen=True, slots=True)
class GroupRef(Model):
    chat_id: int
    title: str


@dataclass(frozen=True, slots=True)
class Channel(Model):
    chat_id: int
    title: str
    username: str | None
    invite_link: str | None
    group_count: int
    subscriber_count: int | None
    created_at: datetime
    updated_at: datetime
    version: int
    groups: list[GroupRef]

    @classmethod
    def nested(cls) -> dict[str, type[Model]]:
        return {"groups": GroupRef}

    @classmethod
    def times(cls) -> frozenset[str]:
        return frozenset({"created_at", "updated_at"})


@dataclass(frozen=True, slots=True)
class GroupStats(Model):
    verified_members: int
    restricted_members: int
    checks_24h: int
    pass_rate_24h: float | None


@dataclass(frozen=True, slots=True)
class IngestResult(Model):
    accepted: int
    duplicates: int


# ---------------------------------------------------------------- the spool


class Spool:
    """Undelivered events in a SQLite file, oldest first. Used from one task at a time (the
    delivery loop), each call in a worker thread so the event loop never waits on the disk."""

    def __init__(self, path: str) -> None:
        # A lock, because close() may spool while a cancelled delivery's thread finishes.
        self.lock = threading.Lock()
        self.connection = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self.connection.execute("PRAGMA journal_mode=WAL")
        self.connection.execute("PRAGMA synchronous=NORMAL")
        self.connection.execute(
            "CREATE TABLE IF NOT EXISTS channelgate_spool"
            " (seq INTEGER PRIMARY KEY AUTOINCREMENT, event TEXT NOT NULL)"
        )
        self.size = self.connection.execute("SELECT count(*) FROM channelgate_spool").fetchone()[0]

    def add(self, events: list[str], limit: int) -> int:
        """Append events; past `limit`, drop the oldest. Returns how many were dropped."""
        with self.lock, self.connection:
            self.connection.execute("BEGIN IMMEDIATE")
            self.connection.executemany(
                "INSERT INTO channelgate_spool (event) VALUES (?)", [(e,) for e in events]
            )
            self.size += len(events)
            dropped = max(0, self.size - limit)
            if dropped:
                self.connection.execute(
                    "DELETE FROM channelgate_spool WHERE seq IN"
                    " (SELECT seq FROM channelgate_spool ORDER BY seq LIMIT ?)",
                    (dropped,),
                )
                self.size -= dropped
        return dropped

    def oldest(self, limit: int) -> list[tuple[int, str]]:
        with self.lock:
            return self.connection.execute(
                "SELECT seq, event FROM channelgate_spool ORDER BY seq LIMIT ?", (limit,)
            ).fetchall()

    def remove(self, seqs: list[int]) -> None:
        with self.lock, self.connection:
            self.connection.execute("BEGIN IMMEDIATE")
            removed = self.connection.executemany(
                "DELETE FROM channelgate_spool WHERE seq = ?", [(s,) for s in seqs]
            ).rowcount
            self.size -= removed

    def close(self) -> None:
        with self.lock:
            self.connection.close()


# ---------------------------------------------------------------- the client


@dataclass
class Delivery:
    """What the client did with events so far; sent with every heartbeat."""

    queued: int = 0  # waiting in memory
    spooled: int = 0  # in the spool, not acknowledged yet
    delivered: int = 0  # acknowledged by channelgate (new or duplicate)
    duplicates: int = 0  # acknowledged as already stored (a retry after a lost answer)
    retries: int = 0  # requests sent again after a failure
    dropped: int = 0  # oldest events dropped past queue_limit or spool_limit
    rejected: int = 0  # events channelgate refused as invalid
    policy_hits: int = 0  # policy() answered from memory
    policy_calls: int = 0  # policy() asked channelgate (304s included)
    stale_policies: int = 0  # policy() answered from memory because channelgate could not
    member_hits: int = 0
    member_calls: int = 0

    def as_stats(self) -> dict[str, float]:
        return {f.name: float(getattr(self, f.name)) for f in fields(self)}


@dataclass
class _Cached:
    policy: Policy | None  # None: no such group
    etag: str | None
    checked: float  # time.monotonic() of the last answer


@dataclass
class _Backoff:
    base: float = 0.2
    cap: float = 30.0
    failures: int = 0

    def delay(self, retry_after: float | None = None) -> float:
        """Full jitter (AWS's "exponential backoff and jitter"); a `Retry-After` is a floor."""
        self.failures += 1
        delay = random.uniform(0, min(self.cap, self.base * 2**self.failures))  # noqa: S311
        return max(delay, retry_after or 0.0)


def _instance_id() -> str:
    host = "".join(c for c in socket.gethostname() if c.isalnum() or c in "._-")[:40]
    return f"{host or 'bot'}:{os.getpid()}"


def _retry_after(response: httpx.Response) -> float | None:
    try:
        return min(float(response.headers["Retry-After"]), 300.0)
    except (KeyError, ValueError):
        return None


@dataclass
class _Options:
    policy_ttl: float = 2.0
    member_cache_size: int = 100_000
    batch_interval: float = 1.0
    queue_limit: int = 100_000
    spool_limit: int = 1_000_000
    heartbeat_interval: float = 30.0
    attempts: int = 3  # for calls a handler awaits; event delivery retries forever
    version: str = VERSION
    instance_id: str = field(default_factory=_instance_id)


class Client:
    """One bot process's connection to channelgate. Use it as an async context manager (or
    call `start()` and `close()`); `record()` needs the running loop `start()` was called in."""

    def __init__(
        self,
        url: str,
        key: str,
        *,
        spool_path: str = "channelgate-spool.sqlite3",
        transport: httpx.AsyncBaseTransport | None = None,
        timeout: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
        **options: Any,
    ) -> None:
        self.options = _Options(**options)
        self.stats = Delivery()
        self.http = httpx.AsyncClient(
            base_url=url.rstrip("/") + "/api/v1/bot",
            headers={"Authorization": f"Bearer {key}", "User-Agent": self.options.version},
            transport=transport,
            timeout=timeout,
        )
        self.spool_path = spool_path
        self.clock = clock
        self.started_at = datetime.now(UTC)
        self._policies: dict[int, _Cached] = {}
        self._fetching: dict[int, asyncio.Future[Policy | None]] = {}
        self._members: OrderedDict[tuple[int, int], MemberState] = OrderedDict()
        self._queue: deque[str] = deque()
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._spool: Spool | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._in_transit = 0
        self._closing = False

    # ------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        self._spool = await asyncio.to_thread(Spool, self.spool_path)
        self.stats.spooled = self._spool.size
        self._tasks = [
            asyncio.create_task(self._deliver_forever(), name="channelgate-delivery"),
            asyncio.create_task(self._heartbeat_forever(), name="channelgate-heartbeat"),
        ]

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.close()

    async def flush(self, within: float | None = None) -> bool:
        """Wait until every recorded event is acknowledged; False if `within` seconds ran out first
        (they stay spooled and are delivered later, or after a restart)."""
        self._idle.clear()
        self._wake.set()
        try:
            async with asyncio.timeout(within):
                while self._queue or self._in_transit or (self._spool and self._spool.size):
                    self._idle.clear()
                    self._wake.set()
                    await self._idle.wait()
        except TimeoutError:
            return False
        return True

    async def close(self, within: float = 5.0) -> None:
        """Deliver what can be delivered `within` seconds, spool the rest, and stop."""
        if self._closing:
            return
        await self.flush(within)
        self._closing = True
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._spool is not None:
            await self._spool_queued()  # whatever came in after flush gave up
            self._spool.close()
        await self.http.aclose()

    # ------------------------------------------------------------ requests

    async def _call(
        self,
        method: str,
        path: str,
        *,
        ok: Iterable[int] = (200,),
        attempts: int | None = None,
        **kwargs: Any,
    ) -> httpx.Response:
        """One API call, retried on transport errors, 429 and 5xx (with backoff, honouring
        Retry-After); any other error status raises ChannelgateError with its problem."""
        backoff = _Backoff()
        attempts = attempts or self.options.attempts
        for attempt in range(1, attempts + 1):
            try:
                response = await self.http.request(method, path, **kwargs)
            except httpx.TransportError as error:
                if attempt == attempts:
                    raise Unavailable(0, {"title": "Unreachable", "detail": str(error)}) from error
                self.stats.retries += 1
                await asyncio.sleep(backoff.delay())
                continue
            if response.status_code in ok:
                return response
            problem = _problem(response)
            if response.status_code in RETRY_STATUSES:
                if attempt == attempts:
                    error = Unavailable(response.status_code, problem)
                    error.retry_after = _retry_after(response)
                    raise error
                self.stats.retries += 1
                await asyncio.sleep(min(backoff.delay(_retry_after(response)), 10.0))
                continue
            raise ChannelgateError(response.status_code, problem)
        raise AssertionError("unreachable")  # pragma: no cover

    # ------------------------------------------------------------ policy

    async def policy(self, chat_id: int) -> Policy | None:
        """The group's policy, or None if channelgate does not know the group."""
        cached = self._policies.get(chat_id)
        if cached is not None and self.clock() - cached.checked < self.options.policy_ttl:
            self.stats.policy_hits += 1
            return cached.policy
        # Concurrent messages of one group wait for one request, not one each.
        if (pending := self._fetching.get(chat_id)) is not None:
            return await asyncio.shield(pending)
        future: asyncio.Future[Policy | None] = asyncio.get_running_loop().create_future()
        self._fetching[chat_id] = future
        try:
            result = await self._fetch_policy(chat_id, cached)
            future.set_result(result)
            return result
        except asyncio.CancelledError:
            future.cancel()
            raise
        except Exception as error:
            future.set_exception(error)
            future.exception()  # retrieved: waiters re-raise it, nobody else must
            raise
        finally:
            del self._fetching[chat_id]

    async def _fetch_policy(self, chat_id: int, cached: _Cached | None) -> Policy | None:
        self.stats.policy_calls += 1
        headers = {"If-None-Match": cached.etag} if cached and cached.etag else {}
        try:
            response = await self._call(
                "GET",
                f"/groups/{chat_id}/policy",
                ok=(200, 304, 404),
                headers=headers,
                attempts=1 if cached else None,
            )
        except Unavailable:
            if cached is None:
                raise
            # Serve the last policy we had; ask again after a second, not on every message.
            self.stats.stale_policies += 1
            cached.checked = self.clock() - self.options.policy_ttl + 1.0
            return cached.policy
        if response.status_code == 304 and cached is not None:
            cached.checked = self.clock()
            return cached.policy
        return self._keep_policy(chat_id, response)

    def _keep_policy(self, chat_id: int, response: httpx.Response) -> Policy | None:
        if response.status_code == 404:
            self._policies[chat_id] = _Cached(None, None, self.clock())
            return None
        policy = Policy.from_json(response.json())
        self._policies[chat_id] = _Cached(policy, response.headers.get("ETag"), self.clock())
        return policy

    def forget_policy(self, chat_id: int) -> None:
        """Ask channelgate on the next `policy()` (after the bot changed the group)."""
        self._policies.pop(chat_id, None)

    # ------------------------------------------------------------ members

    async def member(self, chat_id: int, user_id: int) -> MemberState:
        """The member's state; a fresh `verified` one is answered from memory."""
        key = (chat_id, user_id)
        state = self._members.get(key)
        if state is not None and state.fresh():
            self.stats.member_hits += 1
            return state
        self.stats.member_calls += 1
        response = await self._call("GET", f"/groups/{chat_id}/members/{user_id}")
        state = MemberState.from_json(response.json())
        self._remember(key, state)
        return state

    def _remember(self, key: tuple[int, int], state: MemberState | None) -> None:
        if state is None or not state.fresh():
            self._members.pop(key, None)
            return
        self._members[key] = state
        self._members.move_to_end(key)
        while len(self._members) > self.options.member_cache_size:
            self._members.popitem(last=False)

    # ------------------------------------------------------------ events

    def record(
        self,
        chat_id: int,
        user_id: int,
        result: Result,
        trigger: Trigger,
        *,
        missing_channel_ids: Iterable[int] = (),
        cached: bool = False,
        latency_ms: int = 0,
        error: str | None = None,
        occurred_at: datetime | None = None,
        event_id: uuid.UUID | None = None,
    ) -> uuid.UUID:
        """Queue one check for delivery and return its `event_id`; never waits."""
        event_id = event_id or uuid.uuid4()
        at = occurred_at or datetime.now(UTC)
        event = {
            "event_id": str(event_id),
            "chat_id": chat_id,
            "user_id": user_id,
            "result": result,
            "trigger": trigger,
            "missing_channel_ids": list(missing_channel_ids),
            "cached": cached,
            "latency_ms": max(0, min(int(latency_ms), 600_000)),
            "error": error[:200] if error else None,
            "occurred_at": at.isoformat(),
        }
        if len(self._queue) >= self.options.queue_limit:
            self._queue.popleft()
            self.stats.dropped += 1
        self._queue.append(json.dumps(event))
        self.stats.queued = len(self._queue)
        if len(self._queue) >= BATCH_LIMIT:
            self._wake.set()
        # What this process just learnt about the member, as the server will store it. A
        # cached pass re-used a verification: it does not make the state fresher.
        if not cached and result != "error":
            self._learn(chat_id, user_id, result, at)
        return event_id

    def _learn(self, chat_id: int, user_id: int, result: Result, at: datetime) -> None:
        if result != "passed":
            self._remember((chat_id, user_id), None)
            return
        entry = self._policies.get(chat_id)
        if entry is None or entry.policy is None:  # recheck_seconds unknown: ask channelgate
            self._remember((chat_id, user_id), None)
            return
        fresh_until = at + timedelta(seconds=entry.policy.recheck_seconds)
        self._remember((chat_id, user_id), MemberState("verified", at, None, fresh_until))

    async def _spool_queued(self) -> None:
        assert self._spool is not None
        if not self._queue:
            return
        events = list(self._queue)
        self._queue.clear()
        self.stats.queued = 0
        self._in_transit = len(events)  # neither queued nor spooled while the thread writes
        try:
            self.stats.dropped += await asyncio.to_thread(
                self._spool.add, events, self.options.spool_limit
            )
        finally:
            self._in_transit = 0
        self.stats.spooled = self._spool.size

    async def _deliver_forever(self) -> None:
        backoff = _Backoff()
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.options.batch_interval):
                    await self._wake.wait()
            self._wake.clear()
            try:
                await self._spool_queued()
                while await self._send_oldest():
                    backoff.failures = 0
                    await self._spool_queued()
                backoff.failures = 0
            except Unavailable as error:
                self.stats.retries += 1
                delay = backoff.delay(error.retry_after)
                log.warning("events not delivered (%s); retrying in %.1f s", error, delay)
                await asyncio.sleep(delay)
                continue
            except ChannelgateError as error:  # 401/403: a revoked key; keep the events
                log.error("events refused (%s); they stay spooled", error)
                await asyncio.sleep(backoff.delay())
                continue
            if not self._queue:
                self._idle.set()

    async def _send_oldest(self) -> bool:
        """Send the oldest spooled batch; True if one was sent and acknowledged."""
        assert self._spool is not None
        rows = await asyncio.to_thread(self._spool.oldest, BATCH_LIMIT)
        if not rows:
            return False
        body = b'{"events":[' + ",".join(e for _, e in rows).encode() + b"]}"
        headers = {"Content-Type": "application/json"}
        response = await self._call(
            "POST", "/verifications", ok=(200, 422), content=body, headers=headers, attempts=1
        )
        seqs = [seq for seq, _ in rows]
        if response.status_code == 422:
            bad = _invalid_indexes(response, len(rows))
            log.error("channelgate refused %d invalid event(s); dropped", len(bad))
            self.stats.rejected += len(bad)
            await asyncio.to_thread(self._spool.remove, [seqs[i] for i in bad])
            self.stats.spooled = self._spool.size
            return True
        result = IngestResult.from_json(response.json())
        await asyncio.to_thread(self._spool.remove, seqs)
        self.stats.delivered += len(rows)
        self.stats.duplicates += result.duplicates
        self.stats.spooled = self._spool.size
        return True

    # ------------------------------------------------------------ heartbeats

    async def heartbeat(self) -> None:
        self.stats.queued = len(self._queue)
        await self._call(
            "POST",
            "/heartbeat",
            ok=(204,),
            json={
                "instance_id": self.options.instance_id,
                "version": self.options.version,
                "started_at": self.started_at.isoformat(),
                "stats": self.stats.as_stats(),
            },
        )

    async def _heartbeat_forever(self) -> None:
        while True:
            try:
                await self.heartbeat()
            except Exception as error:  # a heartbeat is telemetry: never stop sending them
                log.warning("heartbeat failed: %s", error)
            await asyncio.sleep(self.options.heartbeat_interval)

    # ------------------------------------------------------------ registration and links

    async def register_group(
        self,
        chat_id: int,
        title: str,
        *,
        username: str | None = None,
        member_count: int | None = None,
        added_by_user_id: int | None = None,
    ) -> Policy:
        """The bot was added to or saw the group: create or refresh it; returns its policy."""
        body = {"title": title, "username": username, "member_count": member_count}
        if added_by_user_id is not None:
            body["added_by_user_id"] = added_by_user_id
        response = await self._call("PUT", f"/groups/{chat_id}", ok=(200, 201), json=body)
        return self._keep(chat_id, response)

    async def register_channel(
        self,
        chat_id: int,
        title: str,
        *,
        username: str | None = None,
        invite_link: str | None = None,
        subscriber_count: int | None = None,
    ) -> Channel:
        body = {
            "title": title,
            "username": username,
            "invite_link": invite_link,
            "subscriber_count": subscriber_count,
        }
        response = await self._call("PUT", f"/channels/{chat_id}", ok=(200, 201), json=body)
        return Channel.from_json(response.json())

    async def link(self, chat_id: int, channel_id: int) -> Policy:
        response = await self._call(
            "PUT", f"/groups/{chat_id}/channels/{channel_id}", ok=(200, 201)
        )
        return self._keep(chat_id, response)

    async def unlink(self, chat_id: int, channel_id: int) -> None:
        await self._call("DELETE", f"/groups/{chat_id}/channels/{channel_id}", ok=(204,))
        self.forget_policy(chat_id)

    async def migrate(self, chat_id: int, new_chat_id: int) -> Policy:
        """A basic group became a supergroup: move everything to the new id."""
        response = await self._call(
            "POST", f"/groups/{chat_id}/migrate", json={"new_chat_id": new_chat_id}
        )
        self.forget_policy(chat_id)
        for key in [k for k in self._members if k[0] == chat_id]:
            self._members[(new_chat_id, key[1])] = self._members.pop(key)
        return self._keep(new_chat_id, response)

    async def channel_groups(self, channel_id: int) -> list[int]:
        """The active groups that require this channel (for a user who left it)."""
        response = await self._call("GET", f"/channels/{channel_id}/groups")
        return [item["chat_id"] for item in response.json()["items"]]

    async def group_stats(self, chat_id: int) -> GroupStats:
        response = await self._call("GET", f"/groups/{chat_id}/stats")
        return GroupStats.from_json(response.json())

    def _keep(self, chat_id: int, response: httpx.Response) -> Policy:
        policy = self._keep_policy(chat_id, response)
        assert policy is not None
        return policy


def _problem(response: httpx.Response) -> dict[str, Any]:
    try:
        body = response.json()
    except ValueError:
        return {"title": response.reason_phrase, "status": response.status_code}
    return body if isinstance(body, dict) else {"status": response.status_code}


def _invalid_indexes(response: httpx.Response, size: int) -> list[int]:
    """The events a 422 names (`loc: ["body", "events", i, ...]`); all of them if it names
    none (a malformed batch, which this client does not send)."""
    named = {
        e["loc"][2]
        for e in _problem(response).get("errors", [])
        if len(e.get("loc", ())) > 2 and e["loc"][1] == "events" and isinstance(e["loc"][2], int)
    }
    return sorted(i for i in named if 0 <= i < size) or list(range(size))
