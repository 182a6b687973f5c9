"""Analytics: rollups maintained at ingestion, and the queries the dashboard charts read.

Every chart reads hourly and daily rollup rows, never the raw log, so its cost depends on the
window's length, not on how many events it holds. A window [since, until) at hour resolution
is read as its leading partial day in hours, its whole days in days, and its trailing partial
day in hours. Unique users come from HyperLogLog sketches kept at the same two grains.
"""

import bisect
import functools
import math
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Any

import numpy as np
from sqlalchemy import BigInteger, ColumnElement, and_, delete, func, literal, or_, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from db import bulk_insert, bulk_update, upsert
from models import (
    ALL_GROUPS,
    COUNTERS,
    LATENCY_COLUMNS,
    LATENCY_EDGES_MS,
    VerificationIn,
    channel_rollups,
    invalid,
    member_counts,
    rollups,
    user_sketches,
    utcnow,
)

HOUR = timedelta(hours=1)
DAY = timedelta(days=1)

# ---------------------------------------------------------------- HyperLogLog

P = 14  # 16384 registers: standard error 1.04 / sqrt(2^14) = 0.8 %
M = 1 << P
DENSE, SPARSE = b"\x00", b"\x01"
EMPTY = np.zeros(0, dtype=np.uint8)


def hll_updates(user_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(register index, rank) for each user id: splitmix64 hash, first P bits pick the
    register, the rank is one plus the leading zeros of the remaining 64 - P bits."""
    with np.errstate(over="ignore"):
        z = user_ids.astype(np.uint64) + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    index = (z >> np.uint64(64 - P)).astype(np.intp)
    rest = z & np.uint64((1 << (64 - P)) - 1)
    # frexp gives the exact bit length of values below 2^53 (these are below 2^50).
    _, bit_length = np.frexp(rest.astype(np.float64))
    rank = np.where(rest == 0, 64 - P + 1, (64 - P) - bit_length + 1).astype(np.uint8)
    return index, rank


def decode(blob: bytes | None) -> np.ndarray:
    registers = np.zeros(M, dtype=np.uint8)
    if not blob:
        return registers
    if blob[:1] == DENSE:
        return np.frombuffer(blob, dtype=np.uint8, offset=1).copy()
    count = (len(blob) - 1) // 3
    index = np.frombuffer(blob, dtype=np.uint16, count=count, offset=1)
    registers[index] = np.frombuffer(blob, dtype=np.uint8, offset=1 + 2 * count)
    return registers


def merge(blob: bytes, index: np.ndarray, rank: np.ndarray) -> bytes:
    """A stored sketch with more (register, rank) updates folded in. Sparse sketches (most:
    one group's hour) stay small arrays; only a sketch that grows dense pays for 16 KiB."""
    if not len(index):
        return blob
    if blob[:1] == DENSE:
        registers = np.frombuffer(blob, dtype=np.uint8, offset=1).copy()
        np.maximum.at(registers, index, rank)
        return DENSE + registers.tobytes()
    count = (len(blob) - 1) // 3 if blob else 0
    old_index = np.frombuffer(blob, dtype=np.uint16, count=count, offset=1) if count else EMPTY
    old_rank = np.frombuffer(blob, dtype=np.uint8, offset=1 + 2 * count) if count else EMPTY
    all_index = np.concatenate([old_index.astype(np.intp), index])
    all_rank = np.concatenate([old_rank.astype(np.uint8), rank])
    order = np.lexsort((all_rank, all_index))  # by register, then rank: the max comes last
    all_index, all_rank = all_index[order], all_rank[order]
    last = np.append(all_index[1:] != all_index[:-1], True)
    all_index, all_rank = all_index[last], all_rank[last]
    if len(all_index) * 3 < M:
        return SPARSE + all_index.astype(np.uint16).tobytes() + all_rank.tobytes()
    registers = np.zeros(M, dtype=np.uint8)
    registers[all_index] = all_rank
    return DENSE + registers.tobytes()


def union(blob: bytes, other: bytes) -> bytes:
    """One sketch of the users either saw: `other`'s registers folded into `blob` as a
    batch's are (the larger rank wins in each register)."""
    registers = decode(other)
    index = np.flatnonzero(registers)
    return merge(blob, index, registers[index])


def estimate(registers: np.ndarray) -> int:
    """Ertl's improved estimator ("New cardinality estimation algorithms for HyperLogLog
    sketches", 2017): no switch between linear counting and the raw formula, so no bias bump
    around 2.5 x M users where the classic one overcounts by up to ~4 %."""
    q = 64 - P
    counts = np.bincount(registers, minlength=q + 2).astype(np.float64)
    z = M * _tau(1 - counts[q + 1] / M)
    for k in range(q, 0, -1):
        z = 0.5 * (z + counts[k])
    z += M * _sigma(counts[0] / M)
    return round(M * M / (2 * math.log(2)) / z) if z else 0


def _sigma(x: float) -> float:
    if x == 1.0:
        return math.inf
    y, z = 1.0, x
    while True:
        x *= x
        previous = z
        z += x * y
        y += y
        if z == previous:
            return z


def _tau(x: float) -> float:
    if x in (0.0, 1.0):
        return 0.0
    y, z = 1.0, 1.0 - x
    while True:
        x = math.sqrt(x)
        previous = z
        y *= 0.5
        z -= (1 - x) ** 2 * y
        if z == previous:
            return z / 3


# ---------------------------------------------------------------- ingestion side


def latency_bucket(latency_ms: int) -> int:
    return bisect.bisect_right(LATENCY_EDGES_MS, latency_ms)


def floor_hour(at: datetime) -> datetime:
    return at.astimezone(UTC).replace(minute=0, second=0, microsecond=0)


def floor_day(at: datetime) -> datetime:
    return floor_hour(at).replace(hour=0)


@functools.lru_cache(maxsize=4096)
def bucket_time(timestamp: int) -> datetime:
    return datetime.fromtimestamp(timestamp, UTC)


Key = tuple[str, int, int]  # (grain, chat id, bucket start as a Unix timestamp)


async def update_rollups(session: AsyncSession, events: Sequence[VerificationIn]) -> None:
    """Fold newly stored events into the rollups, in the caller's transaction (so a retried
    batch, whose events are not new, never counts twice)."""
    if not events:
        return
    width = len(COUNTERS) + len(LATENCY_COLUMNS)
    column = {"passed": 1, "blocked": 2, "error": 3}
    counts: dict[Key, list[int]] = {}
    blocks: dict[tuple[str, int, int, int], int] = defaultdict(int)
    users: dict[Key, list[int]] = defaultdict(list)
    for e in events:
        ts = int(e.occurred_at.timestamp())
        latency = len(COUNTERS) + latency_bucket(e.latency_ms)
        for key in (("h", e.chat_id, ts - ts % 3600), ("d", e.chat_id, ts - ts % 86400)):
            row = counts.get(key)
            if row is None:
                row = counts[key] = [0] * width
            row[0] += 1
            row[column[e.result]] += 1
            row[4] += e.cached
            row[latency] += 1
            if e.result == "blocked":
                for channel_id in set(e.missing_channel_ids):
                    blocks[key[0], key[1], key[2], channel_id] += 1
            users[key].append(e.user_id)
            users[key[0], ALL_GROUPS, key[2]].append(e.user_id)

    names = (*COUNTERS, *LATENCY_COLUMNS)
    rows = [
        {"grain": g, "chat_id": c, "bucket": bucket_time(b), **dict(zip(names, v, strict=True))}
        for (g, c, b), v in sorted(counts.items())
    ]
    statement, params = bulk_insert(session, rollups, rows)
    statement = statement.on_conflict_do_update(
        index_elements=["grain", "chat_id", "bucket"],
        set_={n: rollups.c[n] + statement.excluded[n] for n in names},
    )
    await session.execute(statement, params)

    if blocks:
        rows = [
            {"grain": g, "chat_id": c, "bucket": bucket_time(b), "channel_id": ch, "blocks": n}
            for (g, c, b, ch), n in sorted(blocks.items())
        ]
        statement, params = bulk_insert(session, channel_rollups, rows)
        statement = statement.on_conflict_do_update(
            index_elements=["grain", "chat_id", "bucket", "channel_id"],
            set_={"blocks": channel_rollups.c.blocks + statement.excluded.blocks},
        )
        await session.execute(statement, params)

    await merge_sketches(session, users)


async def merge_sketches(session: AsyncSession, users: dict[Key, list[int]]) -> None:
    """Read-modify-write of the touched sketches: one upsert that creates missing rows and
    locks and returns existing ones (in key order, the same for every batch: no deadlocks),
    then one update. Last in the transaction, so the all-groups rows are locked briefly."""
    keys = sorted(users)
    rows = [
        {"grain": g, "chat_id": c, "bucket": bucket_time(b), "registers": b""} for g, c, b in keys
    ]
    statement, params = bulk_insert(session, user_sketches, rows)
    statement = statement.on_conflict_do_update(
        index_elements=["grain", "chat_id", "bucket"],
        set_={"registers": user_sketches.c.registers},  # a no-op that locks the row
    ).returning(
        user_sketches.c.id,
        user_sketches.c.grain,
        user_sketches.c.chat_id,
        user_sketches.c.bucket,
        user_sketches.c.registers,
    )
    current = (await session.execute(statement, params)).all()
    # Hash every user of the batch once; each sketch then takes its users' (index, rank).
    all_users = np.fromiter({u for ids in users.values() for u in ids}, dtype=np.int64)
    index, rank = hll_updates(all_users)
    position = {int(u): i for i, u in enumerate(all_users)}
    updates = []
    for row in current:
        members = users[row.grain, row.chat_id, int(row.bucket.timestamp())]
        at = [position[u] for u in members]
        updates.append({"id": row.id, "registers": merge(row.registers, index[at], rank[at])})
    await bulk_update(session, user_sketches, updates)


async def move_rollups(session: AsyncSession, old: int, new: int) -> None:
    """Re-key a group's rollups and sketches to its new chat id (a migration), merged into
    what the new id holds already: counters and latency histograms add, sketches unite.
    The all-groups sketches saw both ids' users already and stay as they are."""
    for table in (rollups, channel_rollups):
        key = ["grain", "bucket", *(["channel_id"] if table is channel_rollups else [])]
        counted = [c.name for c in table.c if c.name not in {"id", "chat_id", *key}]
        moved = select(
            *[table.c[k] for k in key], literal(new, BigInteger), *[table.c[n] for n in counted]
        ).where(table.c.chat_id == old)
        statement = upsert(session, table).from_select([*key, "chat_id", *counted], moved)
        statement = statement.on_conflict_do_update(
            index_elements=[*key, "chat_id"],
            set_={n: table.c[n] + statement.excluded[n] for n in counted},
        )
        await session.execute(statement)
        await session.execute(delete(table).where(table.c.chat_id == old))

    theirs = user_sketches.alias("theirs")
    both = await session.execute(
        select(user_sketches.c.id, user_sketches.c.registers, theirs.c.id, theirs.c.registers)
        .join(
            theirs,
            and_(
                theirs.c.chat_id == old,
                theirs.c.grain == user_sketches.c.grain,
                theirs.c.bucket == user_sketches.c.bucket,
            ),
        )
        .where(user_sketches.c.chat_id == new)
    )
    merged, gone = [], []
    for kept, registers, old_id, old_registers in both:
        merged.append({"id": kept, "registers": union(registers, old_registers)})
        gone.append(old_id)
    await bulk_update(session, user_sketches, merged)
    await session.execute(delete(user_sketches).where(user_sketches.c.id.in_(gone)))
    await session.execute(
        update(user_sketches).where(user_sketches.c.chat_id == old).values(chat_id=new)
    )


# ---------------------------------------------------------------- windows


@dataclass(frozen=True)
class Window:
    since: datetime
    until: datetime

    @classmethod
    def of(cls, since: datetime | None, until: datetime | None, grain: str = "h") -> "Window":
        """The window a request asks for: truncated to its hours (days for grain "d"),
        by default the 7 days ending at the end of the current hour; 422 if empty."""
        floor, step = (floor_hour, HOUR) if grain == "h" else (floor_day, DAY)
        end = floor(until) if until is not None else floor(utcnow()) + step
        start = floor(since) if since is not None else end - timedelta(days=7)
        if start >= end:
            raise invalid(
                ("query", "since"), "must be before until (after truncation to the bucket)"
            )
        return cls(start, end)

    def parts(self) -> list[tuple[str, datetime, datetime]]:
        """(grain, from, to) ranges covering the window with as few rows as possible."""
        first_day = floor_day(self.since)
        if first_day < self.since:
            if first_day.date() == date.max:  # a window inside 9999-12-31: no whole day
                return [("h", self.since, self.until)]
            first_day += DAY
        last_day = floor_day(self.until)
        if first_day >= last_day:
            return [("h", self.since, self.until)]
        parts = []
        if self.since < first_day:
            parts.append(("h", self.since, first_day))
        parts.append(("d", first_day, last_day))
        if last_day < self.until:
            parts.append(("h", last_day, self.until))
        return parts

    def where(self, table: Any) -> ColumnElement[bool]:
        return or_(
            *[
                and_(table.c.grain == g, table.c.bucket >= a, table.c.bucket < b)
                for g, a, b in self.parts()
            ]
        )


def group_filter(table: Any, chat_id: int | None) -> list[ColumnElement[bool]]:
    return [] if chat_id is None else [table.c.chat_id == chat_id]


def rate(part: int, whole: int) -> float | None:
    return part / whole if whole else None


def percentile(histogram: Sequence[int], fraction: float) -> float | None:
    """The latency below which `fraction` of checks fell, interpolated inside its bucket."""
    total = sum(histogram)
    if not total:
        return None
    target = fraction * total
    seen = 0
    for i, count in enumerate(histogram):
        if count and seen + count >= target:
            low = 0 if i == 0 else LATENCY_EDGES_MS[i - 1]
            if i == len(LATENCY_EDGES_MS):
                return float(low)  # open-ended last bucket: report its lower edge
            high = LATENCY_EDGES_MS[i]
            return round(low + (high - low) * (target - seen) / count, 1)
        seen += count
    return None


async def counters(session: AsyncSession, window: Window, chat_id: int | None) -> dict[str, Any]:
    names = (*COUNTERS, *LATENCY_COLUMNS)
    row = (
        await session.execute(
            select(
                *[func.coalesce(func.sum(rollups.c[n]), 0) for n in names],
                func.count(func.distinct(rollups.c.chat_id)),
            ).where(window.where(rollups), *group_filter(rollups, chat_id))
        )
    ).one()
    sums = dict(zip(names, (int(v) for v in row[: len(names)]), strict=True))
    return {**sums, "active_groups": int(row[len(names)])}


async def unique_users(session: AsyncSession, window: Window, chat_id: int | None) -> int:
    scope = ALL_GROUPS if chat_id is None else chat_id
    blobs = await session.scalars(
        select(user_sketches.c.registers).where(
            window.where(user_sketches), user_sketches.c.chat_id == scope
        )
    )
    registers = np.zeros(M, dtype=np.uint8)
    for blob in blobs:
        np.maximum(registers, decode(blob), out=registers)
    return estimate(registers)


async def member_totals(session: AsyncSession, chat_id: int | None) -> tuple[int, int]:
    """(verified, restricted) members now, of one group or of all, from the kept counts."""
    counted = select(
        func.coalesce(func.sum(member_counts.c.verified), 0),
        func.coalesce(func.sum(member_counts.c.restricted), 0),
    ).where(*group_filter(member_counts, chat_id))
    verified, restricted = (await session.execute(counted)).one()
    return int(verified), int(restricted)


def fill_points(
    rows: Iterable[Any], since: datetime, until: datetime, step: timedelta
) -> list[dict[str, Any]]:
    found = {row.bucket: row for row in rows}
    points = []
    t = since
    while t < until:
        row = found.get(t)
        points.append(
            {
                "t": t,
                "checks": int(row.checks) if row else 0,
                "passed": int(row.passed) if row else 0,
                "blocked": int(row.blocked) if row else 0,
                "errors": int(row.errors) if row else 0,
            }
        )
        t += step
    return points


async def timeseries(
    session: AsyncSession, grain: str, since: datetime, until: datetime, chat_id: int | None
) -> list[dict[str, Any]]:
    rows = await session.execute(
        select(
            rollups.c.bucket,
            *[func.sum(rollups.c[n]).label(n) for n in ("checks", "passed", "blocked", "errors")],
        )
        .where(
            rollups.c.grain == grain,
            rollups.c.bucket >= since,
            rollups.c.bucket < until,
            *group_filter(rollups, chat_id),
        )
        .group_by(rollups.c.bucket)
    )
    return fill_points(rows, since, until, HOUR if grain == "h" else DAY)


async def top_groups(session: AsyncSession, window: Window, limit: int) -> list[Any]:
    checks = func.sum(rollups.c.checks).label("checks")
    return list(
        await session.execute(
            select(
                rollups.c.chat_id,
                checks,
                func.sum(rollups.c.passed).label("passed"),
                func.sum(rollups.c.blocked).label("blocked"),
            )
            .where(window.where(rollups))
            .group_by(rollups.c.chat_id)
            .order_by(checks.desc(), rollups.c.chat_id)
            .limit(limit)
        )
    )


async def channel_blocks(session: AsyncSession, window: Window, chat_id: int | None) -> list[Any]:
    blocks = func.sum(channel_rollups.c.blocks).label("blocks")
    return list(
        await session.execute(
            select(channel_rollups.c.channel_id, blocks)
            .where(window.where(channel_rollups), *group_filter(channel_rollups, chat_id))
            .group_by(channel_rollups.c.channel_id)
            .order_by(blocks.desc(), channel_rollups.c.channel_id)
        )
    )
