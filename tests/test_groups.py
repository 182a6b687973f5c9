"""Groups: CRUD, settings validation, versions, links, pagination, audit."""

import json
from datetime import datetime
from typing import Any

import httpx
import pytest

from tests.conftest import Harness, audit_log, b64, case, each, names_field, problem, valid

GROUP = {"chat_id": -1001234567890, "title": "Rust Devs"}
pytestmark = pytest.mark.anyio

CHANNEL = {"chat_id": -1009876543210, "title": "Rust News", "username": "@RustNews"}
EDITOR_ID = "11111111-1111-4111-8111-111111111111"
GROUPS = "/api/v1/groups"
URL = f"{GROUPS}/{GROUP['chat_id']}"
INT64_MAX = 2**63 - 1
SETTINGS = (
    "mode",
    "action",
    "mute_seconds",
    "warning_text",
    "warning_ttl_seconds",
    "check_on_join",
    "on_error",
    "exempt_user_ids",
    "recheck_seconds",
)
SUMMARY = (
    "chat_id",
    "title",
    "username",
    "is_active",
    "channel_count",
    "member_count",
    "created_at",
    "updated_at",
    "version",
)


@pytest.fixture
async def editor(harness: Harness) -> dict[str, str]:
    """An editor with a known user id, so audit rows can be checked against it."""
    return await harness.add_staff("editor", EDITOR_ID)


async def create(client: httpx.AsyncClient, auth: dict[str, str], **fields: Any) -> dict:
    response = await client.post("/api/v1/groups", json={**GROUP, **fields}, headers=auth)
    assert response.status_code == 201, response.text
    return response.json()


async def create_channel(
    client: httpx.AsyncClient, auth: dict[str, str], chat_id: int, **fields: Any
) -> dict:
    body = {"chat_id": chat_id, "title": f"Channel {chat_id}", **fields}
    response = await client.post("/api/v1/channels", json=body, headers=auth)
    assert response.status_code == 201, response.text
    return response.json()


async def read(client: httpx.AsyncClient, auth: dict[str, str], chat_id: int) -> dict:
    response = await client.get(f"{GROUPS}/{chat_id}", headers=auth)
    assert response.status_code == 200, response.text
    return response.json()


async def listing(client: httpx.AsyncClient, auth: dict[str, str], **params: Any) -> dict:
    response = await client.get(GROUPS, params=params, headers=auth)
    assert response.status_code == 200, response.text
    return response.json()


# ---------------------------------------------------------------- the original examples


async def test_create_read_group_with_defaults(client: httpx.AsyncClient, editor, viewer):
    created = await create(client, editor, username="@Rust_Devs")
    assert created["username"] == "rust_devs"
    assert created["mode"] == "all" and created["action"] == "mute"
    assert created["recheck_seconds"] == 600 and created["version"] == 1
    assert created["channels"] == [] and created["stats"]["pass_rate_24h"] is None
    response = await client.get(f"/api/v1/groups/{GROUP['chat_id']}", headers=viewer)
    assert response.status_code == 200
    assert response.headers["etag"] == '"1"'
    assert response.json() == created


async def test_duplicate_group_is_409(client: httpx.AsyncClient, editor):
    await create(client, editor)
    body = problem(await client.post("/api/v1/groups", json=GROUP, headers=editor), 409)
    assert body["detail"] == f"group {GROUP['chat_id']} already exists"


# ---------------------------------------------------------------- validation

INVALID = [
    case("title", "", "empty"),
    case("title", "   ", "blank"),
    case("title", "x" * 256, "256-chars"),
    case("title", 5),
    case("username", "abc"),
    case("username", "a" * 33, "33-chars"),
    case("username", "@" + "a" * 33, "@+33-chars"),
    case("username", "1abcd"),
    case("username", "_abcd"),
    case("username", "ab-cd"),
    case("username", "ab cd"),
    case("username", "@@abcd"),
    case("username", ""),
    case("username", "abcd\n", "trailing-newline"),
    case("username", "пример", "cyrillic"),
    case("is_active", "maybe"),
    case("mode", "ALL"),
    case("mode", "some"),
    case("mode", 1),
    case("action", "ban"),
    case("action", ""),
    case("mute_seconds", -1),
    case("mute_seconds", 1),
    case("mute_seconds", 29),
    case("mute_seconds", 31_622_401),
    case("mute_seconds", 30.5),
    case("mute_seconds", "forever"),
    case("warning_text", "x" * 1025, "1025-chars"),
    case("warning_text", "{x}"),
    case("warning_text", "Hi {user}, join {users}"),
    case("warning_text", "{USER}"),
    case("warning_text", "{ user }"),
    case("warning_text", "see {}"),
    case("warning_ttl_seconds", -1),
    case("warning_ttl_seconds", 86_401),
    case("check_on_join", "maybe"),
    case("on_error", "ignore"),
    case("on_error", "ALLOW"),
    case("exempt_user_ids", 5),
    case("exempt_user_ids", [0]),
    case("exempt_user_ids", [-5]),
    case("exempt_user_ids", [2**40], "2^40"),
    case("exempt_user_ids", [1_087_968_824], "anonymous-admin"),
    case("exempt_user_ids", [136_817_688], "channel-sender"),
    case("exempt_user_ids", [777_000], "service"),
    case("exempt_user_ids", [42, 7, 42], "duplicates"),
    case("exempt_user_ids", list(range(1, 502)), "501-ids"),
    case("exempt_user_ids", ["abc"]),
    case("exempt_user_ids", [2**63], "beyond-int64"),
    case("recheck_seconds", 59),
    case("recheck_seconds", 604_801),
]

INVALID_CHAT_IDS = [
    case("chat_id", 0),
    case("chat_id", 1),
    case("chat_id", 123456789, "user-id"),
    case("chat_id", -(10**12), "between-basic-and-super"),
    case("chat_id", 2**63, "beyond-int64"),
    case("chat_id", -(2**63) - 1, "below-int64"),
    case("chat_id", "abc"),
    case("chat_id", -1.5),
    case("chat_id", None),
]

VALID = [
    valid("title", "x" * 255, name="255-chars"),
    valid("title", "  Padded  ", "Padded"),
    valid("username", "@Rust_Devs", "rust_devs"),
    valid("username", "abcd"),
    valid("username", "a" * 32, name="32-chars"),
    valid("username", "@" + "A" * 32, "a" * 32, name="@+32-upper"),
    valid("username", "z_1_"),
    valid("username", None),
    valid("is_active", False),
    valid("mode", "any"),
    valid("mode", "all"),
    valid("action", "mute"),
    valid("action", "delete"),
    valid("action", "kick"),
    valid("action", "warn"),
    valid("mute_seconds", 0),
    valid("mute_seconds", 30),
    valid("mute_seconds", 31_622_400),
    valid("warning_text", "x" * 1024, name="1024-chars"),
    valid("warning_text", "🦀" * 1024, name="1024-emoji"),
    valid("warning_text", "{user} {group} {channels}"),
    valid("warning_text", "Join {channels} first"),
    valid("warning_text", "no placeholders"),
    valid("warning_ttl_seconds", 0),
    valid("warning_ttl_seconds", 86_400),
    valid("check_on_join", False),
    valid("on_error", "block"),
    valid("on_error", "allow"),
    valid("exempt_user_ids", [1, 2**40 - 1], name="bounds"),
    valid("exempt_user_ids", list(range(1, 501)), name="500-ids"),
    valid("exempt_user_ids", []),
    valid("recheck_seconds", 60),
    valid("recheck_seconds", 604_800),
]

NON_NULLABLE = ["title", "is_active", *SETTINGS]


async def test_invalid_values_on_create_are_422_naming_the_field(client, editor):
    async def check(field: str, value: Any) -> None:
        response = await client.post(GROUPS, json={**GROUP, field: value}, headers=editor)
        body = problem(response, 422)
        assert body["type"] == "https://channelgate.dev/problems/validation"
        assert names_field(body, "body", field), body["errors"]
        assert body["detail"].startswith(f"body.{field}"), body["detail"]

    await each([*INVALID, *INVALID_CHAT_IDS], check)
    assert (await listing(client, editor))["total"] == 0


async def test_invalid_values_on_update_are_422_and_change_nothing(client, editor):
    created = await create(client, editor)

    async def check(field: str, value: Any) -> None:
        body = problem(await client.patch(URL, json={field: value}, headers=editor), 422)
        assert names_field(body, "body", field), body["errors"]

    await each(INVALID, check)
    assert await read(client, editor, GROUP["chat_id"]) == created


async def test_valid_edge_values_on_create_are_accepted(client, editor):
    chat_ids = iter(range(-1001000000001, -1002000000000, -1))

    async def check(field: str, value: Any, expected: Any) -> None:
        chat_id = value if field == "chat_id" else next(chat_ids)
        created = await create(client, editor, **{"chat_id": chat_id, field: value})
        assert created[field] == expected
        assert (await read(client, editor, chat_id))[field] == expected

    edges = [-1, -999_999_999_999, -1_000_000_000_001, -4_000_000_000_000]
    await each([*VALID, *(valid("chat_id", c) for c in edges)], check)


async def test_valid_edge_values_on_update_are_accepted(client, editor):
    await create(client, editor, username="placeholder")

    async def check(field: str, value: Any, expected: Any) -> None:
        response = await client.patch(URL, json={field: value}, headers=editor)
        assert response.status_code == 200, response.text
        assert response.json()[field] == expected
        assert (await read(client, editor, GROUP["chat_id"]))[field] == expected

    await each(VALID, check)


async def test_null_for_a_required_field_on_create_is_422(client, editor):
    async def check(field: str) -> None:
        response = await client.post(GROUPS, json={**GROUP, field: None}, headers=editor)
        assert names_field(problem(response, 422), "body", field)

    await each([(f, f) for f in NON_NULLABLE], check)
    assert (await listing(client, editor))["total"] == 0


async def test_null_for_a_non_nullable_field_on_update_is_422_naming_it(client, editor):
    created = await create(client, editor)

    async def check(field: str) -> None:
        body = problem(await client.patch(URL, json={field: None}, headers=editor), 422)
        assert names_field(body, "body", field), body["errors"]

    await each([(f, f) for f in NON_NULLABLE], check)
    assert await read(client, editor, GROUP["chat_id"]) == created


async def test_null_username_on_update_clears_it(client, editor):
    await create(client, editor, username="rust_devs")
    response = await client.patch(URL, json={"username": None}, headers=editor)
    assert response.status_code == 200, response.text
    assert response.json()["username"] is None and response.json()["version"] == 2


async def test_missing_required_field_on_create_is_422(client, editor):
    async def check(field: str) -> None:
        payload = {k: v for k, v in GROUP.items() if k != field}
        body = problem(await client.post(GROUPS, json=payload, headers=editor), 422)
        assert any(e["loc"] == ["body", field] and e["type"] == "missing" for e in body["errors"])

    await each([("chat_id", "chat_id"), ("title", "title")], check)


UNKNOWN_FIELDS = [
    ("POST", {"titel": "typo"}),
    ("POST", {"Title": "case"}),
    ("POST", {"id": 1}),
    ("POST", {"version": 7}),
    ("POST", {"channel_count": 2}),
    ("POST", {"member_count": 5}),
    ("POST", {"created_at": "2026-01-01T00:00:00Z"}),
    ("POST", {"channels": []}),
    ("POST", {"stats": {}}),
    ("PATCH", {"chat_id": -1001111111111}),
    ("PATCH", {"titel": "typo"}),
    ("PATCH", {"version": 2}),
    ("PATCH", {"updated_at": "2026-01-01T00:00:00Z"}),
    ("PATCH", {"settings": {"mode": "any"}}),
]


async def test_unknown_fields_are_422(client, editor):
    created = await create(client, editor)

    async def check(method: str, extra: dict) -> None:
        if method == "POST":
            payload, url = {**GROUP, "chat_id": -1001111111111, **extra}, GROUPS
        else:
            payload, url = extra, URL
        body = problem(await client.request(method, url, json=payload, headers=editor), 422)
        (name,) = extra
        assert any(
            e["loc"] == ["body", name] and e["type"] == "extra_forbidden" for e in body["errors"]
        )

    await each([(f"{m} {e}", m, e) for m, e in UNKNOWN_FIELDS], check)
    assert (await listing(client, editor))["total"] == 1
    assert await read(client, editor, GROUP["chat_id"]) == created


async def test_malformed_json_is_400(client, editor):
    created = await create(client, editor)

    async def check(method: str, content: bytes) -> None:
        url = GROUPS if method == "POST" else URL
        headers = {**editor, "Content-Type": "application/json"}
        body = problem(await client.request(method, url, content=content, headers=headers), 400)
        if content != b"\xff":
            assert body["detail"] == "the body is not valid JSON"

    bodies = [b'{"chat_id": ', b"{'title': 'x'}", b'{"title": "x",}', b"nul", b"\xff"]
    await each([(f"{m} {c!r}", m, c) for m in ("POST", "PATCH") for c in bodies], check)
    assert await read(client, editor, GROUP["chat_id"]) == created


async def test_json_that_is_not_an_object_is_422(client, editor):
    created = await create(client, editor)

    async def check(method: str, payload: Any) -> None:
        url = GROUPS if method == "POST" else URL
        headers = {**editor, "Content-Type": "application/json"}
        content = json.dumps(payload).encode()
        problem(await client.request(method, url, content=content, headers=headers), 422)

    payloads = [[], "title", 5, [GROUP], None]
    await each([(f"{m} {p!r}", m, p) for m in ("POST", "PATCH") for p in payloads], check)
    assert await read(client, editor, GROUP["chat_id"]) == created


# ---------------------------------------------------------------- create, read, update, delete


async def test_create_answers_201_with_etag_and_the_full_group(client, editor):
    response = await client.post(GROUPS, json={**GROUP, "mode": "any"}, headers=editor)
    assert response.status_code == 201, response.text
    assert response.headers["etag"] == '"1"'
    group = response.json()
    assert set(group) == {*SUMMARY, *SETTINGS, "channels", "stats"}
    assert group["chat_id"] == GROUP["chat_id"] and group["title"] == "Rust Devs"
    assert group["is_active"] is True and group["mode"] == "any"
    assert group["channel_count"] == 0 and group["member_count"] is None
    assert group["stats"] == {
        "verified_members": 0,
        "restricted_members": 0,
        "checks_24h": 0,
        "pass_rate_24h": None,
    }
    assert group["created_at"].endswith("Z") and group["updated_at"].endswith("Z")
    assert "{user}" in group["warning_text"] and group["warning_ttl_seconds"] == 60
    assert group["mute_seconds"] == 0 and group["on_error"] == "allow"
    assert group["exempt_user_ids"] == [] and group["check_on_join"] is True


async def test_unknown_group_is_404(client, viewer):
    body = problem(await client.get(URL, headers=viewer), 404)
    assert body["detail"] == f"group {GROUP['chat_id']} not found"


async def test_patch_bumps_version_etag_and_updated_at(client, editor):
    created = await create(client, editor, username="rust_devs")
    response = await client.patch(
        URL, json={"title": "Rustaceans", "action": "warn", "is_active": False}, headers=editor
    )
    assert response.status_code == 200, response.text
    assert response.headers["etag"] == '"2"'
    updated = response.json()
    assert updated["version"] == 2
    assert updated["title"] == "Rustaceans" and updated["action"] == "warn"
    assert updated["is_active"] is False and updated["username"] == "rust_devs"
    assert updated["created_at"] == created["created_at"]
    assert datetime.fromisoformat(updated["updated_at"]) > datetime.fromisoformat(
        created["updated_at"]
    )
    response = await client.get(URL, headers=editor)
    assert response.headers["etag"] == '"2"' and response.json() == updated
    second = await client.patch(URL, json={"mode": "any"}, headers=editor)
    assert second.headers["etag"] == '"3"' and second.json()["version"] == 3


@pytest.mark.parametrize("header", ['"1"', 'W/"1"', "*", '"7", "1"'])
async def test_patch_with_matching_if_match_succeeds(client, editor, header):
    await create(client, editor)
    response = await client.patch(
        URL, json={"title": "New"}, headers={**editor, "If-Match": header}
    )
    assert response.status_code == 200, response.text
    assert response.json()["title"] == "New" and response.json()["version"] == 2


@pytest.mark.parametrize("header", ['"2"', '"0"', '"abc"', 'W/"2"'])
async def test_patch_with_stale_if_match_is_412_and_changes_nothing(client, editor, header):
    created = await create(client, editor)
    response = await client.patch(
        URL, json={"title": "New"}, headers={**editor, "If-Match": header}
    )
    body = problem(response, 412)
    assert body["detail"] == "version 1 is current; reload and retry"
    assert await read(client, editor, GROUP["chat_id"]) == created


async def test_stale_if_match_after_a_concurrent_edit_is_412(client, editor):
    await create(client, editor)
    first = await client.patch(URL, json={"title": "A"}, headers={**editor, "If-Match": '"1"'})
    assert first.status_code == 200
    second = await client.patch(URL, json={"title": "B"}, headers={**editor, "If-Match": '"1"'})
    assert problem(second, 412)["detail"] == "version 2 is current; reload and retry"
    assert (await read(client, editor, GROUP["chat_id"]))["title"] == "A"


async def test_patch_unknown_group_is_404(client, editor):
    response = await client.patch(URL, json={"title": "x"}, headers=editor)
    assert problem(response, 404)["detail"] == f"group {GROUP['chat_id']} not found"


async def test_patch_that_changes_nothing_keeps_the_version(client, editor, owner):
    """Assumed: a no-op PATCH is not a change, so it neither bumps the version (which would
    make other editors' If-Match stale for nothing) nor writes an audit row."""
    created = await create(client, editor, mode="any")
    rows = len(await audit_log(client, owner))
    for payload in ({}, {"title": "Rust Devs", "mode": "any"}):
        response = await client.patch(URL, json=payload, headers=editor)
        assert response.status_code == 200, response.text
        assert response.headers["etag"] == '"1"'
        assert response.json() == created
    assert len(await audit_log(client, owner)) == rows


async def test_delete_group_is_204_then_404(client, editor):
    await create(client, editor)
    await create_channel(client, editor, CHANNEL["chat_id"])
    linked = await client.put(f"{URL}/channels/{CHANNEL['chat_id']}", headers=editor)
    assert linked.status_code == 201
    response = await client.delete(URL, headers=editor)
    assert response.status_code == 204 and response.content == b""
    assert problem(await client.get(URL, headers=editor), 404)["detail"] == (
        f"group {GROUP['chat_id']} not found"
    )
    problem(await client.delete(URL, headers=editor), 404)
    problem(await client.patch(URL, json={"title": "x"}, headers=editor), 404)
    assert (await listing(client, editor))["total"] == 0
    channel = await client.get(f"/api/v1/channels/{CHANNEL['chat_id']}", headers=editor)
    assert channel.json()["groups"] == [] and channel.json()["group_count"] == 0
    # the chat id is free again
    assert (await create(client, editor))["version"] == 1


# ---------------------------------------------------------------- list


@pytest.fixture
async def four_groups(client: httpx.AsyncClient, editor: dict[str, str]) -> list[dict]:
    return [
        await create(
            client, editor, chat_id=-1001000000001, title="Alpha Coders", username="alpha_hub"
        ),
        await create(
            client, editor, chat_id=-1001000000002, title="Zulu alpha soup", is_active=False
        ),
        await create(client, editor, chat_id=-1001000000003, title="Bravo", username="bravo_chat"),
        await create(client, editor, chat_id=-42, title="Charlie 100%"),
    ]


Q_CASES = [
    ("alpha", [1, 2]),
    ("ALPHA", [1, 2]),
    ("A SO", [2]),
    ("bravo_c", [3]),
    ("@bravo_c", [3]),
    ("@BRAVO", [3]),
    ("_hub", [1]),
    ("_", [1, 3]),
    ("%", [4]),
    ("100%", [4]),
    ("-1001000000003", [3]),
    ("-42", [4]),
    ("-1001000000", []),
    ("-4", []),
    ("zzz", []),
]


async def test_list_filters_by_q(client, viewer, four_groups):
    async def check(q: str, expected: list[int]) -> None:
        page = await listing(client, viewer, q=q)
        ids = {four_groups[i - 1]["chat_id"] for i in expected}
        assert {g["chat_id"] for g in page["items"]} == ids
        assert page["total"] == len(ids)

    await each([(q, q, e) for q, e in Q_CASES], check)


async def test_list_filters_by_active(client, viewer, four_groups):
    for active, expected in (("true", [1, 3, 4]), ("false", [2])):
        page = await listing(client, viewer, active=active)
        assert {g["chat_id"] for g in page["items"]} == {
            four_groups[i - 1]["chat_id"] for i in expected
        }
        assert page["total"] == len(expected)
    page = await listing(client, viewer, active="false", q="alpha")
    assert [g["chat_id"] for g in page["items"]] == [four_groups[1]["chat_id"]]


async def test_list_sorts(client, viewer, four_groups):
    async def check(sort: str | None, expected: list[int]) -> None:
        page = await listing(client, viewer, **({"sort": sort} if sort else {}))
        assert [g["chat_id"] for g in page["items"]] == [
            four_groups[i - 1]["chat_id"] for i in expected
        ]
        assert page["next_cursor"] is None and page["total"] == 4

    orders = [
        ("title", [1, 3, 4, 2]),
        ("-title", [2, 4, 3, 1]),
        ("created_at", [1, 2, 3, 4]),
        ("-created_at", [4, 3, 2, 1]),
        (None, [4, 3, 2, 1]),
    ]
    await each([(str(s), s, e) for s, e in orders], check)


async def test_list_items_are_summaries_with_channel_count(client, editor, four_groups):
    for cid in (-1009000000001, -1009000000002):
        await create_channel(client, editor, cid)
        linked = await client.put(f"{GROUPS}/-1001000000003/channels/{cid}", headers=editor)
        assert linked.status_code == 201
    page = await listing(client, editor, sort="title")
    assert all(set(item) == set(SUMMARY) for item in page["items"])
    assert [g["channel_count"] for g in page["items"]] == [0, 2, 0, 0]
    bravo = page["items"][1]
    assert bravo["version"] == 3 and bravo["username"] == "bravo_chat"


BAD_PARAMETERS = [
    ({"limit": 0}, "limit"),
    ({"limit": 201}, "limit"),
    ({"limit": -1}, "limit"),
    ({"limit": "ten"}, "limit"),
    ({"limit": 1.5}, "limit"),
    ({"sort": "name"}, "sort"),
    ({"sort": "-chat_id"}, "sort"),
    ({"sort": "title; DROP TABLE groups"}, "sort"),
    ({"active": "maybe"}, "active"),
    ({"q": "x" * 256}, "q"),
]


async def test_list_rejects_bad_parameters(client, viewer):
    async def check(params: dict, name: str) -> None:
        body = problem(await client.get(GROUPS, params=params, headers=viewer), 422)
        assert names_field(body, "query", name), body["errors"]

    await each([(str(p)[:40], p, n) for p, n in BAD_PARAMETERS], check)


async def test_list_limit_bounds_and_total(client, viewer, four_groups):
    async def check(limit: int, pages: int) -> None:
        seen: list[int] = []
        cursor = None
        for _ in range(pages):
            page = await listing(
                client, viewer, limit=limit, **({"cursor": cursor} if cursor else {})
            )
            assert page["total"] == 4 and len(page["items"]) <= limit
            seen += [g["chat_id"] for g in page["items"]]
            cursor = page["next_cursor"]
        assert cursor is None
        assert sorted(seen) == sorted(g["chat_id"] for g in four_groups)

    await each([(f"limit={n}", n, p) for n, p in ((1, 4), (3, 2), (4, 1), (200, 1))], check)


NOW = "2026-01-01T00:00:00Z"
BAD_CURSORS = [
    ("random", "-created_at", "not-a-cursor"),
    ("not-base64", "-created_at", "%%%%"),
    ("non-ascii", "-created_at", "é"),
    ("too-long", "-created_at", "x" * 600),
    ("b64-binary", "-created_at", b64(b"\xff\xfe\x00junk")),
    ("b64-bad-json", "-created_at", b64(b"[1, 2")),
    ("b64-object", "-created_at", b64({"a": 1})),
    ("too-short", "-created_at", b64(["-created_at"])),
    ("too-long-list", "-created_at", b64(["-created_at", NOW, 1, 2])),
    ("other-sort", "-created_at", b64(["title", "Bravo", 1])),
    ("other-direction", "-created_at", b64(["created_at", NOW, 1])),
    ("date-cursor-for-title", "title", b64(["-created_at", NOW, 1])),
    ("bad-date", "-created_at", b64(["-created_at", "yesterday", 1])),
    ("naive", "-created_at", b64(["-created_at", "2026-01-01T00:00:00", 1])),
    ("epoch", "-created_at", b64(["-created_at", 1767225600, 1])),
    ("id-string", "-created_at", b64(["-created_at", NOW, "1"])),
    ("id-float", "-created_at", b64(["-created_at", NOW, 1.5])),
    ("id-bool", "-created_at", b64(["-created_at", NOW, True])),
    ("id-null", "-created_at", b64(["-created_at", NOW, None])),
    ("id-beyond-int64", "-created_at", b64(["-created_at", NOW, 2**63])),
    ("title-int", "title", b64(["title", 5, 1])),
    ("title-list", "title", b64(["title", ["x"], 1])),
]
ODD_CURSORS = [
    ("id-beyond-int32", "-created_at", b64(["-created_at", NOW, 2**40])),
    ("id-negative", "-created_at", b64(["-created_at", NOW, -(2**62)])),
    ("year-1", "-created_at", b64(["-created_at", "0001-01-01T00:00:00+14:00", 1])),
    ("year-9999", "created_at", b64(["created_at", "9999-12-31T23:59:59-14:00", 1])),
    ("title-nul", "title", b64(["title", "a\u0000b", 1])),
    ("title-long", "title", b64(["title", "x" * 300, 1])),
]


async def test_malformed_cursor_is_422(client, viewer, four_groups):
    async def check(sort: str, cursor: str) -> None:
        response = await client.get(GROUPS, params={"sort": sort, "cursor": cursor}, headers=viewer)
        assert names_field(problem(response, 422), "query", "cursor")

    await each(BAD_CURSORS, check)


async def test_tampered_but_well_formed_cursor_is_never_500(client, viewer, four_groups):
    async def check(sort: str, cursor: str) -> None:
        response = await client.get(GROUPS, params={"sort": sort, "cursor": cursor}, headers=viewer)
        assert response.status_code in (200, 422), response.text
        if response.status_code == 422:
            assert names_field(problem(response, 422), "query", "cursor")

    await each(ODD_CURSORS, check)


async def test_cursor_from_another_sort_is_422(client, viewer, four_groups):
    first = await listing(client, viewer, sort="title", limit=1)
    assert first["next_cursor"]
    for sort in ("-title", "created_at", "-created_at"):
        response = await client.get(
            GROUPS, params={"sort": sort, "cursor": first["next_cursor"]}, headers=viewer
        )
        assert names_field(problem(response, 422), "query", "cursor")


@pytest.mark.parametrize("sort", ["title", "-title", "created_at", "-created_at"])
async def test_pagination_sees_every_group_once_while_groups_are_added(client, editor, sort):
    originals = {-1001000000000 - i for i in range(7)}
    for i in range(7):
        await create(client, editor, chat_id=-1001000000000 - i, title=f"Group {i}")
    seen: list[dict] = []
    cursor = None
    for page_number in range(20):
        params: dict[str, Any] = {"sort": sort, "limit": 2}
        if cursor:
            params["cursor"] = cursor
        page = await listing(client, editor, **params)
        seen += page["items"]
        cursor = page["next_cursor"]
        if cursor is None:
            break
        if page_number < 3:  # groups that sort before and after the cursor
            for n, title in enumerate((f"Aaa {page_number}", f"Zzz {page_number}")):
                await create(
                    client, editor, chat_id=-1002000000000 - 2 * page_number - n, title=title
                )
    assert cursor is None
    chat_ids = [g["chat_id"] for g in seen]
    assert len(chat_ids) == len(set(chat_ids)), chat_ids
    assert originals <= set(chat_ids)
    keys: list[Any] = [
        g["title"] if sort.endswith("title") else datetime.fromisoformat(g["created_at"])
        for g in seen
    ]
    assert keys == sorted(keys, reverse=sort.startswith("-"))


# ---------------------------------------------------------------- links


def link_url(chat_id: int, channel_id: int) -> str:
    return f"{GROUPS}/{chat_id}/channels/{channel_id}"


async def test_link_is_idempotent_and_keeps_link_order(client, editor):
    await create(client, editor)
    c1, c2, c3 = (
        await create_channel(client, editor, -1009000000001, username="chan_one"),
        await create_channel(client, editor, -1009000000002, invite_link="https://t.me/+AbC"),
        await create_channel(client, editor, -1009000000003),
    )
    response = await client.put(link_url(GROUP["chat_id"], c3["chat_id"]), headers=editor)
    assert response.status_code == 201, response.text
    assert response.headers["etag"] == '"2"' and response.json()["version"] == 2
    assert [c["chat_id"] for c in response.json()["channels"]] == [c3["chat_id"]]
    for channel, version in ((c1, 3), (c2, 4)):
        response = await client.put(link_url(GROUP["chat_id"], channel["chat_id"]), headers=editor)
        assert response.status_code == 201 and response.json()["version"] == version
    again = await client.put(link_url(GROUP["chat_id"], c1["chat_id"]), headers=editor)
    assert again.status_code == 200 and again.json()["version"] == 4
    assert again.headers["etag"] == '"4"'
    group = await read(client, editor, GROUP["chat_id"])
    assert group["channels"] == [
        {"chat_id": c3["chat_id"], "title": c3["title"], "username": None, "invite_link": None},
        {
            "chat_id": c1["chat_id"],
            "title": c1["title"],
            "username": "chan_one",
            "invite_link": None,
        },
        {
            "chat_id": c2["chat_id"],
            "title": c2["title"],
            "username": None,
            "invite_link": "https://t.me/+AbC",
        },
    ]
    assert group["channel_count"] == 3
    assert (await listing(client, editor))["items"][0]["channel_count"] == 3

    unlinked = await client.delete(link_url(GROUP["chat_id"], c1["chat_id"]), headers=editor)
    assert unlinked.status_code == 204 and unlinked.content == b""
    group = await read(client, editor, GROUP["chat_id"])
    assert group["version"] == 5 and group["channel_count"] == 2
    assert datetime.fromisoformat(group["updated_at"]) > datetime.fromisoformat(
        again.json()["updated_at"]
    )
    relinked = await client.put(link_url(GROUP["chat_id"], c1["chat_id"]), headers=editor)
    assert relinked.status_code == 201 and relinked.json()["version"] == 6
    assert [c["chat_id"] for c in relinked.json()["channels"]] == [
        c3["chat_id"],
        c2["chat_id"],
        c1["chat_id"],
    ]


async def test_link_unknown_group_or_channel_is_404(client, editor):
    await create_channel(client, editor, CHANNEL["chat_id"])
    response = await client.put(link_url(GROUP["chat_id"], CHANNEL["chat_id"]), headers=editor)
    assert problem(response, 404)["detail"] == f"group {GROUP['chat_id']} not found"
    await create(client, editor)
    response = await client.put(link_url(GROUP["chat_id"], -1009999999999), headers=editor)
    assert problem(response, 404)["detail"] == "channel -1009999999999 not found"
    assert (await read(client, editor, GROUP["chat_id"]))["version"] == 1


async def test_eleventh_channel_is_409_and_changes_nothing(client, editor):
    await create(client, editor)
    for i in range(11):
        await create_channel(client, editor, -1009000000000 - i)
    for i in range(10):
        response = await client.put(link_url(GROUP["chat_id"], -1009000000000 - i), headers=editor)
        assert response.status_code == 201, response.text
    response = await client.put(link_url(GROUP["chat_id"], -1009000000010), headers=editor)
    assert problem(response, 409)["detail"] == "a group can require at most 10 channels"
    again = await client.put(link_url(GROUP["chat_id"], -1009000000003), headers=editor)
    assert again.status_code == 200
    group = await read(client, editor, GROUP["chat_id"])
    assert group["version"] == 11 and group["channel_count"] == 10
    assert [c["chat_id"] for c in group["channels"]] == [-1009000000000 - i for i in range(10)]


async def test_unlink_not_linked_is_404(client, editor):
    await create(client, editor)
    await create_channel(client, editor, CHANNEL["chat_id"])
    url = link_url(GROUP["chat_id"], CHANNEL["chat_id"])
    body = problem(await client.delete(url, headers=editor), 404)
    assert (
        body["detail"]
        == f"channel {CHANNEL['chat_id']} linked to group {GROUP['chat_id']} not found"
    )
    assert (await client.put(url, headers=editor)).status_code == 201
    assert (await client.delete(url, headers=editor)).status_code == 204
    problem(await client.delete(url, headers=editor), 404)
    problem(await client.delete(link_url(-1001111111111, CHANNEL["chat_id"]), headers=editor), 404)
    problem(await client.delete(link_url(GROUP["chat_id"], -1009999999999), headers=editor), 404)
    assert (await read(client, editor, GROUP["chat_id"]))["version"] == 3


# ---------------------------------------------------------------- audit


async def test_every_group_write_leaves_exactly_one_audit_row(client, editor, owner):
    chat_id, channel_id = GROUP["chat_id"], CHANNEL["chat_id"]

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
        assert row["actor"] == {"kind": "staff", "id": EDITOR_ID, "name": "11111111@example.com"}
        assert row["request_id"] == response.headers["x-request-id"]
        assert row["at"].endswith("Z")
        return response, row

    response, row = await write(
        "POST", GROUPS, 201, json={**GROUP, "mode": "any"}, headers={"X-Request-ID": "req-create-1"}
    )
    assert (
        response.headers["x-request-id"] == "req-create-1" and row["request_id"] == "req-create-1"
    )
    assert (row["action"], row["resource"], row["resource_id"]) == (
        "group.create",
        "group",
        str(chat_id),
    )
    assert row["before"] is None
    assert row["after"]["chat_id"] == chat_id and row["after"]["title"] == "Rust Devs"
    assert row["after"]["mode"] == "any" and row["after"]["version"] == 1

    _, row = await write("PATCH", URL, 200, json={"title": "Rustaceans", "mute_seconds": 60})
    assert (row["action"], row["resource"], row["resource_id"]) == (
        "group.update",
        "group",
        str(chat_id),
    )
    assert row["before"]["title"] == "Rust Devs" and row["after"]["title"] == "Rustaceans"
    assert row["before"]["mute_seconds"] == 0 and row["after"]["mute_seconds"] == 60
    assert row["before"]["version"] == 1 and row["after"]["version"] == 2

    _, row = await write("POST", "/api/v1/channels", 201, json=CHANNEL)
    assert row["action"] == "channel.create"

    _, row = await write("PUT", link_url(chat_id, channel_id), 201)
    assert (row["action"], row["resource"], row["resource_id"]) == (
        "group.link_channel",
        "group",
        str(chat_id),
    )
    assert row["after"]["channel_id"] == channel_id

    _, row = await write("DELETE", link_url(chat_id, channel_id), 204)
    assert (row["action"], row["resource"], row["resource_id"]) == (
        "group.unlink_channel",
        "group",
        str(chat_id),
    )
    assert row["before"]["channel_id"] == channel_id

    _, row = await write("DELETE", URL, 204)
    assert (row["action"], row["resource"], row["resource_id"]) == (
        "group.delete",
        "group",
        str(chat_id),
    )
    assert row["before"]["title"] == "Rustaceans" and row["before"]["version"] == 4
    assert row["after"] is None

    filtered = await client.get(
        "/api/v1/audit", params={"action": "group.update", "actor": EDITOR_ID}, headers=owner
    )
    assert [r["action"] for r in filtered.json()["items"]] == ["group.update"]


async def test_rejected_group_writes_leave_no_audit_row(client, editor, owner):
    await create(client, editor)
    for i in range(11):
        await create_channel(client, editor, -1009000000000 - i)
    for i in range(10):
        linked = await client.put(link_url(GROUP["chat_id"], -1009000000000 - i), headers=editor)
        assert linked.status_code == 201
    rows = await audit_log(client, owner)
    attempts = [
        ("POST", GROUPS, {"json": {**GROUP, "chat_id": -5, "mode": "x"}}, 422),
        ("POST", GROUPS, {"json": GROUP}, 409),
        ("PATCH", URL, {"json": {"title": "x"}, "headers": {"If-Match": '"2"'}}, 412),
        ("PATCH", URL, {"json": {"recheck_seconds": 1}}, 422),
        ("PATCH", URL, {"json": {"title": None}}, 422),
        ("PATCH", f"{GROUPS}/-77", {"json": {"title": "x"}}, 404),
        ("PUT", link_url(GROUP["chat_id"], -1009000000010), {}, 409),
        ("PUT", link_url(GROUP["chat_id"], -1008888888888), {}, 404),
        ("PUT", link_url(GROUP["chat_id"], -1009000000001), {}, 200),
        ("DELETE", link_url(-77, -1009000000001), {}, 404),
        ("DELETE", f"{GROUPS}/-77", {}, 404),
    ]
    for method, url, kwargs, status in attempts:
        headers = {**editor, **kwargs.pop("headers", {})}
        response = await client.request(method, url, headers=headers, **kwargs)
        assert response.status_code == status, (method, url, response.text)
    assert await audit_log(client, owner) == rows


# ---------------------------------------------------------------- hostile input

HOSTILE_TITLES = [
    "'; DROP TABLE groups; --",
    "Robert'); DELETE FROM channels WHERE ('1'='1",
    '" OR ""="',
    "%_\\%",
    "<script>alert(1)</script>",
    "🦀 Rust 🚀 👩‍👩‍👧",
    "\u202egnp.exe",
    "שלום עולם",
    "مرحبا بالعالم",
    "zero\u200bwidth",
    "x" * 254 + "🦀",
]


async def test_hostile_titles_are_stored_verbatim(client, editor):
    chat_ids = iter(range(-1001000000001, -1002000000000, -1))

    async def check(title: str) -> None:
        chat_id = next(chat_ids)
        assert (await create(client, editor, chat_id=chat_id, title=title))["title"] == title
        assert (await read(client, editor, chat_id))["title"] == title
        page = await listing(client, editor, q=title)
        assert [g["chat_id"] for g in page["items"]] == [chat_id]
        renamed = f"{title[:250]}!"
        response = await client.patch(
            f"{GROUPS}/{chat_id}", json={"title": renamed}, headers=editor
        )
        assert response.status_code == 200 and response.json()["title"] == renamed

    await each([(repr(t)[:30], t) for t in HOSTILE_TITLES], check)
    assert (await listing(client, editor))["total"] == len(HOSTILE_TITLES)


async def test_nul_byte_in_text_is_stored_verbatim_or_422(client, editor):
    await create(client, editor)
    chat_ids = iter(range(-1001111111111, -1002000000000, -1))

    async def check(method: str, field: str) -> None:
        value = "a\u0000b {user}"
        url, payload = (
            (GROUPS, {"chat_id": next(chat_ids), "title": "t"}) if method == "POST" else (URL, {})
        )
        response = await client.request(method, url, json={**payload, field: value}, headers=editor)
        assert response.status_code in (200, 201, 422), response.text
        if response.status_code == 422:
            assert names_field(problem(response, 422), "body", field)
        else:
            assert response.json()[field] == value
            group = await read(client, editor, response.json()["chat_id"])
            assert group[field] == value

    fields = ("title", "warning_text")
    await each([(f"{m} {f}", m, f) for m in ("POST", "PATCH") for f in fields], check)


HOSTILE_Q = [
    ("' OR 1=1 --", []),
    ("'; DROP TABLE groups; --", []),
    ("%' OR '1'='1", []),
    ("\\", []),
    ("%%", []),
    ("🦀", [1]),
    ("שלום", [2]),
    ("²", []),
    ("١٢", []),
    ("--5", []),
    ("-", []),
    ("9223372036854775807", []),
    ("-9223372036854775808", []),
    ("99999999999999999999999", []),
    ("\u0000", []),
    ("a\u0000b", []),
]


async def test_hostile_q_is_never_500(client, viewer, editor):
    groups = [
        await create(client, editor, chat_id=-1001000000001, title="Crab 🦀 club"),
        await create(client, editor, chat_id=-1001000000002, title="שלום חברים"),
    ]

    async def check(q: str, expected: list[int]) -> None:
        response = await client.get(GROUPS, params={"q": q}, headers=viewer)
        assert response.status_code in (200, 422), response.text
        if response.status_code == 200:
            assert [g["chat_id"] for g in response.json()["items"]] == [
                groups[i - 1]["chat_id"] for i in expected
            ]
        else:
            assert names_field(problem(response, 422), "query", "q")

    await each([(repr(q), q, e) for q, e in HOSTILE_Q], check)
    assert (await listing(client, viewer))["total"] == 2


BEYOND = ["9223372036854775808", "-9223372036854775809", "-99999999999999999999999", "abc", "1.5"]
PATH_ROUTES = [
    ("GET", "{}", "chat_id"),
    ("PATCH", "{}", "chat_id"),
    ("DELETE", "{}", "chat_id"),
    ("GET", "{}/members", "chat_id"),
    ("PUT", "{}/channels/-1009000000001", "chat_id"),
    ("PUT", "-1001000000001/channels/{}", "channel_id"),
    ("DELETE", "-1001000000001/channels/{}", "channel_id"),
]


async def test_path_ids_beyond_int64_are_422(client, editor):
    async def check(method: str, url: str, param: str) -> None:
        kwargs = {"json": {"title": "x"}} if method == "PATCH" else {}
        response = await client.request(method, url, headers=editor, **kwargs)
        assert names_field(problem(response, 422), "path", param)

    cases = [
        (f"{method} {url}", method, f"{GROUPS}/{url}", param)
        for method, template, param in PATH_ROUTES
        for url in (template.format(value) for value in BEYOND)
    ]
    await each(cases, check)


async def test_largest_int64_path_id_is_404(client, editor):
    response = await client.get(f"{GROUPS}/{INT64_MAX}", headers=editor)
    assert problem(response, 404)["detail"] == f"group {INT64_MAX} not found"
    problem(await client.get(f"{GROUPS}/{-INT64_MAX}", headers=editor), 404)
