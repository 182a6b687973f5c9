"""Channels: CRUD, validation, versions, delete while linked, list and pagination, audit."""

from datetime import datetime
from typing import Any

import httpx
import pytest

from tests.conftest import Harness, audit_log, b64, case, each, names_field, problem, valid

pytestmark = pytest.mark.anyio

CHANNEL = {"chat_id": -1009876543210, "title": "Rust News", "username": "@RustNews"}
GROUP = {"chat_id": -1001234567890, "title": "Rust Devs"}
EDITOR_ID = "22222222-2222-4222-8222-222222222222"
CHANNELS = "/api/v1/channels"
GROUPS = "/api/v1/groups"
URL = f"{CHANNELS}/{CHANNEL['chat_id']}"
SUMMARY = (
    "chat_id",
    "title",
    "username",
    "invite_link",
    "group_count",
    "subscriber_count",
    "created_at",
    "updated_at",
    "version",
)


@pytest.fixture
async def editor(harness: Harness) -> dict[str, str]:
    """An editor with a known user id, so audit rows can be checked against it."""
    return await harness.add_staff("editor", EDITOR_ID)


async def create(client: httpx.AsyncClient, auth: dict[str, str], **fields: Any) -> dict:
    response = await client.post(CHANNELS, json={**CHANNEL, **fields}, headers=auth)
    assert response.status_code == 201, response.text
    return response.json()


async def create_group(client: httpx.AsyncClient, auth: dict[str, str], **fields: Any) -> dict:
    response = await client.post(GROUPS, json={**GROUP, **fields}, headers=auth)
    assert response.status_code == 201, response.text
    return response.json()


async def link(client: httpx.AsyncClient, auth: dict[str, str], group: int, channel: int) -> None:
    response = await client.put(f"{GROUPS}/{group}/channels/{channel}", headers=auth)
    assert response.status_code == 201, response.text


async def read(client: httpx.AsyncClient, auth: dict[str, str], chat_id: int) -> dict:
    response = await client.get(f"{CHANNELS}/{chat_id}", headers=auth)
    assert response.status_code == 200, response.text
    return response.json()


async def read_group(client: httpx.AsyncClient, auth: dict[str, str], chat_id: int) -> dict:
    response = await client.get(f"{GROUPS}/{chat_id}", headers=auth)
    assert response.status_code == 200, response.text
    return response.json()


async def listing(client: httpx.AsyncClient, auth: dict[str, str], **params: Any) -> dict:
    response = await client.get(CHANNELS, params=params, headers=auth)
    assert response.status_code == 200, response.text
    return response.json()


# ---------------------------------------------------------------- validation

INVALID = [
    case("title", "", "empty"),
    case("title", "   ", "blank"),
    case("title", "x" * 256, "256-chars"),
    case("title", ["Rust"]),
    case("username", "abc"),
    case("username", "a" * 33, "33-chars"),
    case("username", "9news"),
    case("username", "_news"),
    case("username", "rust.news"),
    case("username", "@@rustnews"),
    case("username", "rustnews\n", "trailing-newline"),
    case("username", "новости", "cyrillic"),
    case("invite_link", "javascript:alert(1)"),
    case("invite_link", "http://t.me/rustnews"),
    case("invite_link", "https://evil.example/t.me/x"),
    case("invite_link", "t.me/rustnews"),
    case("invite_link", "https://t.me/"),
    case("invite_link", "https://t.me/a b"),
    case("invite_link", "https://t.me/" + "x" * 243, "256-chars"),
    case("invite_link", ""),
]

INVALID_CHAT_IDS = [
    case("chat_id", -(10**12), "-10^12"),
    case("chat_id", -999_999_999_999, "basic-group"),
    case("chat_id", -100),
    case("chat_id", -1),
    case("chat_id", 0),
    case("chat_id", 5),
    case("chat_id", -4_000_000_000_001, "below-range"),
    case("chat_id", 2**63, "beyond-int64"),
    case("chat_id", "x"),
    case("chat_id", None),
]

VALID = [
    valid("title", "x" * 255, name="255-chars"),
    valid("username", "@Rust_News", "rust_news"),
    valid("username", "abcd"),
    valid("username", "@" + "Z" * 32, "z" * 32, name="@+32-upper"),
    valid("username", None),
    valid("invite_link", "https://t.me/+AbCdEf123"),
    valid("invite_link", "https://t.me/joinchat/AAAAAEaB"),
    valid("invite_link", "https://t.me/rust_news"),
    valid("invite_link", "tg://join?invite=AbC"),
    valid("invite_link", "https://t.me/" + "x" * 242, name="255-chars"),
    valid("invite_link", None),
]


async def test_invalid_values_on_create_are_422_naming_the_field(client, editor):
    async def check(field: str, value: Any) -> None:
        response = await client.post(CHANNELS, json={**CHANNEL, field: value}, headers=editor)
        body = problem(response, 422)
        assert names_field(body, "body", field), body["errors"]
        assert body["detail"].startswith(f"body.{field}"), body["detail"]

    await each([*INVALID, *INVALID_CHAT_IDS], check)
    assert (await listing(client, editor))["total"] == 0


async def test_invalid_values_on_update_are_422_and_change_nothing(client, editor):
    created = await create(client, editor, invite_link="https://t.me/+AbC")

    async def check(field: str, value: Any) -> None:
        body = problem(await client.patch(URL, json={field: value}, headers=editor), 422)
        assert names_field(body, "body", field), body["errors"]

    await each(INVALID, check)
    assert await read(client, editor, CHANNEL["chat_id"]) == created


async def test_valid_edge_values_on_create_are_accepted(client, editor):
    chat_ids = iter(range(-1009000000001, -1010000000000, -1))

    async def check(field: str, value: Any, expected: Any) -> None:
        chat_id = value if field == "chat_id" else next(chat_ids)
        created = await create(client, editor, **{"chat_id": chat_id, field: value})
        assert created[field] == expected
        assert (await read(client, editor, chat_id))[field] == expected

    edges = [valid("chat_id", -1_000_000_000_001), valid("chat_id", -4_000_000_000_000)]
    await each([*VALID, *edges], check)


async def test_valid_edge_values_on_update_are_accepted(client, editor):
    await create(client, editor, username="placeholder", invite_link="https://t.me/+x")

    async def check(field: str, value: Any, expected: Any) -> None:
        response = await client.patch(URL, json={field: value}, headers=editor)
        assert response.status_code == 200, response.text
        assert response.json()[field] == expected
        assert (await read(client, editor, CHANNEL["chat_id"]))[field] == expected

    await each(VALID, check)


async def test_nulls(client, editor):
    """title is required; username and invite_link may be cleared with null."""
    body = problem(
        await client.post(CHANNELS, json={**CHANNEL, "title": None}, headers=editor), 422
    )
    assert names_field(body, "body", "title")
    created = await create(client, editor, invite_link="https://t.me/+AbC")
    body = problem(await client.patch(URL, json={"title": None}, headers=editor), 422)
    assert names_field(body, "body", "title"), body["errors"]
    assert await read(client, editor, CHANNEL["chat_id"]) == created
    response = await client.patch(URL, json={"username": None, "invite_link": None}, headers=editor)
    assert response.status_code == 200, response.text
    assert response.json()["username"] is None and response.json()["invite_link"] is None
    assert response.json()["version"] == 2


UNKNOWN_FIELDS = [
    ("POST", {"titel": "typo"}),
    ("POST", {"id": 1}),
    ("POST", {"version": 3}),
    ("POST", {"subscriber_count": 10}),
    ("POST", {"group_count": 1}),
    ("POST", {"groups": []}),
    ("POST", {"updated_at": "2026-01-01T00:00:00Z"}),
    ("PATCH", {"chat_id": -1009999999999}),
    ("PATCH", {"Title": "case"}),
    ("PATCH", {"subscriber_count": 10}),
    ("PATCH", {"version": 2}),
]


async def test_unknown_fields_are_422(client, editor):
    created = await create(client, editor)

    async def check(method: str, extra: dict) -> None:
        if method == "POST":
            payload, url = {**CHANNEL, "chat_id": -1009999999999, **extra}, CHANNELS
        else:
            payload, url = extra, URL
        body = problem(await client.request(method, url, json=payload, headers=editor), 422)
        (name,) = extra
        assert any(
            e["loc"] == ["body", name] and e["type"] == "extra_forbidden" for e in body["errors"]
        )

    await each([(f"{m} {e}", m, e) for m, e in UNKNOWN_FIELDS], check)
    assert (await listing(client, editor))["total"] == 1
    assert await read(client, editor, CHANNEL["chat_id"]) == created


async def test_malformed_json_is_400(client, editor):
    created = await create(client, editor)

    async def check(method: str, content: bytes) -> None:
        url = CHANNELS if method == "POST" else URL
        headers = {**editor, "Content-Type": "application/json"}
        body = problem(await client.request(method, url, content=content, headers=headers), 400)
        assert body["detail"] == "the body is not valid JSON"

    bodies = [b'{"title": ', b"{title: 1}", b'{"title": "x"}}', b"[1,]"]
    await each([(f"{m} {c!r}", m, c) for m in ("POST", "PATCH") for c in bodies], check)
    assert await read(client, editor, CHANNEL["chat_id"]) == created


# ---------------------------------------------------------------- create, read, update, delete


async def test_create_answers_201_with_etag_and_the_full_channel(client, editor, viewer):
    response = await client.post(
        CHANNELS, json={**CHANNEL, "invite_link": "https://t.me/+AbC"}, headers=editor
    )
    assert response.status_code == 201, response.text
    assert response.headers["etag"] == '"1"'
    channel = response.json()
    assert set(channel) == {*SUMMARY, "groups"}
    assert channel["chat_id"] == CHANNEL["chat_id"] and channel["title"] == "Rust News"
    assert channel["username"] == "rustnews" and channel["invite_link"] == "https://t.me/+AbC"
    assert channel["group_count"] == 0 and channel["groups"] == []
    assert channel["subscriber_count"] is None and channel["version"] == 1
    assert channel["created_at"].endswith("Z")
    response = await client.get(URL, headers=viewer)
    assert response.status_code == 200 and response.headers["etag"] == '"1"'
    assert response.json() == channel


async def test_duplicate_channel_is_409(client, editor):
    created = await create(client, editor)
    response = await client.post(CHANNELS, json={**CHANNEL, "title": "Other"}, headers=editor)
    assert problem(response, 409)["detail"] == f"channel {CHANNEL['chat_id']} already exists"
    assert await read(client, editor, CHANNEL["chat_id"]) == created


async def test_unknown_channel_is_404(client, editor):
    for method in ("GET", "PATCH", "DELETE"):
        kwargs = {"json": {"title": "x"}} if method == "PATCH" else {}
        response = await client.request(method, URL, headers=editor, **kwargs)
        assert problem(response, 404)["detail"] == f"channel {CHANNEL['chat_id']} not found"


async def test_patch_bumps_version_etag_and_updated_at(client, editor):
    created = await create(client, editor)
    await create_group(client, editor)
    await link(client, editor, GROUP["chat_id"], CHANNEL["chat_id"])
    response = await client.patch(
        URL, json={"title": "Rust Weekly", "username": "@Rust_Weekly"}, headers=editor
    )
    assert response.status_code == 200, response.text
    assert response.headers["etag"] == '"2"'
    updated = response.json()
    assert updated["version"] == 2 and updated["title"] == "Rust Weekly"
    assert updated["username"] == "rust_weekly" and updated["created_at"] == created["created_at"]
    assert datetime.fromisoformat(updated["updated_at"]) > datetime.fromisoformat(
        created["updated_at"]
    )
    response = await client.get(URL, headers=editor)
    assert response.headers["etag"] == '"2"' and response.json() == updated
    group = await read_group(client, editor, GROUP["chat_id"])
    assert group["channels"][0]["title"] == "Rust Weekly"
    assert group["channels"][0]["username"] == "rust_weekly"


async def test_patch_that_changes_nothing_keeps_the_version(client, editor, owner):
    created = await create(client, editor)
    rows = len(await audit_log(client, owner))
    for payload in ({}, {"title": "Rust News", "username": "RUSTNEWS"}):
        response = await client.patch(URL, json=payload, headers=editor)
        assert response.status_code == 200, response.text
        assert response.headers["etag"] == '"1"' and response.json() == created
    assert len(await audit_log(client, owner)) == rows


async def test_if_match(client, editor):
    created = await create(client, editor)
    for header in ('"2"', '"0"', 'W/"9"', "nonsense"):
        response = await client.patch(
            URL, json={"title": "New"}, headers={**editor, "If-Match": header}
        )
        assert problem(response, 412)["detail"] == "version 1 is current; reload and retry"
    assert await read(client, editor, CHANNEL["chat_id"]) == created
    for version, header in enumerate(('"1"', "*", 'W/"3"', '"9", "4"'), start=2):
        response = await client.patch(
            URL, json={"title": f"New {version}"}, headers={**editor, "If-Match": header}
        )
        assert response.status_code == 200, (header, response.text)
        assert response.json()["version"] == version


async def test_delete_channel_is_204_then_404(client, editor):
    await create(client, editor)
    response = await client.delete(URL, headers=editor)
    assert response.status_code == 204 and response.content == b""
    assert problem(await client.get(URL, headers=editor), 404)["detail"] == (
        f"channel {CHANNEL['chat_id']} not found"
    )
    problem(await client.delete(URL, headers=editor), 404)
    assert (await listing(client, editor))["total"] == 0
    assert (await create(client, editor))["version"] == 1


async def test_delete_while_linked_is_409_unless_forced(client, editor):
    await create(client, editor)
    other = await create(client, editor, chat_id=-1009000000001, title="Other", username=None)
    await create_group(client, editor)
    await link(client, editor, GROUP["chat_id"], other["chat_id"])
    await link(client, editor, GROUP["chat_id"], CHANNEL["chat_id"])
    before = await read_group(client, editor, GROUP["chat_id"])
    for params in ({}, {"force": "false"}):
        response = await client.delete(URL, params=params, headers=editor)
        assert problem(response, 409)["detail"] == (
            f"channel {CHANNEL['chat_id']} is required by 1 group(s); "
            "unlink it first or pass force=true"
        )
    assert await read_group(client, editor, GROUP["chat_id"]) == before
    assert (await read(client, editor, CHANNEL["chat_id"]))["group_count"] == 1
    problem(await client.delete(URL, params={"force": "maybe"}, headers=editor), 422)

    response = await client.delete(URL, params={"force": "true"}, headers=editor)
    assert response.status_code == 204, response.text
    problem(await client.get(URL, headers=editor), 404)
    group = await read_group(client, editor, GROUP["chat_id"])
    assert [c["chat_id"] for c in group["channels"]] == [other["chat_id"]]
    assert group["channel_count"] == 1 and group["version"] == before["version"] + 1
    groups = (await client.get(GROUPS, headers=editor)).json()["items"]
    assert [g["channel_count"] for g in groups] == [1]


async def test_read_lists_the_groups_that_require_it(client, editor):
    await create(client, editor)
    for chat_id, title in ((-1001000000002, "Beta"), (-1001000000001, "Alpha"), (-7, "Gamma")):
        await create_group(client, editor, chat_id=chat_id, title=title)
    await link(client, editor, -1001000000002, CHANNEL["chat_id"])
    await link(client, editor, -7, CHANNEL["chat_id"])
    channel = await read(client, editor, CHANNEL["chat_id"])
    assert channel["group_count"] == 2
    assert sorted(channel["groups"], key=lambda g: g["chat_id"]) == [
        {"chat_id": -1001000000002, "title": "Beta"},
        {"chat_id": -7, "title": "Gamma"},
    ]
    assert (await listing(client, editor))["items"][0]["group_count"] == 2
    unlinked = await client.delete(f"{GROUPS}/-7/channels/{CHANNEL['chat_id']}", headers=editor)
    assert unlinked.status_code == 204
    channel = await read(client, editor, CHANNEL["chat_id"])
    assert channel["groups"] == [{"chat_id": -1001000000002, "title": "Beta"}]
    assert channel["group_count"] == 1 and channel["version"] == 1


# ---------------------------------------------------------------- list


@pytest.fixture
async def three_channels(client: httpx.AsyncClient, editor: dict[str, str]) -> list[dict]:
    return [
        await create(
            client, editor, chat_id=-1009000000001, title="Rust News", username="rust_news"
        ),
        await create(client, editor, chat_id=-1009000000002, title="rusty bits", username=None),
        await create(client, editor, chat_id=-1009000000003, title="Go Weekly", username="gophers"),
    ]


Q_CASES = [
    ("rust", [1, 2]),
    ("RUST", [1, 2]),
    ("Y BI", [2]),
    ("gophe", [3]),
    ("@GOPHERS", [3]),
    ("_", [1]),
    ("%", []),
    ("-1009000000002", [2]),
    ("-100900000000", []),
    ("zzz", []),
]


async def test_list_filters_by_q_newest_first(client, viewer, three_channels):
    async def check(q: str, expected: list[int]) -> None:
        page = await listing(client, viewer, q=q)
        ids = [three_channels[i - 1]["chat_id"] for i in sorted(expected, reverse=True)]
        assert [c["chat_id"] for c in page["items"]] == ids
        assert page["total"] == len(ids)

    await each([(q, q, e) for q, e in Q_CASES], check)
    page = await listing(client, viewer)
    assert all(set(item) == set(SUMMARY) for item in page["items"])
    assert [c["chat_id"] for c in page["items"]] == [-1009000000003, -1009000000002, -1009000000001]


async def test_list_rejects_bad_parameters(client, viewer):
    async def check(params: dict, name: str) -> None:
        body = problem(await client.get(CHANNELS, params=params, headers=viewer), 422)
        assert names_field(body, "query", name), body["errors"]

    bad = [
        ({"limit": 0}, "limit"),
        ({"limit": 201}, "limit"),
        ({"limit": "x"}, "limit"),
        ({"q": "x" * 256}, "q"),
    ]
    await each([(str(p)[:30], p, n) for p, n in bad], check)
    for limit in (1, 200):
        assert (await listing(client, viewer, limit=limit))["items"] == []


async def test_pagination_sees_every_channel_once_while_channels_are_added(client, editor):
    originals = {-1009000000000 - i for i in range(7)}
    for chat_id in sorted(originals, reverse=True):
        await create(client, editor, chat_id=chat_id, title=f"Channel {chat_id}", username=None)
    seen: list[dict] = []
    cursor = None
    for page_number in range(20):
        page = await listing(client, editor, limit=2, **({"cursor": cursor} if cursor else {}))
        assert page["total"] == 7 + 2 * min(page_number, 3)
        seen += page["items"]
        cursor = page["next_cursor"]
        if cursor is None:
            break
        if page_number < 3:
            for n in range(2):
                chat_id = -1008000000000 - 2 * page_number - n
                await create(client, editor, chat_id=chat_id, title="new", username=None)
    assert cursor is None
    chat_ids = [c["chat_id"] for c in seen]
    assert len(chat_ids) == len(set(chat_ids)) and set(chat_ids) == originals
    times = [datetime.fromisoformat(c["created_at"]) for c in seen]
    assert times == sorted(times, reverse=True)


NOW = "2026-01-01T00:00:00Z"


async def test_malformed_or_tampered_cursor_is_422_never_500(client, viewer, three_channels):
    bad = [
        ("random", "garbage!"),
        ("b64-junk", b64(b"\x00\x01\x02")),
        ("b64-object", b64({"sort": "-created_at"})),
        ("other-sort", b64(["title", "Rust News", 1])),
        ("ascending", b64(["created_at", NOW, 1])),
        ("bad-date", b64(["-created_at", "2026-13-01T00:00:00Z", 1])),
        ("naive", b64(["-created_at", "2026-01-01T00:00:00", 1])),
        ("id-string", b64(["-created_at", NOW, "7"])),
        ("too-long", "A" * 513),
    ]

    async def check(cursor: str) -> None:
        response = await client.get(CHANNELS, params={"cursor": cursor}, headers=viewer)
        assert names_field(problem(response, 422), "query", "cursor")

    async def never_500(cursor: str) -> None:
        response = await client.get(CHANNELS, params={"cursor": cursor}, headers=viewer)
        assert response.status_code in (200, 422), response.text

    await each(bad, check)
    odd = [
        ("year-1", b64(["-created_at", "0001-01-01T00:00:00+14:00", 1])),
        ("id-beyond-int32", b64(["-created_at", NOW, 2**40])),
    ]
    await each(odd, never_500)


# ---------------------------------------------------------------- audit


async def test_every_channel_write_leaves_exactly_one_audit_row(client, editor, owner):
    chat_id = CHANNEL["chat_id"]

    async def write(
        method: str, url: str, status: int, **kwargs: Any
    ) -> tuple[httpx.Response, dict]:
        before = await audit_log(client, owner)
        headers = {**editor, **kwargs.pop("headers", {})}
        response = await client.request(method, url, headers=headers, **kwargs)
        assert response.status_code == status, response.text
        rows = await audit_log(client, owner)
        assert len(rows) == len(before) + 1
        row = rows[0]
        assert row["actor"] == {"kind": "staff", "id": EDITOR_ID, "name": "22222222@example.com"}
        assert row["request_id"] == response.headers["x-request-id"]
        assert row["resource"] == "channel" and row["resource_id"] == str(chat_id)
        return response, row

    response, row = await write(
        "POST", CHANNELS, 201, json=CHANNEL, headers={"X-Request-ID": "chan-create.1"}
    )
    assert response.headers["x-request-id"] == "chan-create.1"
    assert row["action"] == "channel.create" and row["before"] is None
    assert row["after"]["title"] == "Rust News" and row["after"]["username"] == "rustnews"
    assert row["after"]["chat_id"] == chat_id and row["after"]["version"] == 1

    _, row = await write("PATCH", URL, 200, json={"title": "Rust Weekly"})
    assert row["action"] == "channel.update"
    assert row["before"]["title"] == "Rust News" and row["after"]["title"] == "Rust Weekly"
    assert row["before"]["version"] == 1 and row["after"]["version"] == 2

    _, row = await write("DELETE", URL, 204)
    assert row["action"] == "channel.delete" and row["after"] is None
    assert row["before"]["title"] == "Rust Weekly" and row["before"]["version"] == 2

    await create(client, editor)
    await create_group(client, editor)
    await link(client, editor, GROUP["chat_id"], chat_id)
    _, row = await write("DELETE", URL, 204, params={"force": "true"})
    assert row["action"] == "channel.delete" and row["before"]["title"] == "Rust News"


async def test_rejected_channel_writes_leave_no_audit_row(client, editor, owner):
    await create(client, editor)
    await create_group(client, editor)
    await link(client, editor, GROUP["chat_id"], CHANNEL["chat_id"])
    rows = await audit_log(client, owner)
    attempts = [
        ("POST", CHANNELS, {"json": {**CHANNEL, "chat_id": -5}}, 422),
        ("POST", CHANNELS, {"json": CHANNEL}, 409),
        ("PATCH", URL, {"json": {"invite_link": "javascript:x"}}, 422),
        ("PATCH", URL, {"json": {"title": "x"}, "headers": {"If-Match": '"5"'}}, 412),
        ("PATCH", URL, {"json": {"title": None}}, 422),
        ("PATCH", f"{CHANNELS}/-1009999999999", {"json": {"title": "x"}}, 404),
        ("DELETE", URL, {}, 409),
        ("DELETE", f"{CHANNELS}/-1009999999999", {"params": {"force": "true"}}, 404),
    ]
    for method, url, kwargs, status in attempts:
        headers = {**editor, **kwargs.pop("headers", {})}
        response = await client.request(method, url, headers=headers, **kwargs)
        assert response.status_code == status, (method, url, response.text)
    assert await audit_log(client, owner) == rows


# ---------------------------------------------------------------- hostile input

HOSTILE_TITLES = [
    "'; DROP TABLE channels; --",
    "1' OR '1'='1",
    "%_\\%",
    "<img src=x onerror=alert(1)>",
    "📣 News 🦀",
    "\u202eswen",
    "أخبار",
    "a\u200db",
]


async def test_hostile_titles_are_stored_verbatim(client, editor):
    chat_ids = iter(range(-1009000000001, -1010000000000, -1))

    async def check(title: str) -> None:
        chat_id = next(chat_ids)
        assert (await create(client, editor, chat_id=chat_id, title=title, username=None))[
            "title"
        ] == title
        assert (await read(client, editor, chat_id))["title"] == title
        assert [c["chat_id"] for c in (await listing(client, editor, q=title))["items"]] == [
            chat_id
        ]
        response = await client.patch(
            f"{CHANNELS}/{chat_id}", json={"title": f"{title}!"}, headers=editor
        )
        assert response.status_code == 200 and response.json()["title"] == f"{title}!"

    await each([(repr(t)[:30], t) for t in HOSTILE_TITLES], check)


async def test_nul_byte_in_text_is_stored_verbatim_or_422(client, editor):
    await create(client, editor)
    chat_ids = iter(range(-1009999999999, -1010000000000 - 100, -1))
    values = {"title": "a\u0000b", "invite_link": "https://t.me/+a\u0000b"}

    async def check(method: str, field: str) -> None:
        url, payload = (
            (CHANNELS, {**CHANNEL, "chat_id": next(chat_ids)}) if method == "POST" else (URL, {})
        )
        response = await client.request(
            method, url, json={**payload, field: values[field]}, headers=editor
        )
        assert response.status_code in (200, 201, 422), response.text
        if response.status_code == 422:
            assert names_field(problem(response, 422), "body", field)
        else:
            assert response.json()[field] == values[field]

    await each([(f"{m} {f}", m, f) for m in ("POST", "PATCH") for f in values], check)


async def test_hostile_q_is_never_500(client, viewer, editor):
    created = await create(client, editor, title="📣 Announcements")

    async def check(q: str, expected: list[int]) -> None:
        response = await client.get(CHANNELS, params={"q": q}, headers=viewer)
        assert response.status_code in (200, 422), response.text
        if response.status_code == 200:
            assert [c["chat_id"] for c in response.json()["items"]] == expected
        else:
            assert names_field(problem(response, 422), "query", "q")

    cases = [
        ("' OR ''='", []),
        ("\\", []),
        ("📣", [created["chat_id"]]),
        ("²", []),
        ("--1", []),
        ("-99999999999999999999", []),
        ("\u0000", []),
    ]
    await each([(repr(q), q, e) for q, e in cases], check)


async def test_path_ids_beyond_int64_are_422(client, editor):
    async def check(method: str, value: str) -> None:
        kwargs = {"json": {"title": "x"}} if method == "PATCH" else {}
        response = await client.request(method, f"{CHANNELS}/{value}", headers=editor, **kwargs)
        assert names_field(problem(response, 422), "path", "chat_id")

    values = ["9223372036854775808", "-9223372036854775809", "-1" + "0" * 30, "x"]
    await each([(f"{m} {v}", m, v) for m in ("GET", "PATCH", "DELETE") for v in values], check)
    response = await client.get(f"{CHANNELS}/{2**63 - 1}", headers=editor)
    assert problem(response, 404)["detail"] == f"channel {2**63 - 1} not found"
