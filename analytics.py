"""Analytics: rollups maintained at ingestion, and the queries the dashboard charts read.

Every chart reads hourly and daily rollup rows, never the raw log, so its cost depends on the
window's length, not on how many events it holds. A window [since, until) at hour resolution
is read as its leading partial day in hours, its whole days in days, and its trailing partial
day in hours. Unique users come from DataSketches HLL sketches kept at the same two grains.
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
from datasketches import hll_sketch, hll_union, tgt_hll_type  # pyrefly: ignore[missing-module-attribute]
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

# ---------------------------------------------------------------- unique-user sketches

# Apache DataSketches HLL (`datasketches`), 2^14 registers at full size. A sketch keeps the
# users' 26-bit hash coupons while they are few (LIST then SET mode, up to ~1,500 users at
# this size) and counts them exactly there; past that it becomes a dense HLL_8 array whose
# estimate is within the library's stated error (get_rel_err: ~0.8 % at one standard
# deviation, ~1.6 % at two). Sketches are stored serialized (compact) and unite across
# hours, days, groups and migrations with `hll_union`.
LG_K = 14
HLL_TYPE = tgt_hll_type.HLL_8
HLL_MODE = 2  # low two bits of the serialized mode byte: 0 LIST, 1 SET, 2 HLL


def sketch_of(blob: bytes | None) -> hll_sketch:
    return hll_sketch.deserialize(blob) if blob else hll_sketch(LG_K, HLL_TYPE)


def add_users(blob: bytes | None, user_ids: Iterable[int]) -> bytes:
    """A stored sketch with more users folded in (seen ones change nothing)."""
    sketch = sketch_of(blob)
    for user_id in user_ids:
        sketch.update(user_id)
    return sketch.serialize_compact()


def unite(blobs: Iterable[bytes | None]) -> hll_sketch:
    """One sketch of the users any of these saw (still exact if the union is small)."""
    union = hll_union(LG_K)
    for blob in blobs:
        if blob:
            union.update(hll_sketch.deserialize(blob))
    return union.get_result(HLL_TYPE)


def count_of(sketch: hll_sketch) -> tuple[int, bool]:
    """(users, estimated): exact while the sketch still holds its coupons."""
    if sketch.is_empty():
        return 0, False
    mode = sketch.serialize_compact()[7] & 3
    return round(sketch.get_estimate()), mode == HLL_MODE


# The sketches written before DataSketches (this module's own HyperLogLog, registers of a
# splitmix64 hash): a migration rebuilt every one whose bucket the raw log still covered;
# those older than the log (see migrations/…_datasketches_user_sketches.py) are kept in
# `legacy` as they were. Their hash differs, so they cannot join a DataSketches union: a
# window that reaches them adds their estimate to the union's (a user seen on both sides
# of the retention horizon counts twice) and says `unique_users_estimated: true`.
LEGACY_P = 14
LEGACY_M = 1 << LEGACY_P
LEGACY_DENSE = b"\x00"


def legacy_registers(blob: bytes | None) -> np.ndarray:
    registers = np.zeros(LEGACY_M, dtype=np.uint8)
    if not blob:
        return registers
    if blob[:1] == LEGACY_DENSE:
        return np.frombuffer(blob, dtype=np.uint8, offset=1).copy()
    count = (len(blob) - 1) // 3
    index = np.frombuffer(blob, dtype=np.uint16, count=count, offset=1)
    registers[index] = np.frombuffer(blob, dtype=np.uint8, offset=1 + 2 * count)
    return registers


def legacy_union(blobs: Iterable[bytes | None]) -> np.ndarray:
    registers = np.zeros(LEGACY_M, dtype=np.uint8)
    for blob in blobs:
        if blob:
            np.maximum(registers, legacy_registers(blob), out=registers)
    return registers


def legacy_estimate(registers: np.ndarray) -> int:
    """Ertl's improved estimator ("New cardinality estimation algorithms for HyperLogLog
    sketches", 2017), as the old sketches were read."""
    q = 64 - LEGACY_P
    m = LEGACY_M
    counts = np.bincount(registers, minlength=q + 2).astype(np.float64)
    z = m * _tau(1 - counts[q + 1] / m)
    for k in range(q, 0, -1):
        z = 0.5 * (z + counts[k])
    z += m * _sigma(counts[0] / m)
    return round(m * m / (2 * math.log(2)) / z) if z else 0


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
    rows = [{"grain": g, "chat_id": c, "bucket": bucket_time(b), "sketch": b""} for g, c, b in keys]
    statement, params = bulk_insert(session, user_sketches, rows)
    statement = statement.on_conflict_do_update(
        index_elements=["grain", "chat_id", "bucket"],
        set_={"sketch": user_sketches.c.sketch},  # a no-op that locks the row
    ).returning(
        user_sketches.c.id,
        user_sketches.c.grain,
        user_sketches.c.chat_id,
        user_sketches.c.bucket,
        user_sketches.c.sketch,
    )
    current = (await session.execute(statement, params)).all()
    updates = [
        {"id": row.id, "sketch": add_users(row.sketch, users[row.grain, row.chat_id, ts])}
        for row in current
        for ts in [int(row.bucket.timestamp())]
    ]
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
        select(
            user_sketches.c.id,
            user_sketches.c.sketch,
            user_sketches.c.legacy,
            theirs.c.id,
            theirs.c.sketch,
            theirs.c.legacy,
        )
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
    for kept, sketch, legacy, old_id, old_sketch, old_legacy in both:
        if legacy is None and old_legacy is None:
            registers = None
        else:
            registers = LEGACY_DENSE + legacy_union([legacy, old_legacy]).tobytes()
        united = unite([sketch, old_sketch]).serialize_compact()
        merged.append({"id": kept, "sketch": united, "legacy": registers})
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


async def unique_users(
    session: AsyncSession, window: Window, chat_id: int | None
) -> tuple[int, bool]:
    """(users, estimated) over the window: exact while the union of its sketches is small
    (see LG_K), else DataSketches' estimate; plus the pre-DataSketches sketches' estimate
    where the window reaches them (always estimated)."""
    scope = ALL_GROUPS if chat_id is None else chat_id
    rows = (
        await session.execute(
            select(user_sketches.c.sketch, user_sketches.c.legacy).where(
                window.where(user_sketches), user_sketches.c.chat_id == scope
            )
        )
    ).all()
    users, estimated = count_of(unite(row.sketch for row in rows))
    legacy = [row.legacy for row in rows if row.legacy is not None]
    if legacy:
        users += legacy_estimate(legacy_union(legacy))
        estimated = True
    return users, estimated


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
