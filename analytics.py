"""Analytics: rollups maintained at ingestion, and the queries the dashboard charts read.

Every chart reads hourly and daily rollup rows, never the raw log, so its cost depends on the
window's length, not on how many events it holds. A window [since, until) at hour resolution
is read as its leading partial day in hours, its whole days in days, and its trailing partial
day in hours. Unique users come from DataSketches HLL sketches kept at the same two grains.
"""

import asyncio
import bisect
import contextlib
import functools
import logging
import math
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Any

import numpy as np
from datasketches import hll_sketch, hll_union, tgt_hll_type  # pyrefly: ignore[missing-module-attribute]
from sqlalchemy import (
    BigInteger,
    ColumnElement,
    Subquery,
    Table,
    and_,
    cast,
    delete,
    func,
    literal,
    null,
    or_,
    select,
    union_all,
    update,
)
from sqlalchemy.ext.asyncio import AsyncSession

from db import Database, bulk_insert, bulk_update, failure, is_postgres, upsert
from models import (
    ALL_GROUPS,
    COUNTERS,
    LATENCY_COLUMNS,
    LATENCY_EDGES_MS,
    VerificationIn,
    channel_rollup_deltas,
    channel_rollups,
    invalid,
    member_count_deltas,
    member_counts,
    rollup_deltas,
    rollups,
    user_sketch_deltas,
    user_sketches,
    utcnow,
)

log = logging.getLogger("channelgate.analytics")

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
    """Record what newly stored events add to the rollups and sketches, as insert-only delta
    rows in the caller's transaction: a retried batch, whose events are not new, adds
    nothing, and concurrent batches never wait on each other (see `fold`). SQLite's path:
    on PostgreSQL ingest.INGEST counts in SQL, and ingestion calls `add_sketches` alone."""
    if not events:
        return
    width = len(COUNTERS) + len(LATENCY_COLUMNS)
    column = {"passed": 1, "blocked": 2, "error": 3}
    counts: dict[Key, list[int]] = {}
    blocks: dict[tuple[str, int, int, int], int] = defaultdict(int)
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

    names = (*COUNTERS, *LATENCY_COLUMNS)
    rows = [
        {"grain": g, "chat_id": c, "bucket": bucket_time(b), **dict(zip(names, v, strict=True))}
        for (g, c, b), v in counts.items()
    ]
    await insert_rows(session, rollup_deltas, rows)
    rows = [
        {"grain": g, "chat_id": c, "bucket": bucket_time(b), "channel_id": ch, "blocks": n}
        for (g, c, b, ch), n in blocks.items()
    ]
    await insert_rows(session, channel_rollup_deltas, rows)
    await add_sketches(
        session, [(e.chat_id, e.user_id, int(e.occurred_at.timestamp())) for e in events]
    )


async def add_sketches(session: AsyncSession, seen: Iterable[tuple[int, int, int]]) -> None:
    """Record newly stored events' users, (chat id, user id, Unix time) each, as delta
    sketches of their group's and of all groups' hour and day."""
    await insert_rows(session, user_sketch_deltas, sketch_rows(seen))


def sketch_rows(seen: Iterable[tuple[int, int, int]]) -> list[dict[str, Any]]:
    """`add_sketches`'s delta rows."""
    users: dict[Key, list[int]] = defaultdict(list)
    for chat_id, user_id, ts in seen:
        hour, day = ts - ts % 3600, ts - ts % 86400
        users["h", chat_id, hour].append(user_id)
        users["d", chat_id, day].append(user_id)
        users["h", ALL_GROUPS, hour].append(user_id)
        users["d", ALL_GROUPS, day].append(user_id)
    return [
        {"grain": g, "chat_id": c, "bucket": bucket_time(b), "sketch": add_users(None, ids)}
        for (g, c, b), ids in users.items()
    ]


async def insert_rows(session: AsyncSession, table: Table, rows: list[dict[str, Any]]) -> None:
    if rows:
        statement, params = bulk_insert(session, table, rows)
        await session.execute(statement, params)


# ---------------------------------------------------------------- folding

# Each delta table, the table it folds into and that table's unique key; the other columns
# add up. The sketches unite instead (fold_sketches).
SUMMED = (
    (rollup_deltas, rollups, ("grain", "chat_id", "bucket")),
    (channel_rollup_deltas, channel_rollups, ("grain", "chat_id", "bucket", "channel_id")),
    (member_count_deltas, member_counts, ("chat_id",)),
)
DELTAS = {table: deltas for deltas, table, _ in (*SUMMED, (user_sketch_deltas, user_sketches, ()))}
FOLD_ROWS = 20_000  # delta rows of each kind per folding transaction
FOLD_LOCK = 0x63676600  # PostgreSQL advisory lock: one folder at a time, across replicas


async def fold(session: AsyncSession, limit: int | None = FOLD_ROWS) -> int:
    """Merge up to `limit` delta rows of each kind (all with None) into their tables and
    delete them, in the caller's transaction: the merge and the deletion commit together,
    so every delta counts exactly once, and a read (which adds the deltas still there,
    see `pending`) sees each batch exactly once whenever it runs. The caller holds the
    folder's lock (`lock_folding`). Returns how many delta rows were folded; does not
    commit."""
    folded = 0
    for deltas, table, key in SUMMED:
        if is_postgres(session):
            folded += await add_up_in_sql(session, deltas, table, key, limit)
            continue
        rows = await take(session, deltas, key, limit)
        folded += len(rows)
        sums: dict[tuple[Any, ...], list[int]] = {}
        n = len(key)
        for row in rows:
            k = tuple(row[:n])
            total = sums.get(k)
            if total is None:
                sums[k] = list(row[n:])
            else:
                for i, value in enumerate(row[n:]):
                    total[i] += value
        await add_up(session, table, key, sums)
    rows = await take(session, user_sketch_deltas, ("grain", "chat_id", "bucket"), limit)
    folded += len(rows)
    blobs: dict[tuple[str, int, datetime], list[bytes]] = defaultdict(list)
    for grain, chat_id, bucket, sketch in rows:
        blobs[grain, chat_id, bucket].append(sketch)
    await merge_sketches(session, blobs)
    return folded


async def take(
    session: AsyncSession, deltas: Table, key: Sequence[str], limit: int | None
) -> Sequence[Any]:
    """Delete the oldest `limit` delta rows and return them, the `key` columns first."""
    chosen = select(deltas.c.id).order_by(deltas.c.id)
    if limit is not None:
        chosen = chosen.limit(limit)
    rest = [c for c in deltas.c if c.name != "id" and c.name not in key]
    columns = [*(deltas.c[k] for k in key), *rest]
    statement = delete(deltas).where(deltas.c.id.in_(chosen.scalar_subquery()))
    return (await session.execute(statement.returning(*columns))).all()


async def add_up_in_sql(
    session: AsyncSession, deltas: Table, table: Table, key: Sequence[str], limit: int | None
) -> int:
    """`take` and `add_up` on PostgreSQL as one statement: the oldest `limit` delta rows
    deleted and their sums added into `table` in key order, none of them through Python
    (which cost the server ~2 µs an ingested event, py-spy). Returns how many were folded."""
    chosen = select(deltas.c.id).order_by(deltas.c.id)
    if limit is not None:
        chosen = chosen.limit(limit)
    names = [c.name for c in table.c if c.name != "id" and c.name not in key]
    taken = (
        delete(deltas)
        .where(deltas.c.id.in_(chosen.scalar_subquery()))
        .returning(*(deltas.c[n] for n in (*key, *names)))
        .cte("taken")
    )
    keys = [taken.c[k] for k in key]
    sums = select(*keys, *(func.sum(taken.c[n]) for n in names)).group_by(*keys).order_by(*keys)
    added = upsert(session, table).from_select([*key, *names], sums)
    added = added.on_conflict_do_update(
        index_elements=list(key), set_={n: table.c[n] + added.excluded[n] for n in names}
    )
    folded = select(func.count()).select_from(taken).add_cte(added.cte("added"))
    return (await session.execute(folded)).scalar_one()


async def add_up(
    session: AsyncSession, table: Table, key: Sequence[str], sums: dict[tuple[Any, ...], list[int]]
) -> None:
    """Add these sums into `table`'s rows (created where missing), in key order: folders
    and migrations lock rows in the same order, so they never deadlock."""
    if not sums:
        return
    names = [c.name for c in table.c if c.name != "id" and c.name not in key]
    rows = [dict(zip((*key, *names), (*k, *v), strict=True)) for k, v in sorted(sums.items())]
    statement, params = bulk_insert(session, table, rows)
    statement = statement.on_conflict_do_update(
        index_elements=list(key),
        set_={n: table.c[n] + statement.excluded[n] for n in names},
    )
    await session.execute(statement, params)


async def lock_folding(session: AsyncSession, wait: bool = True) -> bool:
    """Take the folder's lock until the transaction ends (PostgreSQL; SQLite has a single
    writer anyway). Without `wait`, False when another transaction holds it."""
    if not is_postgres(session):
        return True
    function = func.pg_advisory_xact_lock if wait else func.pg_try_advisory_xact_lock
    held = (await session.execute(select(function(FOLD_LOCK)))).scalar()
    return wait or bool(held)


async def merge_sketches(
    session: AsyncSession, blobs: dict[tuple[str, int, datetime], list[bytes]]
) -> None:
    """Unite delta sketches into the stored ones: one upsert that creates missing rows and
    locks and returns existing ones (in key order), then one update."""
    if not blobs:
        return
    keys = sorted(blobs)
    rows = [{"grain": g, "chat_id": c, "bucket": b, "sketch": b""} for g, c, b in keys]
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
        {
            "id": row.id,
            "sketch": unite(
                [row.sketch, *blobs[row.grain, row.chat_id, row.bucket]]
            ).serialize_compact(),
        }
        for row in current
    ]
    await bulk_update(session, user_sketches, updates)


async def fold_everything(db: Database) -> int:
    """Fold every delta there is, pass after pass (for a process that ingested without a
    folder running: seed-demo, the benchmarks); returns how many rows were folded."""
    total = 0
    while True:
        async with db.sessionmaker() as session:
            await lock_folding(session)
            folded = await fold(session)
            await session.commit()
        total += folded
        if not folded:
            return total


async def folder(db: Database, every: float, stopping: asyncio.Event) -> None:
    """The background folder of one process: a pass every `every` seconds, another at once
    after a full one, until `stopping` is set (between passes: a pass cancelled mid-commit
    can leave an SQLite connection holding the write lock). Any replica's folder may fold
    any replica's deltas; the lock lets one fold at a time. A failed pass rolls back whole
    and is tried again at the next."""
    while not stopping.is_set():
        folded = 0
        try:
            async with db.sessionmaker() as session:
                if await lock_folding(session, wait=False):
                    folded = await fold(session)
                    await session.commit()
        except Exception as error:
            if failure(error) is None:
                log.exception("folding rollup deltas failed")
            else:
                log.warning("folding rollup deltas: database unavailable (%s)", error)
        if folded < FOLD_ROWS:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stopping.wait(), every)


async def move_rollups(session: AsyncSession, old: int, new: int) -> None:
    """Re-key a group's rollups and sketches to its new chat id (a migration), merged into
    what the new id holds already: counters and latency histograms add, sketches unite.
    The all-groups sketches saw both ids' users already and stay as they are. The caller
    has folded every delta (ingest.move_chat), so only the tables need moving."""
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


def pending(table: Table) -> Subquery:
    """`table` as reads must see it: its rows and the delta rows not folded yet (`fold`),
    which the aggregates add up (or unite); one statement sees each batch once, folded or
    not. Columns the deltas lack are null on their side."""
    deltas = DELTAS[table]
    names = [c.name for c in deltas.c if c.name != "id"]
    missing = [c for c in table.c if c.name != "id" and c.name not in names]
    return union_all(
        select(*[table.c[n] for n in names], *missing),
        select(
            *[deltas.c[n] for n in names], *[cast(null(), c.type).label(c.name) for c in missing]
        ),
    ).subquery(table.name)


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
    r = pending(rollups)
    names = (*COUNTERS, *LATENCY_COLUMNS)
    row = (
        await session.execute(
            select(
                *[func.coalesce(func.sum(r.c[n]), 0) for n in names],
                func.count(func.distinct(r.c.chat_id)),
            ).where(window.where(r), *group_filter(r, chat_id))
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
    sketches = pending(user_sketches)
    scope = ALL_GROUPS if chat_id is None else chat_id
    rows = (
        await session.execute(
            select(sketches.c.sketch, sketches.c.legacy).where(
                window.where(sketches), sketches.c.chat_id == scope
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
    counts = pending(member_counts)
    counted = select(
        func.coalesce(func.sum(counts.c.verified), 0),
        func.coalesce(func.sum(counts.c.restricted), 0),
    ).where(*group_filter(counts, chat_id))
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
    r = pending(rollups)
    rows = await session.execute(
        select(
            r.c.bucket,
            *[func.sum(r.c[n]).label(n) for n in ("checks", "passed", "blocked", "errors")],
        )
        .where(
            r.c.grain == grain,
            r.c.bucket >= since,
            r.c.bucket < until,
            *group_filter(r, chat_id),
        )
        .group_by(r.c.bucket)
    )
    return fill_points(rows, since, until, HOUR if grain == "h" else DAY)


async def top_groups(session: AsyncSession, window: Window, limit: int) -> list[Any]:
    r = pending(rollups)
    checks = func.sum(r.c.checks).label("checks")
    return list(
        await session.execute(
            select(
                r.c.chat_id,
                checks,
                func.sum(r.c.passed).label("passed"),
                func.sum(r.c.blocked).label("blocked"),
            )
            .where(window.where(r))
            .group_by(r.c.chat_id)
            .order_by(checks.desc(), r.c.chat_id)
            .limit(limit)
        )
    )


async def channel_blocks(session: AsyncSession, window: Window, chat_id: int | None) -> list[Any]:
    r = pending(channel_rollups)
    blocks = func.sum(r.c.blocks).label("blocks")
    return list(
        await session.execute(
            select(r.c.channel_id, blocks)
            .where(window.where(r), *group_filter(r, chat_id))
            .group_by(r.c.channel_id)
            .order_by(blocks.desc(), r.c.channel_id)
        )
    )
