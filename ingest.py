"""Verification ingestion: one batch, one transaction, a fixed number of statements.

Used by `POST /bot/verifications` and by `channelgate seed-demo`, so demo data goes through
exactly the code the bots use.
"""

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from operator import attrgetter
from typing import Any

from pydantic import TypeAdapter
from sqlalchemy import ColumnElement, case, delete, func, literal_column, select, text, update
from sqlalchemy.ext.asyncio import AsyncSession
from sqlmodel import col
from sqlmodel import select as select_rows

from analytics import (
    add_sketches,
    fold,
    insert_rows,
    lock_folding,
    move_rollups,
    sketch_rows,
    update_rollups,
)
from db import VERIFICATION, announce, bulk_insert, is_postgres, upsert
from models import (
    COUNTERS,
    LATENCY_COLUMNS,
    LATENCY_EDGES_MS,
    Member,
    MemberStatus,
    Verification,
    VerificationIn,
    group_migrations,
    member_count_deltas,
    member_counts,
    utcnow,
)

BY_KEY = attrgetter("occurred_at", "event_id.int")  # the log's unique key, as INGEST orders it
MEMBERS = Member.__table__  # pyrefly: ignore[missing-attribute]
VERIFICATIONS = Verification.__table__  # pyrefly: ignore[missing-attribute]


@dataclass(slots=True)
class MemberDelta:
    verified_at: datetime | None = None
    restricted_at: datetime | None = None
    checks: int = 0


def later(a: Any, b: Any) -> ColumnElement[Any]:
    """The later of two nullable timestamps, the same on PostgreSQL and SQLite."""
    return case((a.is_(None), b), (b.is_(None), a), (a > b, a), else_=b)


def status_of(verified_at: Any, restricted_at: Any) -> ColumnElement[str]:
    return case(
        (
            verified_at.is_not(None) & (restricted_at.is_(None) | (verified_at >= restricted_at)),
            literal_column("'verified'"),
        ),
        (restricted_at.is_not(None), literal_column("'restricted'")),
        else_=literal_column("'unknown'"),
    )


def member_deltas(events: Sequence[VerificationIn]) -> dict[tuple[int, int], MemberDelta]:
    deltas: dict[tuple[int, int], MemberDelta] = {}
    for event in events:
        delta = deltas.setdefault((event.chat_id, event.user_id), MemberDelta())
        delta.checks += 1
        at = event.occurred_at
        # A cached pass re-used an earlier verification: it counts as a check, but only a
        # check against Telegram makes the state fresher (else fresh_until never ends).
        if (
            event.result == "passed"
            and not event.cached
            and (delta.verified_at is None or at > delta.verified_at)
        ):
            delta.verified_at = at
        elif event.result == "blocked" and (
            delta.restricted_at is None or at > delta.restricted_at
        ):
            delta.restricted_at = at
    return deltas


def local_status(delta: MemberDelta) -> MemberStatus:
    v, r = delta.verified_at, delta.restricted_at
    if v is not None and (r is None or v >= r):
        return "verified"
    return "restricted" if r is not None else "unknown"


async def ingest(session: AsyncSession, events: Sequence[VerificationIn]) -> int:
    """Store new events, fold them into member states and rollups; returns how many events
    were new (an event seen before, in this batch or an earlier one, is skipped). Does not
    commit."""
    unique: dict[tuple[Any, datetime], VerificationIn] = {}
    for event in events:  # the log's idempotency key (see partitions.py)
        unique.setdefault((event.event_id, event.occurred_at), event)
    if not unique:
        return 0
    received_at = utcnow()
    if is_postgres(session):
        return await ingest_in_sql(session, list(unique.values()), received_at)
    # A fixed order means concurrent batches lock rows in the same order: no deadlocks. The
    # ids as integers: comparing UUIDs runs Python's UUID.__lt__ (1.0 ms a 500-event batch
    # against 0.2 ms, timeit).
    ordered = sorted(unique.values(), key=BY_KEY)
    if moved := await moved_to(session, {e.chat_id for e in ordered}):
        ordered = [
            e.model_copy(update={"chat_id": moved[e.chat_id]}) if e.chat_id in moved else e
            for e in ordered
        ]
    rows = [
        {
            "event_id": e.event_id,
            "chat_id": e.chat_id,
            "user_id": e.user_id,
            "result": e.result,
            "trigger": e.trigger,
            "missing_channel_ids": e.missing_channel_ids,
            "cached": e.cached,
            "latency_ms": e.latency_ms,
            "error": e.error,
            "occurred_at": e.occurred_at,
            "received_at": received_at,
        }
        for e in ordered
    ]
    statement, params = bulk_insert(session, VERIFICATIONS, rows)
    statement = statement.on_conflict_do_nothing(
        index_elements=["occurred_at", "event_id"]
    ).returning(VERIFICATIONS.c.event_id, VERIFICATIONS.c.occurred_at, VERIFICATIONS.c.id)
    inserted = {
        (row.event_id, row.occurred_at): row.id for row in await session.execute(statement, params)
    }
    new = [e for e in ordered if (e.event_id, e.occurred_at) in inserted]
    await upsert_members(session, member_deltas(new), received_at)
    await update_rollups(session, new)
    announce(session, VERIFICATION, sorted(inserted.values()))
    return len(inserted)


EVENTS = TypeAdapter(list[VerificationIn])
ZERO, MAX_OFFSET = timedelta(0), timedelta(hours=16)
LATENCY_BUCKET = f"width_bucket(latency_ms, ARRAY{list(LATENCY_EDGES_MS)})"  # = bisect_right
STATUS = """CASE WHEN {v} IS NOT NULL AND ({r} IS NULL OR {v} >= {r}) THEN 'verified'
              WHEN {r} IS NOT NULL THEN 'restricted' ELSE 'unknown' END"""  # = local_status
NEW_STATUS = STATUS.format(v="verified_at", r="restricted_at")
MERGED_STATUS = STATUS.format(  # the later times win (greatest() skips NULLs)
    v="greatest(prior.verified_at, excluded.verified_at)",
    r="greatest(prior.restricted_at, excluded.restricted_at)",
)
# The whole of a batch but its users' sketches, as PostgreSQL's own set operations over the
# rows the insert returns: the events (the migrated groups' ids replaced, in event order), the
# member states (one upsert per member, in member order, and the status counts' changes), and
# the rollup and channel deltas. Python sends one JSON document and reads back the new rows.
# What this replaced (the same steps in Python, each table's rows sent as arrays) cost ~85 µs
# of the server's CPU an event, and asyncpg's array encoding was a fifth of it (bench/README).
INGEST = text(f"""
WITH batch AS (
  SELECT e.event_id, coalesce(m.new_chat_id, e.chat_id) AS chat_id, e.user_id, e.result,
         e.trigger, e.missing_channel_ids, e.cached, e.latency_ms, e.error, e.occurred_at
  FROM json_to_recordset(CAST(:events AS json)) AS e(
    event_id uuid, chat_id bigint, user_id bigint, result text, trigger text,
    missing_channel_ids jsonb, cached boolean, latency_ms integer, error text,
    occurred_at timestamptz)
  LEFT JOIN group_migrations AS m ON m.old_chat_id = e.chat_id
), new AS (
  INSERT INTO verifications (event_id, chat_id, user_id, result, trigger, missing_channel_ids,
                             cached, latency_ms, error, occurred_at, received_at)
  SELECT event_id, chat_id, user_id, result, trigger, missing_channel_ids, cached, latency_ms,
         error, occurred_at, :now
  FROM batch ORDER BY occurred_at, event_id
  ON CONFLICT (occurred_at, event_id) DO NOTHING
  RETURNING id, chat_id, user_id, result, cached, latency_ms, missing_channel_ids, occurred_at
), seen AS (
  -- A cached pass re-used an earlier verification: it counts as a check, but only a check
  -- against Telegram makes the state fresher (else fresh_until never ends).
  SELECT chat_id, user_id, count(*) AS checks,
         max(occurred_at) FILTER (WHERE result = 'passed' AND NOT cached) AS verified_at,
         max(occurred_at) FILTER (WHERE result = 'blocked') AS restricted_at
  FROM new GROUP BY chat_id, user_id
), states AS (
  INSERT INTO members AS prior (chat_id, user_id, status, verified_at, restricted_at, checks,
                                updated_at)
  SELECT chat_id, user_id, {NEW_STATUS}, verified_at, restricted_at, checks, :now
  FROM seen ORDER BY chat_id, user_id
  ON CONFLICT (chat_id, user_id) DO UPDATE SET
    verified_at = greatest(prior.verified_at, excluded.verified_at),
    restricted_at = greatest(prior.restricted_at, excluded.restricted_at),
    status = {MERGED_STATUS},
    checks = prior.checks + excluded.checks,
    updated_at = excluded.updated_at,
    previous_status = prior.status  -- SET sees the row as it was
  RETURNING chat_id, status, previous_status
), counted AS (
  INSERT INTO member_count_deltas (chat_id, verified, restricted)
  SELECT chat_id, sum(v), sum(r) FROM (
    SELECT chat_id,
           (status = 'verified')::int - coalesce(previous_status = 'verified', false)::int AS v,
           (status = 'restricted')::int - coalesce(previous_status = 'restricted', false)::int AS r
    FROM states WHERE status IS DISTINCT FROM previous_status) AS changes
  GROUP BY chat_id HAVING sum(v) <> 0 OR sum(r) <> 0
), bucketed AS (
  SELECT g.grain, n.chat_id, date_bin(g.width, n.occurred_at, timestamptz 'epoch') AS bucket,
         n.result, n.cached, {LATENCY_BUCKET} AS latency, n.missing_channel_ids
  FROM new AS n, (VALUES ('h', interval '1 hour'), ('d', interval '1 day')) AS g(grain, width)
), rolled AS (
  INSERT INTO rollup_deltas (grain, chat_id, bucket, {", ".join((*COUNTERS, *LATENCY_COLUMNS))})
  SELECT grain, chat_id, bucket, count(*), count(*) FILTER (WHERE result = 'passed'),
         count(*) FILTER (WHERE result = 'blocked'), count(*) FILTER (WHERE result = 'error'),
         count(*) FILTER (WHERE cached),
         {", ".join(f"count(*) FILTER (WHERE latency = {i})" for i in range(len(LATENCY_COLUMNS)))}
  FROM bucketed GROUP BY grain, chat_id, bucket
), blocked AS (
  INSERT INTO channel_rollup_deltas (grain, chat_id, bucket, channel_id, blocks)
  SELECT grain, chat_id, bucket, channel_id, count(*)
  FROM bucketed, LATERAL (
    SELECT DISTINCT value::bigint AS channel_id FROM jsonb_array_elements(missing_channel_ids)
  ) AS missing
  WHERE result = 'blocked' GROUP BY grain, chat_id, bucket, channel_id
), sketched AS (
  -- The batch's users as delta sketches, made in Python beforehand (`ingest_in_sql`) and
  -- stored only if every event is new: else the new ones' are made and stored after this.
  INSERT INTO user_sketch_deltas (grain, chat_id, bucket, sketch)
  SELECT s.grain, coalesce(m.new_chat_id, s.chat_id), s.bucket, s.sketch
  FROM unnest(CAST(:grain AS text[]), CAST(:chat_id AS bigint[]),
              CAST(:bucket AS timestamptz[]), CAST(:sketch AS bytea[]))
       AS s(grain, chat_id, bucket, sketch)
  LEFT JOIN group_migrations AS m ON m.old_chat_id = s.chat_id
  WHERE (SELECT count(*) FROM new) = :events_sent
)
-- One row of arrays, decoded by asyncpg in C, rather than a row an event.
SELECT coalesce(array_agg(id ORDER BY id), '{{}}'), array_agg(chat_id ORDER BY id),
       array_agg(user_id ORDER BY id),
       array_agg(floor(extract(epoch FROM occurred_at))::bigint ORDER BY id)
FROM new
""")  # noqa: S608 - built from constants only


async def ingest_in_sql(
    session: AsyncSession, events: list[VerificationIn], received_at: datetime
) -> int:
    """`ingest` on PostgreSQL: INGEST, which also stores the batch's users as delta sketches
    (DataSketches, made here in Python) when every event is new; in a retry, the new events'
    sketches are stored after it. The migrated-groups read comes first, as in `moved_to`."""
    for i, e in enumerate(events):  # PostgreSQL reads UTC offsets up to 15:59; RFC 3339's 23:59
        if abs(e.occurred_at.utcoffset() or ZERO) >= MAX_OFFSET:
            events[i] = e.model_copy(update={"occurred_at": e.occurred_at.astimezone(UTC)})
    seen = [(e.chat_id, e.user_id, int(e.occurred_at.timestamp())) for e in events]
    sketches = sketch_rows(seen)
    params: dict[str, Any] = {
        "events": EVENTS.dump_json(events).decode(),
        "now": received_at,
        "events_sent": len(events),
        **{
            name: [row[name] for row in sketches]
            for name in ("grain", "chat_id", "bucket", "sketch")
        },
    }
    ids, chat_ids, user_ids, times = (await session.execute(INGEST, params)).one()
    if len(ids) < len(events):  # a retry: the statement stored no sketches
        await add_sketches(session, zip(chat_ids or (), user_ids or (), times or (), strict=True))
    announce(session, VERIFICATION, ids)
    return len(ids)


async def upsert_members(
    session: AsyncSession, deltas: dict[tuple[int, int], MemberDelta], now: datetime
) -> None:
    if not deltas:
        return
    rows = [
        {
            "chat_id": chat_id,
            "user_id": user_id,
            "status": local_status(d),
            "verified_at": d.verified_at,
            "restricted_at": d.restricted_at,
            "checks": d.checks,
            "updated_at": now,
            "previous_status": None,
        }
        for (chat_id, user_id), d in sorted(deltas.items())
    ]
    statement, params = bulk_insert(session, MEMBERS, rows)
    new, old = statement.excluded, MEMBERS.c
    verified_at = later(old.verified_at, new.verified_at)
    restricted_at = later(old.restricted_at, new.restricted_at)
    statement = statement.on_conflict_do_update(
        index_elements=["chat_id", "user_id"],
        set_={
            "verified_at": verified_at,
            "restricted_at": restricted_at,
            "status": status_of(verified_at, restricted_at),
            "checks": old.checks + new.checks,
            "updated_at": new.updated_at,
            "previous_status": old.status,  # SET sees the row as it was
        },
    ).returning(MEMBERS.c.chat_id, MEMBERS.c.status, MEMBERS.c.previous_status)
    changes: dict[int, list[int]] = {}
    for row in await session.execute(statement, params):
        status, previous = row.status, row.previous_status
        if status != previous:
            counts = changes.setdefault(int(row.chat_id), [0, 0])
            for state, sign in ((status, 1), (previous, -1)):
                if state in COUNTED:
                    counts[COUNTED[state]] += sign
    await add_member_counts(session, changes)


COUNTED = {"verified": 0, "restricted": 1}


async def add_member_counts(session: AsyncSession, changes: dict[int, list[int]]) -> None:
    """Record the batch's member-count changes as delta rows (folded by analytics.fold)."""
    rows = [
        {"chat_id": chat_id, "verified": v, "restricted": r}
        for chat_id, (v, r) in changes.items()
        if v or r
    ]
    await insert_rows(session, member_count_deltas, rows)


async def recount_members(session: AsyncSession, chat_id: int) -> None:
    """Rebuild one group's counts from its member states (after a migration or deletion),
    its deltas included: under the folder's lock, so no fold of them is half-seen."""
    await lock_folding(session)
    for table in (member_count_deltas, member_counts):
        await session.execute(delete(table).where(table.c.chat_id == chat_id))
    verified, restricted = (
        await session.execute(
            select(
                func.count().filter(MEMBERS.c.status == "verified"),
                func.count().filter(MEMBERS.c.status == "restricted"),
            ).where(MEMBERS.c.chat_id == chat_id)
        )
    ).one()
    if verified or restricted:
        await insert_rows(
            session,
            member_counts,
            [{"chat_id": chat_id, "verified": verified, "restricted": restricted}],
        )


async def moved_to(session: AsyncSession, chat_ids: set[int]) -> dict[int, int]:
    """Where the migrated ones among these chat ids went: a bot still reports events under
    a group's old id after it migrates (batched before, or sent by a replica that has not
    heard), and they belong to the group. The batch's first read: see `move_chat`."""
    rows = await session.execute(
        select(group_migrations.c.old_chat_id, group_migrations.c.new_chat_id).where(
            group_migrations.c.old_chat_id.in_(sorted(chat_ids))
        )
    )
    return {old: new for old, new in rows}


async def move_chat(session: AsyncSession, old: int, new: int) -> None:
    """Move everything ingestion keeps under a group's chat id to its new one (a basic group
    became a supergroup), merged with what the new id holds already: the raw log, member
    states, rollups and sketches; and send the old id's later events there too.

    On PostgreSQL it first takes group_migrations for itself. Every batch reads that table
    first (the join at the head of `INGEST`; `moved_to` on SQLite) and holds it until it
    commits, so the migration waits for the batches in flight, whose rows it then moves,
    and the batches that arrive meanwhile wait at that read, then read where the old id
    went. No event of the old id is stored
    beside the move, to stay behind under an id no group has."""
    if is_postgres(session):
        await session.execute(text("LOCK TABLE group_migrations IN ACCESS EXCLUSIVE MODE"))
    # Every batch of the old id has committed its deltas now: fold them all, so that only
    # the tables need moving (no fold runs meanwhile: the lock is held until commit).
    await lock_folding(session)
    await fold(session, None)
    await session.execute(
        update(group_migrations)
        .where(group_migrations.c.new_chat_id == old)
        .values(new_chat_id=new)  # ids that migrated to the old one follow it
    )
    moved = {"new_chat_id": new, "migrated_at": utcnow()}
    statement = upsert(session, group_migrations).values(old_chat_id=old, **moved)
    await session.execute(
        statement.on_conflict_do_update(index_elements=["old_chat_id"], set_=moved)
    )
    await session.execute(
        update(VERIFICATIONS).where(VERIFICATIONS.c.chat_id == old).values(chat_id=new)
    )
    await move_members(session, old, new)
    await move_rollups(session, old, new)


async def move_members(session: AsyncSession, old: int, new: int) -> None:
    """Re-key a group's member states to its new chat id (a migration to a supergroup);
    where the new chat already has a state (the bot reported events for the supergroup
    before migrating), the two are merged: checks add up, the later times win."""
    new_states = {
        m.user_id: m
        for m in await session.scalars(select_rows(Member).where(Member.chat_id == new))
    }
    if new_states:
        clashing = await session.scalars(
            select_rows(Member).where(Member.chat_id == old, col(Member.user_id).in_(new_states))
        )
        for old_state in clashing:
            target = new_states[old_state.user_id]
            target.checks += old_state.checks
            target.verified_at = latest(target.verified_at, old_state.verified_at)
            target.restricted_at = latest(target.restricted_at, old_state.restricted_at)
            target.status = local_status(
                MemberDelta(target.verified_at, target.restricted_at, target.checks)
            )
            await session.delete(old_state)
        await session.flush()
    await session.execute(update(MEMBERS).where(MEMBERS.c.chat_id == old).values(chat_id=new))
    for chat_id in (old, new):
        await recount_members(session, chat_id)


def latest(a: datetime | None, b: datetime | None) -> datetime | None:
    return b if a is None or (b is not None and b > a) else a
