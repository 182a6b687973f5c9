"""The raw log's time partitions on PostgreSQL: one per week (Monday to Monday, UTC) of
`occurred_at`.

`verifications` is range-partitioned on `occurred_at` (migration 3f1d0c9a7b22). A partition is
made for every week from the retention horizon to DAYS_AHEAD days ahead, by the service (at
start, then every CHECK_SECONDS, `keeper`) and by `channelgate purge`; never by hand.
An event outside every partition (older than the horizon the partitions cover) is stored in
`verifications_default`, and moved into its week's partition if that is made later.
Retention (`channelgate purge`) detaches and drops whole weeks, and deletes rows only from the
default partition. SQLite keeps one table: everything here is a no-op there.

Weeks, not days: a query the planner cannot prune (a log page without a time filter) plans
and locks every partition and each of its indexes; at 90 days of days that was ~5 ms of
planning a page and ~600 locks a query, with PostgreSQL's shared lock table holding 64 a
connection by default (max_locks_per_transaction). Weeks make it 16 partitions, 99 locks.

A unique key on a partitioned table must contain the partition key, so the log's is
`(occurred_at, event_id)`: a retried event repeats its `occurred_at` with its `event_id`
(the client spools whole events), so idempotency by `event_id` holds (API.md). Time first,
so that random event ids do not scatter the key's inserts (migration c4e8a2d1f6b3).
"""

import asyncio
import contextlib
import logging
import re
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from typing import Any

from sqlalchemy import text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncSession

from db import Database, failure

log = logging.getLogger("channelgate.partitions")

PARENT = "verifications"
DEFAULT = "verifications_default"
NAMED = re.compile(r"verifications_([0-9]{8})")  # a week's partition, named by its Monday
WEEK = timedelta(days=7)
DAYS_AHEAD = 7  # events may be at most 5 minutes ahead; a week's margin for a stopped service
CHECK_SECONDS = 3600.0
# DDL on the log waits this long for its lock, then gives up (and is tried again): queries
# queue behind a waiting ACCESS EXCLUSIVE lock, so the wait is what they may lose.
LOCK_TIMEOUT = "1s"
LOCK = 0x63677000  # advisory: one process changes the partitions at a time
DROP_TRIES = 10


def week_of(at: date | datetime) -> date:
    """The Monday (UTC) that starts the week holding `at`."""
    day = at.astimezone(UTC).date() if isinstance(at, datetime) else at
    return day - timedelta(days=day.weekday())


def partition_of(at: date | datetime) -> str:
    """The name of the partition that holds `at` (once made)."""
    return f"verifications_{week_of(at):%Y%m%d}"


def start_of(day: date) -> datetime:
    return datetime.combine(day, time(), UTC)


def horizon(now: datetime, days: int) -> datetime:
    """Where retention of `days` days cuts: the start of the week holding `now - days`, so
    that only whole weeks go (an event is kept `days` to `days + 7` days)."""
    return start_of(week_of(now - timedelta(days=days)))


@dataclass(slots=True)
class Partition:
    week: date  # its Monday
    name: str
    attached: bool


async def _weekly(session: AsyncSession) -> dict[date, Partition]:
    """Every week's partition, attached or left detached by an interrupted purge."""
    rows = await session.execute(
        text(
            "SELECT c.relname, i.inhparent IS NOT NULL FROM pg_class c"
            " LEFT JOIN pg_inherits i ON i.inhrelid = c.oid"
            " WHERE c.relkind = 'r' AND c.relnamespace = current_schema()::regnamespace"
            " AND c.relname ~ :named"
        ),
        {"named": f"^{NAMED.pattern}$"},
    )
    found = {}
    for name, attached in rows:
        week = datetime.strptime(NAMED.fullmatch(name)[1], "%Y%m%d").date()  # pyrefly: ignore[unsupported-operation]
        found[week] = Partition(week, name, attached)
    return found


async def _locked(session: AsyncSession) -> None:
    await session.execute(text(f"SET LOCAL lock_timeout = '{LOCK_TIMEOUT}'"))
    await session.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": LOCK})


async def ensure(db: Database, now: datetime, retention_days: int) -> list[str]:
    """Make every missing week's partition from the retention horizon of `now` to
    DAYS_AHEAD after it; returns the names made. Each in a transaction of its own:
    attaching locks the default partition (ACCESS EXCLUSIVE) until commit, so briefly."""
    if not db.is_postgres:
        return []
    week, last = horizon(now, retention_days).date(), week_of(now + timedelta(days=DAYS_AHEAD))
    async with db.sessionmaker() as session:
        have = await _weekly(session)
    made = []
    while week <= last:
        if week not in have or not have[week].attached:
            async with db.sessionmaker() as session:
                await _locked(session)
                if await _attach(session, week):
                    made.append(partition_of(week))
                await session.commit()
        week += WEEK
    if made:
        log.info("made %d partitions of the verification log (%s…)", len(made), made[0])
    return made


async def _attach(session: AsyncSession, week: date) -> bool:
    """Make the week's partition and attach it, with the rows the default partition holds
    for that week (stored before the partition existed). ATTACH, not CREATE … PARTITION OF:
    it locks the parent only in SHARE UPDATE EXCLUSIVE mode, which lets ingestion and reads
    go on. False if another process made it meanwhile."""
    if (found := (await _weekly(session)).get(week)) is not None and found.attached:
        return False
    name, low, high = partition_of(week), start_of(week), start_of(week + WEEK)
    bounds = f"FROM ('{low.isoformat()}') TO ('{high.isoformat()}')"
    check = f"occurred_at >= '{low.isoformat()}' AND occurred_at < '{high.isoformat()}'"
    for statement in (
        f"CREATE TABLE IF NOT EXISTS {name} (LIKE {PARENT} INCLUDING DEFAULTS)",
        f"WITH moved AS (DELETE FROM {DEFAULT} WHERE {check} RETURNING *) INSERT INTO {name}"  # noqa: S608
        " SELECT * FROM moved",
        # A CHECK that proves the bounds lets ATTACH skip its scan of the new table.
        f"ALTER TABLE {name} ADD CONSTRAINT {name}_bounds CHECK ({check})",
        f"ALTER TABLE {PARENT} ATTACH PARTITION {name} FOR VALUES {bounds}",
        f"ALTER TABLE {name} DROP CONSTRAINT {name}_bounds",
    ):
        await session.execute(text(statement))  # names and bounds are made of dates only
    return True


async def drop_before(db: Database, cutoff: datetime) -> int:
    """Detach and drop every week's partition wholly before `cutoff` (see `horizon`); returns
    how many events they held. Detaching takes the parent's ACCESS EXCLUSIVE lock for a
    moment; counting and dropping the detached table then hold no lock that ingestion or the
    dashboard waits for."""
    dropped = 0
    if not db.is_postgres:
        return dropped
    async with db.sessionmaker() as session:
        weekly = await _weekly(session)
    for week in sorted(w for w in weekly if start_of(w + WEEK) <= cutoff):
        name = weekly[week].name
        if weekly[week].attached:
            await _retried(db, f"ALTER TABLE {PARENT} DETACH PARTITION {name}")
        dropped += await _retried(db, f"SELECT count(*) FROM {name}", f"DROP TABLE {name}")  # noqa: S608
    return dropped


async def _retried(db: Database, *statements: str) -> Any:
    """Run these statements in one transaction under the partitions' lock, tried again while
    their table lock is not granted within LOCK_TIMEOUT; returns the first one's scalar."""
    for attempt in range(DROP_TRIES):
        try:
            async with db.sessionmaker() as session:
                await _locked(session)
                results = [await session.execute(text(statement)) for statement in statements]
                first = results[0].scalar() if statements[0].startswith("SELECT") else None
                await session.commit()
                return first
        except DBAPIError as error:
            if attempt == DROP_TRIES - 1 or getattr(error.orig, "sqlstate", "") != "55P03":
                raise
            log.info("%s: the log is busy, trying again", statements[0])
            await asyncio.sleep(1.0)
    return None


async def keeper(db: Database, retention_days: int, stopping: asyncio.Event) -> None:
    """The service's part: make the partitions ahead, now and every CHECK_SECONDS, until
    `stopping` is set. A failed round is logged and tried again at the next."""
    while not stopping.is_set():
        try:
            await ensure(db, datetime.now(UTC), retention_days)
        except Exception as error:
            if failure(error) is None:
                log.exception("making the verification log's partitions failed")
            else:
                log.warning("making the log's partitions: database unavailable (%s)", error)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stopping.wait(), CHECK_SECONDS)
