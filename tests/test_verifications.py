"""The verification log (filters, keyset pagination under concurrent inserts) and its CSV export
(RFC 4180, formula-injection-safe, streamed)."""

import asyncio
import base64
import csv
import io
import json
import random
import re
import uuid
from collections.abc import MutableMapping
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import httpx
import pytest

from tests.conftest import Harness, b64, problem
from tests.factories import CHANNEL_ID, GROUP_ID, event, post_events, z

pytestmark = pytest.mark.anyio

LOG = "/api/v1/verifications"
EXPORT = "/api/v1/verifications/export"
GROUPS = [GROUP_ID, -1001000000002, -4242]
CHANNELS = [CHANNEL_ID, -1002000000002]
USERS = [11, 22, 33, 1099511627775]
RESULTS = ["passed", "blocked", "error"]
TRIGGERS = ["message", "join", "button", "channel_leave", "recheck"]
FIELDS = {
    "id", "event_id", "chat_id", "user_id", "result", "trigger", "missing_channel_ids",
    "cached", "latency_ms", "error", "occurred_at", "received_at",
}  # fmt: skip
CSV_HEADER = [
    "id", "event_id", "chat_id", "user_id", "result", "trigger", "missing_channel_ids",
    "cached", "latency_ms", "error", "occurred_at", "received_at",
]  # fmt: skip
MALFORMED = "query.cursor: malformed cursor; use next_cursor as returned"


def parse(value: str) -> datetime:
    return datetime.fromisoformat(value)


async def page(client: httpx.AsyncClient, auth: dict, **params: Any) -> dict:
    response = await client.get(LOG, params=params, headers=auth)
    assert response.status_code == 200, response.text
    return response.json()


async def walk(client: httpx.AsyncClient, auth: dict, limit: int, **params: Any) -> list[dict]:
    items, cursor = [], None
    while True:
        body = await page(
            client, auth, limit=limit, **params, **({"cursor": cursor} if cursor else {})
        )
        assert len(body["items"]) <= limit
        items += body["items"]
        cursor = body["next_cursor"]
        if cursor is None:
            return items
        assert len(body["items"]) == limit


def newest_first(items: list[dict]) -> bool:
    keys = [(parse(v["occurred_at"]), v["id"]) for v in items]
    return keys == sorted(keys, reverse=True) and len(set(keys)) == len(keys)


def cursor_of(*values: Any) -> str:
    return b64(list(values))


@pytest.fixture
async def logged(harness: Harness, bot) -> list[dict]:
    """90 events over ten hours, in pairs and triples sharing one `occurred_at`."""
    rng = random.Random(4242)
    base = datetime.now(UTC).replace(microsecond=0) - timedelta(hours=10)
    events = []
    for i in range(90):
        result = rng.choice(RESULTS)
        events.append(
            event(
                chat_id=rng.choice(GROUPS),
                user_id=rng.choice(USERS),
                result=result,
                at=base + timedelta(minutes=(i // 3) * 20, microseconds=rng.choice([0, 0, 7])),
                trigger=rng.choice(TRIGGERS),
                cached=rng.random() < 0.5,
                latency_ms=rng.randrange(0, 5000),
                error="timeout" if result == "error" else None,
            )
        )
    rng.shuffle(events)
    await post_events(harness.client, bot, events)
    return events


# ---------------------------------------------------------------- the log


async def test_item_shape(harness: Harness, bot, viewer):
    at = datetime(2026, 1, 2, 3, 4, 5, 678000, tzinfo=UTC)
    sent = event(
        GROUPS[1], 33, "blocked", at, trigger="join", missing_channel_ids=CHANNELS, cached=True,
        latency_ms=987, error="partial: one channel unreachable",
    )  # fmt: skip
    before = datetime.now(UTC)
    await post_events(harness.client, bot, [sent])
    item = (await page(harness.client, viewer))["items"][0]
    assert set(item) == FIELDS
    assert isinstance(item["id"], int)
    assert {k: item[k] for k in FIELDS - {"id", "received_at", "occurred_at"}} == {
        k: sent[k] for k in FIELDS - {"id", "received_at", "occurred_at"}
    }
    assert parse(item["occurred_at"]) == at
    assert item["occurred_at"].endswith("Z") and item["received_at"].endswith("Z")
    assert before - timedelta(seconds=1) <= parse(item["received_at"]) <= datetime.now(UTC)


async def test_any_rfc3339_offset_is_stored_as_its_instant(harness: Harness, bot, viewer):
    # RFC 3339 allows offsets up to ±23:59, PostgreSQL reads up to ±15:59 (schemathesis found it)
    at = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    sent = [
        event(user_id=u, occurred_at=at.astimezone(timezone(offset)).isoformat())
        for u, offset in ((1001, timedelta(hours=-20, minutes=-17)), (1002, timedelta(hours=23)))
    ]
    assert await post_events(harness.client, bot, sent) == {"accepted": 2, "duplicates": 0}
    items = (await page(harness.client, viewer))["items"]
    assert sorted((i["user_id"], parse(i["occurred_at"])) for i in items) == [
        (1001, at),
        (1002, at),
    ]


async def test_newest_first_across_pages(harness: Harness, logged: list[dict], viewer):
    first = await page(harness.client, viewer)
    assert len(first["items"]) == 50 and first["next_cursor"]  # the default limit
    items = await walk(harness.client, viewer, 7)
    assert newest_first(items)
    assert [v["event_id"] for v in items][:50] == [v["event_id"] for v in first["items"]]
    assert sorted(v["event_id"] for v in items) == sorted(e["event_id"] for e in logged)
    everything = await page(harness.client, viewer, limit=200)
    assert everything["items"] == items and everything["next_cursor"] is None
    exact = await page(harness.client, viewer, limit=90)
    assert len(exact["items"]) == 90 and exact["next_cursor"] is None
    one = await page(harness.client, viewer, limit=1)
    assert one["items"] == items[:1] and one["next_cursor"]


def matches(e: dict, params: dict[str, Any]) -> bool:
    at = parse(e["occurred_at"])
    return (
        ("group" not in params or e["chat_id"] == params["group"])
        and ("user" not in params or e["user_id"] == params["user"])
        and ("result" not in params or e["result"] == params["result"])
        and ("trigger" not in params or e["trigger"] == params["trigger"])
        and ("since" not in params or at >= parse(params["since"]))
        and ("until" not in params or at < parse(params["until"]))
    )


def filter_cases(logged: list[dict]) -> list[dict[str, Any]]:
    times = sorted({parse(e["occurred_at"]) for e in logged})
    since, until = z(times[5]), z(times[20])  # exactly on events: inclusive, exclusive
    return [
        {"group": GROUPS[0]},
        {"group": GROUPS[2]},
        {"group": -1009999999999},  # no such group: empty
        {"user": USERS[3]},
        {"result": "blocked"},
        {"result": "error"},
        {"trigger": "channel_leave"},
        {"since": since},
        {"until": until},
        {"since": since, "until": until},
        {"group": GROUPS[1], "result": "passed", "since": since},
        {"user": USERS[0], "trigger": "message", "until": until},
    ]


async def test_each_filter(harness: Harness, logged: list[dict], viewer):
    for params in filter_cases(logged):
        expected = {e["event_id"] for e in logged if matches(e, params)}
        items = await walk(harness.client, viewer, 4, **params)
        assert newest_first(items), params
        assert [v["event_id"] for v in items if v["event_id"] in expected] == [
            v["event_id"] for v in items
        ]
        assert {v["event_id"] for v in items} == expected, params
        assert len(items) == len(expected), params


async def test_since_and_until_at_the_same_instant(harness: Harness, bot, viewer):
    t = datetime.now(UTC).replace(microsecond=0) - timedelta(hours=1)
    await post_events(harness.client, bot, [event(at=t - timedelta(microseconds=1)), event(at=t)])
    assert len((await page(harness.client, viewer, since=z(t)))["items"]) == 1
    assert len((await page(harness.client, viewer, until=z(t)))["items"]) == 1
    assert (await page(harness.client, viewer, since=z(t), until=z(t)))["items"] == []


async def test_walk_is_stable_under_concurrent_inserts(
    harness: Harness, logged: list[dict], bot, viewer
):
    client = harness.client
    oldest = min(parse(e["occurred_at"]) for e in logged)
    items, cursor, inserted_older, inserted_newer = [], None, set(), set()
    while True:
        params: dict[str, Any] = {"limit": 8, **({"cursor": cursor} if cursor else {})}
        body = await page(client, viewer, **params)
        items += body["items"]
        cursor = body["next_cursor"]
        if cursor is None:
            break
        last_at = parse(body["items"][-1]["occurred_at"])
        newer = [event(), event(at=last_at)]  # a tie with the cursor row: after it by id
        older = [event(at=oldest - timedelta(minutes=len(inserted_older) + 1))]
        await post_events(client, bot, newer + older)
        inserted_newer |= {e["event_id"] for e in newer}
        inserted_older |= {e["event_id"] for e in older}
    ids = [v["event_id"] for v in items]
    assert len(ids) == len(set(ids)), "an item came twice"
    assert newest_first(items)
    assert set(ids) == {e["event_id"] for e in logged} | inserted_older
    assert not set(ids) & inserted_newer


@pytest.mark.parametrize(
    "cursor",
    [
        "not a cursor!",
        "%%%",
        base64.urlsafe_b64encode(b"not json").decode(),
        cursor_of("verifications:-occurred_at"),  # too short
        cursor_of("verifications:-occurred_at", "2026-01-01T00:00:00+00:00", 5, 6),  # too long
        cursor_of("audit:-at", "2026-01-01T00:00:00+00:00", 5),  # the audit log's cursor
        cursor_of("verifications:-occurred_at", "2026-01-01T00:00:00", 5),  # naive
        cursor_of("verifications:-occurred_at", "yesterday", 5),
        cursor_of("verifications:-occurred_at", 17, 5),
        cursor_of("verifications:-occurred_at", "2026-01-01T00:00:00+00:00", "5"),
        cursor_of("verifications:-occurred_at", "2026-01-01T00:00:00+00:00", 5.5),
        cursor_of("verifications:-occurred_at", "2026-01-01T00:00:00+00:00", True),
        cursor_of("verifications:-occurred_at", "2026-01-01T00:00:00+00:00", 2**63),
        cursor_of("verifications:-occurred_at", "2026-01-01T00:00:00+00:00", None),
        base64.urlsafe_b64encode(json.dumps({"-occurred_at": 1}).encode()).decode(),
        base64.urlsafe_b64encode(b"\xff\xfe").decode(),
    ],
)
async def test_malformed_cursor_is_422(harness: Harness, viewer, cursor: str):
    response = await harness.client.get(LOG, params={"cursor": cursor}, headers=viewer)
    assert problem(response, 422)["detail"] == MALFORMED


async def test_a_tampered_but_wellformed_cursor_only_moves_the_page(
    harness: Harness, logged: list[dict], viewer
):
    body = await page(harness.client, viewer, limit=5)
    raw = json.loads(base64.urlsafe_b64decode(body["next_cursor"] + "=="))
    assert raw[0] == "verifications:-occurred_at"
    future = cursor_of("verifications:-occurred_at", "2999-01-01T00:00:00+00:00", 2**63 - 1)
    assert len((await page(harness.client, viewer, cursor=future, limit=200))["items"]) == 90
    past = cursor_of("verifications:-occurred_at", "2000-01-01T00:00:00+00:00", 0)
    assert (await page(harness.client, viewer, cursor=past))["items"] == []


NAIVE = "must be an RFC 3339 time with an offset, e.g. 2026-11-26T10:00:00Z"


@pytest.mark.parametrize(
    ("paths", "params", "detail"),
    [
        ((LOG,), {"limit": 0}, None),
        ((LOG,), {"limit": 201}, None),
        ((LOG,), {"limit": "ten"}, None),
        ((LOG,), {"cursor": "x" * 513}, None),
        ((LOG, EXPORT), {"result": "maybe"}, None),
        ((LOG, EXPORT), {"trigger": "poll"}, None),
        ((LOG, EXPORT), {"group": "abc"}, None),
        ((LOG, EXPORT), {"user": 2**63}, None),
        ((LOG, EXPORT), {"since": "2026-01-01T00:00:00"}, f"query.since: {NAIVE}"),
        ((LOG, EXPORT), {"until": "2026-01-01T00:00:00"}, f"query.until: {NAIVE}"),
        ((LOG, EXPORT), {"since": "last week"}, None),
    ],
)
async def test_bad_parameters_are_422(harness: Harness, viewer, paths, params, detail):
    for path in paths:
        body = problem(await harness.client.get(path, params=params, headers=viewer), 422)
        if detail:
            assert body["detail"] == detail
        assert body["errors"]


async def test_limit_bounds(harness: Harness, bot, viewer):
    t = datetime.now(UTC) - timedelta(hours=1)
    await post_events(harness.client, bot, [event(at=t + timedelta(seconds=i)) for i in range(201)])
    assert len((await page(harness.client, viewer, limit=200))["items"]) == 200
    assert len((await page(harness.client, viewer))["items"]) == 50
    last = await page(harness.client, viewer, limit=1)
    rest = await page(harness.client, viewer, limit=200, cursor=last["next_cursor"])
    assert len(rest["items"]) == 200 and rest["next_cursor"] is None


async def test_who_may_read(harness: Harness, bot, viewer, editor, owner):
    await post_events(harness.client, bot, [event()])
    for path in (LOG, EXPORT):
        body = problem(await harness.client.get(path), 401)
        assert body["detail"] == "missing bearer token"
        body = problem(await harness.client.get(path, headers=bot), 401)
        assert body["detail"] == "bot keys are not accepted on dashboard routes"
        outsider = harness.auth(str(uuid.uuid4()))
        problem(await harness.client.get(path, headers=outsider), 403)
        # ?access_token= is for the live feed (EventSource) only.
        token = viewer["Authorization"].removeprefix("Bearer ")
        problem(await harness.client.get(path, params={"access_token": token}), 401)
        for auth in (viewer, editor, owner):
            assert (await harness.client.get(path, headers=auth)).status_code == 200


# ---------------------------------------------------------------- CSV export


async def export(client: httpx.AsyncClient, auth: dict, **params: Any) -> httpx.Response:
    response = await client.get(EXPORT, params=params, headers=auth)
    assert response.status_code == 200, response.text
    return response


async def asgi_body_chunks(harness: Harness, path: str, auth: dict) -> list[bytes]:
    """GET through the bare ASGI app; returns the body messages as the app sent them."""
    chunks: list[bytes] = []
    headers = auth.items()
    done = asyncio.Event()
    requested = False

    async def receive() -> dict[str, Any]:
        nonlocal requested
        if not requested:
            requested = True
            return {"type": "http.request", "body": b"", "more_body": False}
        await done.wait()
        return {"type": "http.disconnect"}

    async def send(message: MutableMapping[str, Any]) -> None:
        if message["type"] == "http.response.start":
            assert message["status"] == 200
        elif message["type"] == "http.response.body":
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                done.set()

    scope = {
        "type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
        "method": "GET", "scheme": "http", "path": path, "raw_path": path.encode(),
        "query_string": b"", "root_path": "", "client": ("127.0.0.1", 1), "server": ("test", 80),
        "headers": [(b"host", b"test"), *[(k.lower().encode(), v.encode()) for k, v in headers]],
    }  # fmt: skip
    await harness.app(scope, receive, send)
    assert done.is_set()
    return chunks


def rows_of(response: httpx.Response) -> list[list[str]]:
    return list(csv.reader(io.StringIO(response.text, newline="")))


async def test_export_headers_and_filename(harness: Harness, bot, viewer):
    await post_events(harness.client, bot, [event()])
    before = datetime.now(UTC).replace(microsecond=0)
    response = await export(harness.client, viewer)
    assert response.headers["content-type"].startswith("text/csv")
    disposition = response.headers["content-disposition"]
    match = re.fullmatch(
        r'attachment; filename="channelgate-verifications-(\d{8}T\d{6}Z)\.csv"', disposition
    )
    assert match, disposition
    stamp = datetime.strptime(match[1], "%Y%m%dT%H%M%SZ").replace(tzinfo=UTC)
    assert before <= stamp <= datetime.now(UTC)
    assert response.text.startswith(",".join(CSV_HEADER) + "\r\n")
    assert rows_of(response)[0] == CSV_HEADER


async def test_empty_export_is_just_the_header(harness: Harness, viewer):
    response = await export(harness.client, viewer)
    assert response.text == ",".join(CSV_HEADER) + "\r\n"


ERRORS = [
    ("plain text", "plain text"),
    ('a, "quoted" word', 'a, "quoted" word'),
    ("two\nlines", "two\nlines"),
    ("crlf\r\ninside", "crlf\r\ninside"),
    ("=HYPERLINK(\"http://x\")", "'=HYPERLINK(\"http://x\")"),
    ("+1+2", "'+1+2"),
    ("-2+3", "'-2+3"),
    ("@SUM(A1)", "'@SUM(A1)"),
    ("\tcmd", "'\tcmd"),
    ("\rcmd", "'\rcmd"),
    ("x=1+2", "x=1+2"),  # only a leading character is dangerous
    ("'already", "'already"),
]  # fmt: skip


async def test_export_quoting_and_formula_injection(harness: Harness, bot, viewer):
    t = datetime(2026, 1, 1, 12, tzinfo=UTC)
    sent = [
        event(GROUPS[0], 1099511627775, "error", t + timedelta(seconds=i), error=error)
        for i, (error, _) in enumerate(ERRORS)
    ]
    sent += [
        event(GROUPS[2], 5, "blocked", t - timedelta(seconds=1), missing_channel_ids=CHANNELS,
              cached=True, latency_ms=0),
        event(GROUPS[1], 6, "passed", t - timedelta(seconds=2), missing_channel_ids=[]),
    ]  # fmt: skip
    await post_events(harness.client, bot, sent)
    response = await export(harness.client, viewer)
    # RFC 4180: CRLF records, a field with a comma, quote or line break quoted, quotes doubled.
    assert '\r\n"a, ""quoted"" word"' not in response.text  # the error is not the first column
    assert ',"a, ""quoted"" word",' in response.text
    assert ',"two\nlines",' in response.text
    assert ',"\'=HYPERLINK(""http://x"")",' in response.text
    rows = rows_of(response)
    assert rows[0] == CSV_HEADER
    by_event = {row[1]: dict(zip(CSV_HEADER, row, strict=True)) for row in rows[1:]}
    assert len(by_event) == len(sent) == len(rows) - 1
    log = {v["event_id"]: v for v in (await page(harness.client, viewer, limit=200))["items"]}
    assert [row[1] for row in rows[1:]] == list(log)  # the log's order: newest first
    for e, (_, cell) in zip(sent, ERRORS, strict=False):
        assert by_event[e["event_id"]]["error"] == cell
    for e in sent:
        row, item = by_event[e["event_id"]], log[e["event_id"]]
        assert row["id"] == str(item["id"])
        assert row["chat_id"] == str(e["chat_id"])  # a negative number is data: no apostrophe
        assert row["chat_id"].startswith("-")
        assert row["user_id"] == str(e["user_id"])
        assert (row["result"], row["trigger"]) == (e["result"], e["trigger"])
        assert row["cached"] == ("true" if e["cached"] else "false")
        assert row["latency_ms"] == str(e["latency_ms"])
        assert parse(row["occurred_at"]) == parse(e["occurred_at"])
        assert row["occurred_at"].endswith("Z") and row["received_at"].endswith("Z")
        assert parse(row["received_at"]) == parse(item["received_at"])
    blocked, passed = by_event[sent[-2]["event_id"]], by_event[sent[-1]["event_id"]]
    # Space-separated; it starts with "-", so it gets the apostrophe like any text cell.
    assert blocked["missing_channel_ids"] == f"'{CHANNELS[0]} {CHANNELS[1]}"
    assert (blocked["error"], blocked["cached"], blocked["latency_ms"]) == ("", "true", "0")
    assert passed["missing_channel_ids"] == ""


async def test_export_applies_the_filters(harness: Harness, logged: list[dict], viewer):
    for params in filter_cases(logged):
        rows = rows_of(await export(harness.client, viewer, **params))
        assert rows[0] == CSV_HEADER
        listed = await walk(harness.client, viewer, 200, **params)
        assert [row[1] for row in rows[1:]] == [v["event_id"] for v in listed], params


async def test_large_export_streams_completely(harness: Harness, bot, viewer):
    start = datetime.now(UTC) - timedelta(days=2)
    events = [
        event(GROUPS[i % 3], USERS[i % 4], RESULTS[i % 3], start + timedelta(seconds=17 * i),
              error=f"=bad {i}" if i % 3 == 2 else None)
        for i in range(5000)
    ]  # fmt: skip
    await post_events(harness.client, bot, events)
    response = await export(harness.client, viewer)
    rows = rows_of(response)
    assert len(rows) == 5001
    assert response.text.count("\r\n") == 5001
    assert {row[1] for row in rows[1:]} == {e["event_id"] for e in events}
    at = [parse(row[10]) for row in rows[1:]]
    assert at == sorted(at, reverse=True)
    assert sum(row[9].startswith("'=bad") for row in rows[1:]) == 1666
    # Streamed in chunks as rows are read, not built whole (driven as raw ASGI: httpx's
    # ASGITransport would join the chunks before handing them over).
    chunks = await asgi_body_chunks(harness, EXPORT, viewer)
    assert len([c for c in chunks if c]) >= 3
    assert b"".join(chunks).decode().count("\r\n") == 5001
    filtered = rows_of(await export(harness.client, viewer, group=GROUPS[0], result="passed"))
    assert len(filtered) - 1 == sum(
        1 for e in events if e["chat_id"] == GROUPS[0] and e["result"] == "passed"
    )
