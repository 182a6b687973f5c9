"""Analytics from rollups, checked against a direct computation over the same raw events; time
windows and their edges; retention (`channelgate purge`) keeps the rollups."""

import asyncio
import bisect
import contextlib
import math
import random
import uuid
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta, timezone
from fractions import Fraction
from typing import Any

import httpx
import numpy as np
import pytest
from sqlalchemy import func, insert, select, text

import analytics
import cli
import partitions
from models import LATENCY_EDGES_MS, rollup_deltas, user_sketches
from tests.conftest import ENV_OWNER, Harness, problem
from tests.factories import (
    CHANNEL_ID,
    GROUP_ID,
    event,
    ingest,
    post_events,
    register_channel,
    register_group,
    z,
)

pytestmark = pytest.mark.anyio

HOUR = timedelta(hours=1)
DAY = timedelta(days=1)
US = timedelta(microseconds=1)
# Three registered groups, one unregistered supergroup, one unregistered basic group.
GROUPS = [GROUP_ID, -1001000000002, -1001000000003, -1001000000004, -4242]
GROUP_TITLES = {GROUPS[0]: "Alpha", GROUPS[1]: "Beta", GROUPS[2]: "Gamma"}
CHANNELS = [CHANNEL_ID, -1002000000002, -1002000000003]
CHANNEL_TITLES = {CHANNELS[0]: "News", CHANNELS[1]: "Deals"}
TRIGGERS = ["message", "join", "button", "channel_leave", "recheck"]
SPECIAL_LATENCIES = [0, 1, 30000, 45000, 600000] + [
    e + d for e in LATENCY_EDGES_MS for d in (-1, 0, 1)
]


def floor_hour(at: datetime) -> datetime:
    return at.replace(minute=0, second=0, microsecond=0)


def floor_day(at: datetime) -> datetime:
    return floor_hour(at).replace(hour=0)


def parse(value: str) -> datetime:
    return datetime.fromisoformat(value)


async def get(client: httpx.AsyncClient, auth: dict, path: str, **params: Any) -> httpx.Response:
    query = {k: z(v) if isinstance(v, datetime) else v for k, v in params.items() if v is not None}
    return await client.get(f"/api/v1/analytics/{path}", params=query, headers=auth)


async def ok(client: httpx.AsyncClient, auth: dict, path: str, **params: Any) -> dict:
    response = await get(client, auth, path, **params)
    assert response.status_code == 200, response.text
    return response.json()


# ---------------------------------------------------------------- the reference computation


def at_of(e: dict) -> datetime:
    return parse(e["occurred_at"])


def in_window(events: list[dict], since: datetime, until: datetime, group: int | None) -> list:
    return [
        e for e in events if since <= at_of(e) < until and (group is None or e["chat_id"] == group)
    ]


def rate(part: int, whole: int) -> float | None:
    return part / whole if whole else None


def bucket_bounds(latency: int) -> tuple[int, int | None]:
    """[low, high) of the histogram bucket holding this latency (high None: open-ended)."""
    i = bisect.bisect_right(LATENCY_EDGES_MS, latency)
    return (0 if i == 0 else LATENCY_EDGES_MS[i - 1]), (
        LATENCY_EDGES_MS[i] if i < len(LATENCY_EDGES_MS) else None
    )


def nearest_rank(latencies: list[int], fraction: Fraction) -> int:
    ordered = sorted(latencies)
    return ordered[math.ceil(fraction * len(ordered)) - 1]


def assert_in_bucket(reported: float | None, latencies: list[int], fraction: Fraction) -> None:
    if not latencies:
        assert reported is None
        return
    low, high = bucket_bounds(nearest_rank(latencies, fraction))
    assert reported is not None
    if high is None:
        assert reported == low  # open-ended last bucket: its lower edge
    else:
        assert low <= reported <= high, (reported, low, high)


def users_close(estimate: int, exact: int) -> bool:
    """Within 2 % (an estimate past the sketches' exact coupon mode; smaller sets are
    compared exactly where the response says they are not estimated)."""
    return abs(estimate - exact) <= max(0.02 * exact, 2)


def member_counts(events: list[dict], group: int | None) -> tuple[int, int]:
    latest: dict[tuple[int, int], list[datetime | None]] = {}
    for e in events:
        if group is not None and e["chat_id"] != group:
            continue
        state = latest.setdefault((e["chat_id"], e["user_id"]), [None, None])
        slot = {"passed": 0, "blocked": 1}.get(e["result"])
        if slot == 0 and e["cached"]:
            slot = None  # a cached pass re-used a verification: it makes no state fresher
        if slot is not None:
            current = state[slot]
            state[slot] = at_of(e) if current is None else max(current, at_of(e))
    verified = sum(1 for v, r in latest.values() if v is not None and (r is None or v >= r))
    restricted = sum(1 for v, r in latest.values() if r is not None and not (v and v >= r))
    return verified, restricted


def expected_points(chosen: list[dict], since: datetime, until: datetime, step: timedelta):
    floor = floor_hour if step == HOUR else floor_day
    counts: dict[datetime, Counter] = {}
    for e in chosen:
        counts.setdefault(floor(at_of(e)), Counter())[e["result"]] += 1
    points, t = [], since
    while t < until:
        c = counts.get(t, Counter())
        total = c["passed"] + c["blocked"] + c["error"]
        points.append((t, total, c["passed"], c["blocked"], c["error"]))
        t += step
    return points


def expected_channels(chosen: list[dict]) -> list[dict]:
    blocks: Counter = Counter()
    for e in chosen:
        if e["result"] == "blocked":
            blocks.update(set(e["missing_channel_ids"]))
    ranked = sorted(blocks.items(), key=lambda item: (-item[1], item[0]))
    return [{"chat_id": c, "title": CHANNEL_TITLES.get(c), "blocks": n} for c, n in ranked]


def expected_top(chosen: list[dict], limit: int) -> list[dict]:
    per: dict[int, Counter] = {}
    for e in chosen:
        per.setdefault(e["chat_id"], Counter())[e["result"]] += 1
    rows: list[dict[str, Any]] = []
    for chat_id, c in per.items():
        checks = sum(c.values())
        rows.append(
            {
                "chat_id": chat_id,
                "title": GROUP_TITLES.get(chat_id),
                "checks": checks,
                "blocked": c["blocked"],
                "pass_rate": rate(c["passed"], checks),
            }
        )
    return sorted(rows, key=lambda r: (-r["checks"], r["chat_id"]))[:limit]


# ---------------------------------------------------------------- the data set


@dataclass
class Dataset:
    t0: datetime  # midnight UTC, four days ago; data spans [t0, t0 + 72 h]
    events: list[dict] = field(default_factory=list)


def random_events(t0: datetime, rng: random.Random, count: int) -> list[dict]:
    users = rng.sample(range(1, 2**40 - 1), 400)
    boundaries = [t0 + k * HOUR for k in range(73)]
    events = []
    for i in range(count):
        kind = i % 10
        if kind == 0:
            at = rng.choice(boundaries)  # exactly on an hour (every midnight included)
        elif kind == 1:
            at = rng.choice(boundaries[1:]) - US  # the last microsecond of an hour
        else:
            at = t0 + timedelta(microseconds=rng.randrange(72 * 3600 * 10**6))
        result = rng.choices(["passed", "blocked", "error"], weights=[6, 3, 1])[0]
        missing: list[int] = []
        if result == "blocked":
            missing = rng.sample(CHANNELS, rng.randint(1, 3))
            if rng.random() < 0.1:
                missing.append(missing[0])  # a repeated id counts once
        elif result == "passed" and rng.random() < 0.1:
            missing = [CHANNELS[2]]  # mode "any": passed although missing one; not a block
        latency = (
            rng.choice(SPECIAL_LATENCIES)
            if rng.random() < 0.3
            else min(600_000, int(rng.lognormvariate(5, 1.2)))
        )
        events.append(
            event(
                chat_id=rng.choices(GROUPS, weights=[8, 5, 3, 2, 1])[0],
                user_id=rng.choice(users),
                result=result,
                at=at,
                trigger=rng.choice(TRIGGERS),
                missing_channel_ids=missing,
                cached=rng.random() < 0.4,
                latency_ms=latency,
                error="telegram timeout" if result == "error" else None,
            )
        )
    return events


async def stop_folder(harness: Harness) -> None:
    """Cancel the app's background folder: the test decides what is folded and when."""
    task = harness.services.folder
    assert task is not None
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


async def fold(harness: Harness, limit: int | None = None) -> int:
    async with harness.sessionmaker() as session:
        await analytics.lock_folding(session)
        folded = await analytics.fold(session, limit)
        await session.commit()
    return folded


# Every read must count each batch once whether its deltas are folded, not yet folded, or
# some of each: the data set is read in all three states.
@pytest.fixture(params=["unfolded", "partly folded", "folded"])
async def dataset(harness: Harness, bot, request: pytest.FixtureRequest) -> Dataset:
    await stop_folder(harness)
    client = harness.client
    for chat_id, title in GROUP_TITLES.items():
        await register_group(client, bot, chat_id, title=title)
    for chat_id, title in CHANNEL_TITLES.items():
        await register_channel(client, bot, chat_id, title=title)
    rng = random.Random(20261126)
    t0 = floor_day(datetime.now(UTC)) - 4 * DAY
    events = random_events(t0, rng, 1500)
    rng.shuffle(events)
    batches = [events[i : i + 300] for i in range(0, len(events), 300)]
    assert await post_events(client, bot, batches[0]) == {"accepted": 300, "duplicates": 0}
    assert await post_events(client, bot, batches[1]) == {"accepted": 300, "duplicates": 0}
    # A retried batch (its response was lost) is all duplicates and counts nothing twice.
    assert await post_events(client, bot, batches[0]) == {"accepted": 0, "duplicates": 300}
    # Repeats inside a batch and events from an earlier one.
    mixed = [*batches[2], batches[2][0], batches[2][1], *batches[1][:7]]
    assert await post_events(client, bot, mixed) == {"accepted": 300, "duplicates": 9}
    for batch in batches[3:]:
        await post_events(client, bot, batch)
    if request.param == "partly folded":
        assert await fold(harness, 7) == 4 * 7  # 7 rows of each of the four kinds
    elif request.param == "folded":
        assert await fold(harness) > 0
        assert await fold(harness) == 0
    return Dataset(t0, events)


def windows(t0: datetime) -> list[tuple[str, datetime, datetime]]:
    h = HOUR
    return [
        ("hour-aligned", t0 + 5 * h, t0 + 29 * h),
        ("not aligned", t0 + 5 * h + timedelta(minutes=17, seconds=3), t0 + 41 * h - US),
        ("across one midnight", t0 + 22 * h, t0 + 26 * h),
        ("across two midnights", t0 + 20 * h + timedelta(minutes=30), t0 + 70 * h + 10 * US),
        ("whole days", t0, t0 + 3 * DAY),
        ("everything", t0 - 2 * h, t0 + 80 * h),
        ("single hour at midnight", t0 + DAY, t0 + DAY + h),
        ("single hour, not aligned", t0 + 30 * h + US, t0 + 31 * h + timedelta(minutes=59)),
        ("empty, after the data", t0 + 74 * h, t0 + 80 * h),
        ("before any data", t0 - 48 * h, t0 - h),
    ]


def effective(since: datetime, until: datetime) -> tuple[datetime, datetime]:
    return floor_hour(since), floor_hour(until)


# ---------------------------------------------------------------- rollups vs. raw events


async def test_summary_matches_the_raw_events(harness: Harness, dataset: Dataset, viewer):
    for name, since, until in windows(dataset.t0):
        start, end = effective(since, until)
        if start >= end:
            continue
        for group in (None, GROUPS[0], GROUPS[4]):
            body = await ok(
                harness.client, viewer, "summary", since=since, until=until, group=group
            )
            chosen = in_window(dataset.events, start, end, group)
            results = Counter(e["result"] for e in chosen)
            users = {e["user_id"] for e in chosen}
            verified, restricted = member_counts(dataset.events, group)
            where = f"{name}, group {group}"
            assert (parse(body["since"]), parse(body["until"])) == (start, end), where
            assert body["since"].endswith("Z") and body["until"].endswith("Z")
            assert {k: body[k] for k in ("checks", "passed", "blocked", "errors")} == {
                "checks": len(chosen),
                "passed": results["passed"],
                "blocked": results["blocked"],
                "errors": results["error"],
            }, where
            assert body["pass_rate"] == rate(results["passed"], len(chosen)), where
            cached = sum(e["cached"] for e in chosen)
            assert body["cache_hit_rate"] == rate(cached, len(chosen)), where
            assert body["active_groups"] == len({e["chat_id"] for e in chosen}), where
            if body["unique_users_estimated"]:  # the window's union left coupon mode
                assert len(users) > 1_000 and users_close(body["unique_users"], len(users))
            else:
                assert body["unique_users"] == len(users), where
            latencies = [e["latency_ms"] for e in chosen]
            assert_in_bucket(body["latency_ms"]["p50"], latencies, Fraction(1, 2))
            assert_in_bucket(body["latency_ms"]["p95"], latencies, Fraction(95, 100))
            # Member states are current, not windowed.
            assert (body["verified_members"], body["restricted_members"]) == (
                verified,
                restricted,
            ), where


async def test_timeseries_matches_the_raw_events(harness: Harness, dataset: Dataset, viewer):
    for name, since, until in windows(dataset.t0):
        for bucket, step, floor in (("hour", HOUR, floor_hour), ("day", DAY, floor_day)):
            start, end = floor(since), floor(until)
            for group in (None, GROUPS[1]):
                response = await get(
                    harness.client, viewer, "timeseries", bucket=bucket, since=since,
                    until=until, group=group,
                )  # fmt: skip
                where = f"{name}, {bucket}, group {group}"
                if start >= end:  # e.g. a window inside one day, by the day
                    problem(response, 422)
                    continue
                assert response.status_code == 200, response.text
                body = response.json()
                assert body["bucket"] == bucket
                assert (parse(body["since"]), parse(body["until"])) == (start, end), where
                chosen = in_window(dataset.events, start, end, group)
                expected = expected_points(chosen, start, end, step)
                assert len(body["points"]) == (end - start) / step, where
                got = [
                    (parse(p["t"]), p["checks"], p["passed"], p["blocked"], p["errors"])
                    for p in body["points"]
                ]
                assert got == expected, where


async def test_top_groups_match_the_raw_events(harness: Harness, dataset: Dataset, viewer):
    for name, since, until in windows(dataset.t0):
        start, end = effective(since, until)
        if start >= end:
            continue
        for limit in (None, 3, 50):
            body = await ok(
                harness.client, viewer, "top-groups", since=since, until=until, limit=limit
            )
            chosen = in_window(dataset.events, start, end, None)
            assert (parse(body["since"]), parse(body["until"])) == (start, end)
            assert body["items"] == expected_top(chosen, limit or 10), f"{name}, limit {limit}"


async def test_channels_match_the_raw_events(harness: Harness, dataset: Dataset, viewer):
    for name, since, until in windows(dataset.t0):
        start, end = effective(since, until)
        if start >= end:
            continue
        for group in (None, GROUPS[0], GROUPS[3]):
            body = await ok(
                harness.client, viewer, "channels", since=since, until=until, group=group
            )
            chosen = in_window(dataset.events, start, end, group)
            assert (parse(body["since"]), parse(body["until"])) == (start, end)
            assert body["items"] == expected_channels(chosen), f"{name}, group {group}"


async def test_default_window_is_the_seven_days_to_the_end_of_this_hour(
    harness: Harness, dataset: Dataset, viewer
):
    before = datetime.now(UTC)
    summary = await ok(harness.client, viewer, "summary")
    hourly = await ok(harness.client, viewer, "timeseries")
    daily = await ok(harness.client, viewer, "timeseries", bucket="day")
    top = await ok(harness.client, viewer, "top-groups")
    after = datetime.now(UTC)
    ends = {floor_hour(before) + HOUR, floor_hour(after) + HOUR}
    for body in (summary, hourly, top):
        assert parse(body["until"]) in ends
        assert parse(body["until"]) - parse(body["since"]) == 7 * DAY
    assert len(hourly["points"]) == 7 * 24
    assert parse(daily["until"]) in {floor_day(before) + DAY, floor_day(after) + DAY}
    assert parse(daily["until"]) - parse(daily["since"]) == 7 * DAY
    assert len(daily["points"]) == 7
    # All the data (four days old at most) is inside the default window.
    assert summary["checks"] == len(dataset.events)
    assert sum(p["checks"] for p in hourly["points"]) == len(dataset.events)
    assert sum(p["checks"] for p in daily["points"]) == len(dataset.events)


# ---------------------------------------------------------------- windows and their edges


async def test_since_is_inclusive_and_until_exclusive_at_hour_edges(harness: Harness, bot, viewer):
    t = floor_hour(datetime.now(UTC)) - 5 * HOUR
    at = [t - US, t, t + HOUR - US, t + HOUR]
    await post_events(harness.client, bot, [event(at=a, user_id=i + 1) for i, a in enumerate(at)])
    cases = [
        (t, t + HOUR, 2),  # t and t + 1 h - 1 µs; not t + 1 h
        (t + timedelta(minutes=30), t + HOUR + timedelta(minutes=59), 2),  # the same, truncated
        (t - US, t + HOUR, 3),  # since truncates to t - 1 h: takes t - 1 µs too
        (t, t + HOUR + US, 2),  # until truncates to t + 1 h, which stays excluded
        (t, t + 2 * HOUR, 3),
        (t - HOUR, t + 2 * HOUR, 4),
    ]
    for since, until, checks in cases:
        summary = await ok(harness.client, viewer, "summary", since=since, until=until)
        assert summary["checks"] == checks, (since, until)
        assert (parse(summary["since"]), parse(summary["until"])) == effective(since, until)
        series = await ok(harness.client, viewer, "timeseries", since=since, until=until)
        assert sum(p["checks"] for p in series["points"]) == checks


@pytest.mark.parametrize(
    ("path", "params", "detail"),
    [
        (
            "summary",
            {"since": "2026-01-02T00:00:00Z", "until": "2026-01-01T00:00:00Z"},
            "query.since: must be before until (after truncation to the bucket)",
        ),
        (
            "summary",
            {"since": "2026-01-01T00:00:00Z", "until": "2026-01-01T00:00:00Z"},
            "query.since: must be before until (after truncation to the bucket)",
        ),
        (
            "top-groups",  # same hour once truncated
            {"since": "2026-01-01T10:15:00Z", "until": "2026-01-01T10:45:00Z"},
            "query.since: must be before until (after truncation to the bucket)",
        ),
        (
            "timeseries",  # same day once truncated to days
            {"bucket": "day", "since": "2026-01-01T01:00:00Z", "until": "2026-01-01T23:00:00Z"},
            "query.since: must be before until (after truncation to the bucket)",
        ),
        (
            "channels",
            {"since": "2026-01-01T10:00:00", "until": "2026-01-02T10:00:00Z"},
            "query.since: must be an RFC 3339 time with an offset, e.g. 2026-11-26T10:00:00Z",
        ),
        (
            "summary",
            {"until": "2026-01-02T10:00:00"},
            "query.until: must be an RFC 3339 time with an offset, e.g. 2026-11-26T10:00:00Z",
        ),
        (
            "timeseries",
            {"since": "2026-01-01T00:00:00Z", "until": "2026-03-25T09:00:00Z"},  # 2001 hours
            "query.since: the window holds more than 2000 hours",
        ),
        (
            "timeseries",
            {"bucket": "day", "since": "2020-01-01T00:00:00Z", "until": "2025-06-24T00:00:00Z"},
            "query.since: the window holds more than 2000 days",
        ),
    ],
)
async def test_bad_windows_are_422(harness: Harness, viewer, path, params, detail):
    body = problem(
        await harness.client.get(f"/api/v1/analytics/{path}", params=params, headers=viewer), 422
    )
    assert body["detail"] == detail


@pytest.mark.parametrize(
    ("path", "params"),
    [
        ("timeseries", {"bucket": "week"}),
        ("top-groups", {"limit": 0}),
        ("top-groups", {"limit": 51}),
        ("summary", {"group": "abc"}),
        ("summary", {"since": "yesterday"}),
    ],
)
async def test_bad_parameters_are_422(harness: Harness, viewer, path, params):
    problem(
        await harness.client.get(f"/api/v1/analytics/{path}", params=params, headers=viewer), 422
    )


async def test_exactly_2000_points_are_allowed(harness: Harness, viewer):
    since = datetime(2026, 1, 1, tzinfo=UTC)
    hourly = await ok(harness.client, viewer, "timeseries", since=since, until=since + 2000 * HOUR)
    assert len(hourly["points"]) == 2000
    assert all(p["checks"] == 0 for p in hourly["points"])
    daily = await ok(
        harness.client, viewer, "timeseries", bucket="day", since=since - 1999 * DAY,
        until=since + DAY,
    )  # fmt: skip
    assert len(daily["points"]) == 2000
    # The summary has no point limit.
    long = await ok(harness.client, viewer, "summary", since=since - 3000 * DAY, until=since)
    assert long["checks"] == 0


async def test_empty_answers(harness: Harness, viewer):
    since = datetime(2026, 1, 1, tzinfo=UTC)
    summary = await ok(harness.client, viewer, "summary", since=since, until=since + DAY)
    assert summary == {
        "since": "2026-01-01T00:00:00Z",
        "until": "2026-01-02T00:00:00Z",
        "checks": 0,
        "passed": 0,
        "blocked": 0,
        "errors": 0,
        "pass_rate": None,
        "unique_users": 0,
        "unique_users_estimated": False,
        "cache_hit_rate": None,
        "latency_ms": {"p50": None, "p95": None},
        "active_groups": 0,
        "verified_members": 0,
        "restricted_members": 0,
    }
    top = await ok(harness.client, viewer, "top-groups", since=since, until=since + DAY)
    assert top == {"since": "2026-01-01T00:00:00Z", "until": "2026-01-02T00:00:00Z", "items": []}
    channels = await ok(harness.client, viewer, "channels", since=since, until=since + DAY)
    assert channels["items"] == []


async def test_latency_percentiles_in_the_open_bucket_and_exact_rates(
    harness: Harness, bot, viewer
):
    t = floor_hour(datetime.now(UTC)) - 2 * HOUR
    events = [event(at=t, user_id=i + 1, latency_ms=40_000 + i, cached=i < 1) for i in range(3)]
    events.append(event(at=t, user_id=9, result="blocked", latency_ms=45_000))
    await post_events(harness.client, bot, events)
    body = await ok(harness.client, viewer, "summary", since=t, until=t + HOUR)
    assert body["latency_ms"] == {"p50": 30000.0, "p95": 30000.0}
    assert (body["pass_rate"], body["cache_hit_rate"]) == (0.75, 0.25)
    assert (body["unique_users"], body["active_groups"]) == (4, 1)


async def test_deleted_group_keeps_its_numbers(harness: Harness, bot, editor, viewer):
    client = harness.client
    gone, kept = GROUPS[0], GROUPS[1]
    for chat_id in (gone, kept):
        await register_group(client, bot, chat_id, title=f"G{chat_id}")
    t = floor_hour(datetime.now(UTC)) - 3 * HOUR
    await post_events(
        client,
        bot,
        [
            *(
                event(gone, user, result, t)
                for user, result in [(1, "passed"), (2, "blocked"), (3, "passed")]
            ),
            event(kept, 4, "passed", t),
        ],
    )
    before = await ok(client, viewer, "summary", since=t, until=t + HOUR, group=gone)
    assert (before["checks"], before["verified_members"], before["restricted_members"]) == (3, 2, 1)
    assert (await client.delete(f"/api/v1/groups/{gone}", headers=editor)).status_code == 204

    top = await ok(client, viewer, "top-groups", since=t, until=t + HOUR)
    assert top["items"] == [
        {"chat_id": gone, "title": None, "checks": 3, "blocked": 1, "pass_rate": 2 / 3},
        {"chat_id": kept, "title": f"G{kept}", "checks": 1, "blocked": 0, "pass_rate": 1.0},
    ]
    after = await ok(client, viewer, "summary", since=t, until=t + HOUR, group=gone)
    assert (after["checks"], after["blocked"], after["unique_users"]) == (3, 1, 3)
    # Its member states went with it (they are current states, not history).
    assert (after["verified_members"], after["restricted_members"]) == (0, 0)
    channels = await ok(client, viewer, "channels", since=t, until=t + HOUR, group=gone)
    assert channels["items"] == [{"chat_id": CHANNELS[0], "title": None, "blocks": 1}]
    everyone = await ok(client, viewer, "summary", since=t, until=t + HOUR)
    assert (everyone["checks"], everyone["active_groups"]) == (4, 2)


async def test_migrated_group_takes_its_numbers_along(harness: Harness, bot, viewer):
    """A migration moves the rollups, channel rollups and sketches with the log and the
    members, merged into what the new id holds already (the bot reported there before
    migrating; some hours hold both). Only these two ids have events, so afterwards the
    new id's numbers are everyone's, and the old id has none."""
    client = harness.client
    old, new = GROUPS[0], GROUPS[3]  # a registered group, an unregistered supergroup
    await register_group(client, bot, old, title="Basic")
    rng = random.Random(6)
    start = floor_day(datetime.now(UTC)) - 3 * DAY + 20 * HOUR  # across day boundaries

    def checked(chat_id: int, user: int) -> dict:
        result = rng.choice(["passed", "passed", "blocked", "error"])
        missing = rng.sample(CHANNELS, rng.randint(1, 2)) if result == "blocked" else []
        at = start + rng.randrange(30 * 3600) * timedelta(seconds=1)
        latency = rng.choice(SPECIAL_LATENCIES)
        cached = rng.random() < 0.3
        return event(chat_id, user, result, at, missing_channel_ids=missing,
                     latency_ms=latency, cached=cached)  # fmt: skip

    events = [
        checked(chat_id, user)
        for chat_id, users in ((old, range(1, 40)), (new, range(25, 60)))
        for user in users
        for _ in range(3)
    ]
    await post_events(client, bot, events)
    window = {"since": floor_day(start) - DAY, "until": floor_hour(datetime.now(UTC)) + HOUR}
    views = [("summary", {}), ("timeseries", {"bucket": "hour"}),
             ("timeseries", {"bucket": "day"}), ("channels", {})]  # fmt: skip

    async def read(group: int | None) -> list[dict]:
        return [await ok(client, viewer, path, **window, **params, group=group)
                for path, params in views]  # fmt: skip

    everyone, of_old, of_new = await read(None), await read(old), await read(new)
    assert of_new != everyone and of_old[0]["checks"] + of_new[0]["checks"] == len(events)

    url = f"/api/v1/bot/groups/{old}/migrate"
    migrated = await client.post(url, json={"new_chat_id": new}, headers=bot)
    assert migrated.status_code == 200, migrated.text

    after, now_new, now_old = await read(None), await read(new), await read(old)
    assert now_new == after
    counters = ("checks", "passed", "blocked", "errors", "unique_users", "cache_hit_rate")
    for name in (*counters, "pass_rate", "latency_ms"):
        assert now_new[0][name] == everyone[0][name], name
    for name in ("checks", "passed", "blocked", "errors"):
        assert now_new[0][name] == of_old[0][name] + of_new[0][name]
    assert now_new[0]["active_groups"] == 1 and everyone[0]["active_groups"] == 2
    moved = [{**e, "chat_id": new} for e in events]
    verified, restricted = member_counts(moved, new)
    assert (now_new[0]["verified_members"], now_new[0]["restricted_members"]) == (
        verified,
        restricted,
    )
    assert now_new[1:] == everyone[1:]  # the timeseries and the channels
    assert now_old[0]["checks"] == now_old[0]["unique_users"] == 0
    assert now_old[0]["verified_members"] == now_old[0]["restricted_members"] == 0
    assert all(p["checks"] == 0 for view in now_old[1:3] for p in view["points"])
    assert now_old[3]["items"] == []
    top = await ok(client, viewer, "top-groups", **window)
    total = everyone[0]
    assert top["items"] == [
        {"chat_id": new, "title": "Basic", "checks": total["checks"],
         "blocked": total["blocked"], "pass_rate": total["pass_rate"]}
    ]  # fmt: skip


async def test_analytics_need_staff(harness: Harness, viewer):
    for path in ("summary", "timeseries", "top-groups", "channels"):
        body = problem(await harness.client.get(f"/api/v1/analytics/{path}"), 401)
        assert body["detail"] == "missing bearer token"
        outsider = harness.auth(str(uuid.uuid4()))
        problem(await harness.client.get(f"/api/v1/analytics/{path}", headers=outsider), 403)
        assert (await get(harness.client, viewer, path)).status_code == 200


# ---------------------------------------------------------------- retention


async def test_purge_deletes_old_events_and_keeps_the_rollups(harness: Harness, bot, viewer, purge):
    client = harness.client
    now = datetime.now(UTC)
    cutoff = partitions.horizon(now, 7)  # whole weeks go
    old = [event(GROUPS[0], 100 + i, "blocked", cutoff - 3 * DAY + i * HOUR) for i in range(5)]
    old += [event(GROUPS[1], 200, "passed", cutoff - HOUR)]
    new = [event(GROUPS[0], 300, "passed", now - 6 * DAY), event(GROUPS[2], 301, at=now - HOUR)]
    await post_events(client, bot, old + new)
    since, until = floor_day(cutoff - 4 * DAY), floor_hour(now) + HOUR
    reads = {
        "summary": {},
        "timeseries": {"bucket": "day"},
        "top-groups": {},
        "channels": {},
    }
    before = {
        p: await ok(client, viewer, p, since=since, until=until, **q) for p, q in reads.items()
    }
    assert before["summary"]["checks"] == 8

    out = await purge("--days", "7", "--batch", "2")
    assert "purged 6 verification events of the weeks older than 7 days (rollups kept)" in out

    log = await client.get("/api/v1/verifications", params={"limit": 200}, headers=viewer)
    assert log.status_code == 200, log.text
    assert {v["event_id"] for v in log.json()["items"]} == {e["event_id"] for e in new}
    after = {
        p: await ok(client, viewer, p, since=since, until=until, **q) for p, q in reads.items()
    }
    assert after == before
    # A second run finds nothing left to delete.
    assert await cli._purge(harness.services.settings, 7, 100) == 0


async def test_concurrent_batches_count_once(harness: Harness, bot, viewer):
    """Several bot replicas posting at once, some of them the same retried batch."""
    rng = random.Random(7)
    t0 = floor_day(datetime.now(UTC)) - 4 * DAY
    events = random_events(t0, rng, 3000)
    batches = [events[i : i + 250] for i in range(0, len(events), 250)]
    for batch in batches[:2]:  # rows created now get ids out of the later batches' key order
        await post_events(harness.client, bot, batch)
    responses = await asyncio.gather(
        *[ingest(harness.client, bot, b) for b in [*batches[2:], batches[5], batches[6]]]
    )
    assert [r.status_code for r in responses] == [200] * len(responses), [
        r.text for r in responses if r.status_code != 200
    ]
    assert sum(r.json()["accepted"] for r in responses) == len(events) - 500
    since, until = t0, t0 + 4 * DAY
    summary = await ok(harness.client, viewer, "summary", since=since, until=until)
    results = Counter(e["result"] for e in events)
    assert (summary["checks"], summary["passed"], summary["blocked"]) == (
        len(events),
        results["passed"],
        results["blocked"],
    )
    assert users_close(summary["unique_users"], len({e["user_id"] for e in events}))
    series = await ok(harness.client, viewer, "timeseries", since=since, until=until)
    got = [
        (parse(p["t"]), p["checks"], p["passed"], p["blocked"], p["errors"])
        for p in series["points"]
    ]
    assert got == expected_points(events, since, until, HOUR)


async def test_unique_users_within_2_percent_and_flagged_past_coupon_mode(
    harness: Harness, bot, viewer, database_url: str
):
    """41,000 users: far past the sketches' exact coupon mode, so estimated and said so
    (41,000 was where the old hand-written HyperLogLog's estimator switched). On PostgreSQL
    the folded dense sketches are stored lz4-compressed and read back the same."""
    users = random.Random(0).sample(range(1, 2**40 - 1), 41_000)
    t = floor_hour(datetime.now(UTC)) - 2 * HOUR
    events = [
        event(GROUPS[i % 2], user, at=t + timedelta(milliseconds=i)) for i, user in enumerate(users)
    ]
    assert await post_events(harness.client, bot, events) == {"accepted": 41_000, "duplicates": 0}
    in_group = await ok(harness.client, viewer, "summary", since=t, until=t + HOUR, group=GROUPS[0])
    assert (in_group["checks"], in_group["active_groups"]) == (20_500, 1)
    assert abs(in_group["unique_users"] - 20_500) <= 0.02 * 20_500, in_group["unique_users"]
    assert in_group["unique_users_estimated"] is True
    body = await ok(harness.client, viewer, "summary", since=t, until=t + HOUR)
    assert body["checks"] == 41_000
    assert abs(body["unique_users"] - 41_000) <= 0.02 * 41_000, body["unique_users"]
    if not database_url.startswith("postgresql"):
        return
    async with harness.sessionmaker() as session:
        await analytics.lock_folding(session)
        await analytics.fold(session, limit=None)
        await session.commit()
        stored = await session.execute(
            text("SELECT pg_column_compression(sketch) FROM user_sketches WHERE chat_id = :c"),
            {"c": GROUPS[0]},
        )
    assert {method for (method,) in stored} == {"lz4"}  # the hour's and the day's
    folded = await ok(harness.client, viewer, "summary", since=t, until=t + HOUR, group=GROUPS[0])
    assert folded["unique_users"] == in_group["unique_users"]


async def test_offsets_are_read_as_instants_and_buckets_are_utc(harness: Harness, bot, viewer):
    t = floor_day(datetime.now(UTC)) - 2 * DAY + HOUR  # 01:00 UTC
    minus2, plus2 = timezone(timedelta(hours=-2)), timezone(timedelta(hours=2))
    # 23:30 the day before at UTC-2 is 01:30 UTC: hour t, day floor_day(t).
    sent = event(at=t)
    sent["occurred_at"] = (t + timedelta(minutes=30)).astimezone(minus2).isoformat()
    assert sent["occurred_at"].endswith("23:30:00-02:00")
    await post_events(harness.client, bot, [sent])
    since, until = t.astimezone(plus2), (t + HOUR).astimezone(plus2)
    response = await harness.client.get(
        "/api/v1/analytics/summary",
        params={"since": since.isoformat(), "until": until.isoformat()},
        headers=viewer,
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert (body["since"], body["until"], body["checks"]) == (z(t), z(t + HOUR), 1)
    local_evening = (t + timedelta(minutes=30)).astimezone(timezone(timedelta(hours=-5)))
    response = await harness.client.get(
        "/api/v1/analytics/timeseries",
        params={"bucket": "day", "since": local_evening.isoformat(), "until": z(t + DAY)},
        headers=viewer,
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["since"] == z(floor_day(t))
    assert [(p["t"], p["checks"]) for p in body["points"]] == [(z(floor_day(t)), 1)]


async def test_small_group_counted_exactly_and_not_flagged(harness: Harness, bot, viewer):
    """The issue's case: 184 users, shown as 179 by the old HyperLogLog."""
    users = random.Random(184).sample(range(1, 2**40 - 1), 184)
    t = floor_hour(datetime.now(UTC)) - 3 * HOUR
    events = [event(GROUPS[0], u, at=t + timedelta(seconds=i)) for i, u in enumerate(users)]
    await post_events(harness.client, bot, events + events[:50])  # repeats count once
    for group in (GROUPS[0], None):
        body = await ok(harness.client, viewer, "summary", since=t, until=t + DAY, group=group)
        assert (body["unique_users"], body["unique_users_estimated"]) == (184, False)


async def test_a_batch_repeating_stored_events_counts_only_its_new_events_users(
    harness: Harness, bot, viewer
):
    """Ingestion stores a batch's delta sketches with its events when all of them are new;
    a batch holding events stored before falls back to the new ones' users alone. The
    repeat here names another user under a stored event's key: the log keeps the first,
    and so must the count."""
    t = floor_hour(datetime.now(UTC)) - 2 * HOUR
    first = [event(GROUPS[0], u, at=t + timedelta(seconds=u)) for u in range(1, 6)]
    assert await post_events(harness.client, bot, first) == {"accepted": 5, "duplicates": 0}
    again = [{**first[0], "user_id": 99}, event(GROUPS[0], 6, at=t + timedelta(minutes=9))]
    assert await post_events(harness.client, bot, again) == {"accepted": 1, "duplicates": 1}
    for group in (GROUPS[0], None):
        body = await ok(harness.client, viewer, "summary", since=t, until=t + HOUR, group=group)
        assert (body["checks"], body["unique_users"]) == (6, 6), group


async def test_events_under_a_migrated_id_count_their_users_under_the_new_one(
    harness: Harness, bot, viewer
):
    """A bot still reports under a group's old id after it migrated (batched before, or from
    a replica that has not heard): the batch's sketches follow its events to the new id."""
    old, new = GROUPS[0], GROUPS[3]
    await register_group(harness.client, bot, old, title="Basic")
    url = f"/api/v1/bot/groups/{old}/migrate"
    migrated = await harness.client.post(url, json={"new_chat_id": new}, headers=bot)
    assert migrated.status_code == 200, migrated.text
    t = floor_hour(datetime.now(UTC)) - HOUR
    late = [event(old, u, at=t + timedelta(seconds=u)) for u in range(1, 8)]
    await post_events(harness.client, bot, late)
    for group, users in ((new, 7), (old, 0), (None, 7)):
        body = await ok(harness.client, viewer, "summary", since=t, until=t + HOUR, group=group)
        assert (body["checks"], body["unique_users"]) == (users, users), group


async def test_window_reaching_legacy_registers_adds_their_estimate_and_is_flagged(
    harness: Harness, bot, viewer
):
    """Buckets older than the raw log at the DataSketches migration keep their old
    registers (`legacy`): a window reaching them adds their estimate, flagged."""
    old_day = floor_day(datetime.now(UTC)) - 30 * DAY
    registers = np.zeros(analytics.LEGACY_M, dtype=np.uint8)
    registers[:100] = 1  # about 100 users, by linear counting
    legacy = analytics.LEGACY_DENSE + registers.tobytes()
    async with harness.sessionmaker() as session:
        await session.execute(
            insert(user_sketches),
            [
                {"grain": "d", "chat_id": c, "bucket": old_day, "sketch": b"", "legacy": legacy}
                for c in (0, GROUPS[0])
            ],
        )
        await session.commit()
    t = old_day + 2 * DAY
    await post_events(harness.client, bot, [event(GROUPS[0], u, at=t) for u in (1, 2, 3)])
    expected = 3 + analytics.legacy_estimate(registers)
    for group in (GROUPS[0], None):
        whole = await ok(
            harness.client, viewer, "summary", since=old_day, until=t + DAY, group=group
        )
        assert (whole["unique_users"], whole["unique_users_estimated"]) == (expected, True)
        recent = await ok(harness.client, viewer, "summary", since=t, until=t + DAY, group=group)
        assert (recent["unique_users"], recent["unique_users_estimated"]) == (3, False)


# ---------------------------------------------------------------- folding


async def counts_every_event(
    reader: Harness, viewer: dict, window: dict[str, datetime], sent: list[dict]
) -> None:
    """Every analytics answer over `window` counts every event sent, each once."""
    summary = await ok(reader.client, viewer, "summary", **window)
    assert summary["checks"] == len(sent)
    assert summary["unique_users"] == len({e["user_id"] for e in sent})
    assert not summary["unique_users_estimated"]
    series = await ok(reader.client, viewer, "timeseries", **window)
    assert sum(p["checks"] for p in series["points"]) == len(sent)
    top = await ok(reader.client, viewer, "top-groups", **window)
    assert sum(g["checks"] for g in top["items"]) == len(sent)
    channels = await ok(reader.client, viewer, "channels", **window)
    blocked = sum(e["result"] == "blocked" for e in sent)
    assert sum(c["blocks"] for c in channels["items"]) == blocked


async def test_reads_after_an_acknowledged_batch_count_it_on_every_replica_while_folding(
    harness: Harness, replica: Harness, bot, viewer
):
    """Read-your-writes: every analytics answer given after a batch was acknowledged counts
    it exactly once, on another replica too, while a folder merges a few deltas at a time
    as fast as it can (so reads land before, during and after folds)."""
    stop = asyncio.Event()

    async def folding() -> None:
        while not stop.is_set():
            async with harness.sessionmaker() as session:
                if await analytics.lock_folding(session, wait=False):
                    await analytics.fold(session, 3)
                    await session.commit()
            await asyncio.sleep(0)

    task = asyncio.create_task(folding())
    t0 = floor_hour(datetime.now(UTC)) - 3 * HOUR
    sent: list[dict] = []
    try:
        for i in range(10):
            batch = [
                event(
                    GROUPS[j % 2], user_id=100 + (i * 7 + j) % 40,
                    result="blocked" if j % 3 == 0 else "passed",
                    at=t0 + timedelta(minutes=13 * i + j),
                )
                for j in range(12)
            ]  # fmt: skip
            await post_events(harness.client, bot, batch)
            sent += batch
            window = {"since": t0, "until": t0 + 4 * HOUR}
            for reader in (harness, replica):
                await counts_every_event(reader, viewer, window, sent)
    finally:
        stop.set()
        await task
    assert await fold(harness) >= 0
    summary = await ok(harness.client, viewer, "summary", since=t0, until=t0 + 4 * HOUR)
    assert summary["checks"] == len(sent)


async def test_the_folder_outlives_a_stalled_database_and_folds_later(
    harness: Harness, bot, viewer, database_url: str
):
    """A folding pass that cannot get its rows (a lock held past the lock timeout) rolls
    back whole; the folder carries on and folds them at a later pass."""
    if not database_url.startswith("postgresql"):
        pytest.skip("needs a second PostgreSQL session holding a lock")
    import asyncpg

    blocker = await asyncpg.connect(database_url.replace("+asyncpg", ""))
    try:
        async with blocker.transaction():
            # Ingestion never writes the rollup tables (only deltas), so it goes on; every
            # folding pass waits for this lock past DATABASE_LOCK_TIMEOUT (2 s) and fails.
            await blocker.execute("LOCK TABLE rollups IN SHARE MODE")
            users = (1, 2, 3)
            await post_events(harness.client, bot, [event(GROUPS[0], user_id=u) for u in users])
            await asyncio.sleep(3)
            async with harness.sessionmaker() as session:
                left = await session.scalar(select(func.count()).select_from(rollup_deltas))
            assert left == 2  # the hour's and the day's
    finally:
        await blocker.close()
    for _ in range(100):
        async with harness.sessionmaker() as session:
            left = await session.scalar(select(func.count()).select_from(rollup_deltas))
        if not left:
            break
        await asyncio.sleep(0.1)
    assert left == 0
    folder = harness.services.folder
    assert folder is not None and not folder.done()
    summary = await ok(harness.client, viewer, "summary", group=GROUPS[0])
    assert (summary["checks"], summary["unique_users"]) == (3, 3)


async def test_seed_demo_goes_through_ingestion_and_leaves_nothing_unfolded(
    harness: Harness, viewer
):
    """`channelgate seed-demo` runs without a folder: it folds what it wrote before exiting."""
    await stop_folder(harness)
    await cli._seed_demo(harness.services.settings, 3, 1200, 2, 7)
    async with harness.sessionmaker() as session:
        assert await session.scalar(select(func.count()).select_from(rollup_deltas)) == 0
    summary = await ok(
        harness.client, viewer, "summary", since=datetime.now(UTC) - 4 * DAY,
        until=datetime.now(UTC) + HOUR,
    )  # fmt: skip
    assert summary["checks"] == 1200 and summary["active_groups"] == 3


async def test_reads_through_the_read_url_see_every_acknowledged_write(
    harness: Harness, reader: Harness, bot, viewer, request: pytest.FixtureRequest
):
    """DATABASE_READ_URL: the dashboard's reads on another replica (analytics, the log, its
    export, the audit log) see every write acknowledged before them, whether they go to the
    read URL or, when it refuses connections, fall back to the primary."""
    owner = harness.auth(ENV_OWNER)
    t0 = floor_hour(datetime.now(UTC)) - 2 * HOUR
    window = {"since": t0, "until": t0 + 3 * HOUR}
    sent: list[dict] = []
    for i in range(4):
        batch = [
            event(
                GROUPS[j % 2], user_id=1 + 10 * i + j, at=t0 + timedelta(minutes=10 * i + j),
                result="blocked" if j % 3 == 0 else "passed",
            )
            for j in range(10)
        ]  # fmt: skip
        await post_events(harness.client, bot, batch)
        sent += batch
        await counts_every_event(reader, viewer, window, sent)
        log = await reader.client.get("/api/v1/verifications?limit=200", headers=viewer)
        assert len(log.json()["items"]) == len(sent)
        export = await reader.client.get("/api/v1/verifications/export", headers=viewer)
        assert export.text.count("\n") == len(sent) + 1

    created = await harness.client.post("/api/v1/bot-keys", json={"name": "r"}, headers=owner)
    assert created.status_code == 201, created.text
    audit = await reader.client.get("/api/v1/audit", headers=owner)
    assert audit.status_code == 200, audit.text
    assert audit.json()["items"][0]["resource_id"] == str(created.json()["id"])

    async with harness.sessionmaker() as session:
        reading = await session.scalar(
            text(
                "SELECT count(*) FROM pg_stat_activity"
                " WHERE application_name = 'channelgate-read' AND datname = current_database()"
            )
        )
    assert bool(reading) == (request.node.callspec.params["reader"] == "up")
