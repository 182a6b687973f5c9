"""The raw log's week partitions on PostgreSQL (partitions.py): made ahead by the service, rows
outside them kept in the default partition and moved when their week's partition is made,
retention by whole weeks; and the idempotency key they need, `(occurred_at, event_id)`, on
both databases."""

import asyncio
import uuid
from datetime import UTC, datetime, timedelta

import anyio
import pytest
from alembic import command
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine

import partitions
from db import alembic_config
from tests.conftest import Harness, scratch_postgres, start_harness
from tests.factories import event, ingest, post_events

pytestmark = pytest.mark.anyio

DAY = timedelta(days=1)
WEEK = timedelta(days=7)
BEFORE_PARTITIONS = "126b9b5f3b09"


@pytest.fixture
def postgres(database_url: str) -> None:
    if not database_url.startswith("postgresql"):
        pytest.skip("SQLite keeps the log in one table")


async def stored_in(harness: Harness, event_ids: list[str]) -> dict[str, str]:
    """The partition that holds each of these events."""
    async with harness.sessionmaker() as session:
        rows = await session.execute(
            text(
                "SELECT event_id::text, tableoid::regclass::text FROM verifications"
                " WHERE event_id::text = ANY(:ids)"
            ),
            {"ids": event_ids},
        )
        return dict(rows.all())


async def weekly(harness: Harness) -> dict:
    async with harness.sessionmaker() as session:
        return await partitions._weekly(session)


async def log_ids(harness: Harness, viewer: dict[str, str]) -> list[str]:
    response = await harness.client.get(
        "/api/v1/verifications", params={"limit": 200}, headers=viewer
    )
    assert response.status_code == 200, response.text
    return [v["event_id"] for v in response.json()["items"]]


async def test_events_are_stored_in_their_weeks_partition(harness: Harness, bot, viewer, postgres):
    now = datetime.now(UTC)
    await partitions.ensure(harness.services.db, now, 90)
    weeks = await weekly(harness)
    first = partitions.week_of(now - 90 * DAY)
    assert first.weekday() == 0 and partitions.horizon(now, 90).date() == first
    last = partitions.week_of(now + partitions.DAYS_AHEAD * DAY)
    wanted = {first + n * WEEK for n in range((last - first).days // 7 + 1)}
    assert wanted <= {week for week, p in weeks.items() if p.attached}

    recent, older, ancient = event(at=now), event(at=now - 3 * DAY), event(at=now - 400 * DAY)
    await post_events(harness.client, bot, [recent, older, ancient])
    where = await stored_in(harness, [e["event_id"] for e in (recent, older, ancient)])
    assert where == {
        recent["event_id"]: partitions.partition_of(now),
        older["event_id"]: partitions.partition_of(now - 3 * DAY),
        ancient["event_id"]: partitions.DEFAULT,
    }
    # Idempotency holds in every partition, the default one too.
    again = await ingest(harness.client, bot, [recent, older, ancient])
    assert again.json() == {"accepted": 0, "duplicates": 3}


async def test_a_day_made_later_takes_its_rows_from_the_default_partition(
    harness: Harness, bot, viewer, postgres
):
    now = datetime.now(UTC)
    at = partitions.horizon(now, 300)  # a Monday, the first the next ensure makes
    early = [event(user_id=500 + i, at=at + i * DAY) for i in range(3)]
    other_day = event(user_id=600, at=at - timedelta(seconds=1))
    await post_events(harness.client, bot, [*early, other_day])
    before = await log_ids(harness, viewer)

    made = await partitions.ensure(harness.services.db, now, 300)
    assert partitions.partition_of(at) in made
    assert partitions.partition_of(at - DAY) not in made  # past the horizon asked
    where = await stored_in(harness, [e["event_id"] for e in (*early, other_day)])
    assert {where[e["event_id"]] for e in early} == {partitions.partition_of(at)}
    assert where[other_day["event_id"]] == partitions.DEFAULT
    assert await log_ids(harness, viewer) == before  # moved, nothing lost or doubled
    assert (await ingest(harness.client, bot, early)).json() == {"accepted": 0, "duplicates": 3}
    assert await partitions.ensure(harness.services.db, now, 300) == []  # made once


async def test_the_service_makes_the_partitions_ahead(
    harness: Harness, database_url: str, jwks_server, tokens, postgres
):
    ahead = partitions.week_of(datetime.now(UTC) + partitions.DAYS_AHEAD * DAY)
    name = partitions.partition_of(ahead)
    async with harness.sessionmaker() as session:
        await session.execute(text(f"DROP TABLE IF EXISTS {name}"))
        await session.commit()
    assert ahead not in await weekly(harness)
    async for _ in start_harness(database_url, jwks_server.url, tokens):  # another replica
        for _ in range(100):
            if (found := (await weekly(harness)).get(ahead)) is not None and found.attached:
                break
            await asyncio.sleep(0.1)
        else:
            pytest.fail(f"{name} was not made")


async def test_purge_drops_whole_weeks(harness: Harness, bot, viewer, database_url: str, purge):
    """Retention keeps whole weeks: an event goes once its whole week (Monday to Monday,
    UTC) is older than the horizon. On PostgreSQL the weeks' partitions are dropped, rows in
    the default partition deleted, and a partition a purge detached but did not drop is
    dropped by the next."""
    now = datetime.now(UTC)
    cutoff = partitions.horizon(now, 7)
    assert now - 14 * DAY < cutoff <= now - 7 * DAY and cutoff.weekday() == 0
    earlier = cutoff - 5 * DAY  # the week before the cutoff
    gone = [event(user_id=1, at=cutoff - timedelta(seconds=1)), event(user_id=2, at=earlier)]
    gone.append(event(user_id=3, at=now - 500 * DAY))  # the default partition, on PostgreSQL
    kept = [event(user_id=4, at=cutoff), event(user_id=5, at=now)]
    postgresql = database_url.startswith("postgresql")
    await partitions.ensure(harness.services.db, now, 90)  # as in the test above
    await post_events(harness.client, bot, gone + kept)
    if postgresql:  # a purge that stopped between detaching a week and dropping it
        leftover = partitions.partition_of(earlier)
        async with harness.sessionmaker() as session:
            await session.execute(text(f"ALTER TABLE verifications DETACH PARTITION {leftover}"))
            await session.commit()
        gone.append(event(user_id=6, at=earlier))  # stored in the default meanwhile
        await post_events(harness.client, bot, gone[-1:])

    out = await purge("--days", "7", "--batch", "1")
    assert f"purged {len(gone)} verification events of the weeks older than 7 days" in out
    assert sorted(await log_ids(harness, viewer)) == sorted(e["event_id"] for e in kept)
    if postgresql:
        weeks = await weekly(harness)
        assert min(weeks) == cutoff.date()
        assert all(p.attached for p in weeks.values())
        assert set((await stored_in(harness, [kept[0]["event_id"]])).values()) == {
            partitions.partition_of(cutoff)
        }


async def test_purge_waits_for_a_busy_log_within_its_lock_timeout(harness: Harness, bot, postgres):
    """A detach waits at most LOCK_TIMEOUT for its lock (queries queue behind it meanwhile),
    then gives way and tries again: a long read delays the purge, never the other way."""
    now = datetime.now(UTC)
    cutoff = partitions.horizon(now, 7)
    # The week before the cutoff has its partition (an earlier test's purge may have dropped
    # it, and the keeper this harness started may not have made it again yet).
    await partitions.ensure(harness.services.db, now, 90)
    await post_events(harness.client, bot, [event(at=cutoff - timedelta(seconds=1))])
    async with harness.sessionmaker() as reader:
        await reader.execute(text("SELECT count(*) FROM verifications"))  # holds its lock
        purge = asyncio.create_task(partitions.drop_before(harness.services.db, cutoff))
        await asyncio.sleep(1.5)  # past the first attempt's lock timeout
        assert not purge.done()
        # Ingestion goes on meanwhile (queued at most LOCK_TIMEOUT behind a waiting detach).
        assert (await ingest(harness.client, bot, [event()])).status_code == 200
        await reader.rollback()
    assert await purge == 1


async def test_an_event_is_the_same_event_with_the_same_id_and_time(harness: Harness, bot):
    """The idempotency key is (occurred_at, event_id) on both databases: a retry repeats the
    whole event. The same id at another time is another event (API.md)."""
    first = event(at=datetime.now(UTC) - timedelta(minutes=5))
    moved = {**first, "occurred_at": event()["occurred_at"]}
    assert (await ingest(harness.client, bot, [first, first])).json() == {
        "accepted": 1,
        "duplicates": 1,
    }
    assert (await ingest(harness.client, bot, [first, moved])).json() == {
        "accepted": 1,
        "duplicates": 1,
    }
    fresh = event(event_id=str(uuid.uuid4()))
    assert (await ingest(harness.client, bot, [fresh, moved])).json() == {
        "accepted": 1,
        "duplicates": 1,
    }


async def test_the_migration_moves_the_log_into_day_partitions_and_back():
    """Upgrading a PostgreSQL log keeps every row, id and the id sequence, each row in its
    day's partition (or the default one); downgrading gives the one table back."""
    async with scratch_postgres("partition_migration") as url:
        config = alembic_config(url)
        engine = create_async_engine(url)
        try:
            await moved_and_back(config, engine)
        finally:
            await engine.dispose()


async def moved_and_back(config, engine) -> None:
    now = datetime.now(UTC)
    times = [now, now - 2 * DAY, now - 400 * DAY]
    await anyio.to_thread.run_sync(command.upgrade, config, BEFORE_PARTITIONS)
    async with engine.begin() as connection:
        for at in times:
            await connection.execute(
                text(
                    "INSERT INTO verifications (event_id, chat_id, user_id, result,"
                    " trigger, missing_channel_ids, cached, latency_ms, occurred_at,"
                    " received_at) VALUES (gen_random_uuid(), -100, 7, 'passed',"
                    " 'join', '[]', false, 5, :at, :at)"
                ),
                {"at": at},
            )
    before = await log_rows(engine)
    await anyio.to_thread.run_sync(command.upgrade, config, "head")
    assert await log_rows(engine) == before
    async with engine.connect() as connection:
        where = dict(
            (await connection.execute(
                text("SELECT id, tableoid::regclass::text FROM verifications")
            )).all()
        )  # fmt: skip
        next_id = (
            await connection.execute(text("SELECT nextval('verifications_id_seq')"))
        ).scalar()
        key = (  # time first: random event ids would scatter its inserts over the index
            await connection.execute(
                text(
                    "SELECT pg_get_constraintdef(oid) FROM pg_constraint"
                    " WHERE conrelid = 'verifications'::regclass AND contype = 'u'"
                )
            )
        ).scalar()
    assert key == "UNIQUE (occurred_at, event_id)"
    assert [where[row[0]] for row in before] == [
        partitions.partition_of(now),
        partitions.partition_of(now - 2 * DAY),
        partitions.DEFAULT,
    ]
    assert next_id == max(row[0] for row in before) + 1
    await anyio.to_thread.run_sync(command.downgrade, config, BEFORE_PARTITIONS)
    assert await log_rows(engine) == before


async def log_rows(engine) -> list[tuple]:
    async with engine.connect() as connection:
        rows = await connection.execute(
            text("SELECT id, event_id, occurred_at FROM verifications ORDER BY id")
        )
        return [tuple(row) for row in rows]
