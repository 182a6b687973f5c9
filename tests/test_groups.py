"""Groups: CRUD, versions, list filters, sorts and pagination, links, audit. The validation
groups share with channels is in test_resources.py."""

import asyncio
from collections import Counter
from datetime import datetime
from typing import Any

import httpx
import pytest

from tests.conftest import Harness, audit_log, names_field, problem
from tests.factories import GROUPS, SETTINGS, create_channel, create_group

GROUP: dict[str, Any] = {"chat_id": -1001234567890, "title": "Rust Devs"}
pytestmark = pytest.mark.anyio

CHANNEL: dict[str, Any] = {"chat_id": -1009876543210, "title": "Rust News", "username": "@RustNews"}
EDITOR_ID = "11111111-1111-4111-8111-111111111111"
URL = f"{GROUPS}/{GROUP['chat_id']}"
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
    """GROUP, or another group where `fields` say so."""
    return await create_group(client, auth, **{**GROUP, **fields})


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


async def test_list_filters_by_q(client, viewer, four_groups, subtests):
    for q, expected in Q_CASES:
        with subtests.test(msg=q):
            page = await listing(client, viewer, q=q)
            ids = {four_groups[i - 1]["chat_id"] for i in expected}
            assert {g["chat_id"] for g in page["items"]} == ids
            assert page["total"] == len(ids)


async def test_list_filters_by_active(client, viewer, four_groups):
    for active, expected in (("true", [1, 3, 4]), ("false", [2])):
        page = await listing(client, viewer, active=active)
        assert {g["chat_id"] for g in page["items"]} == {
            four_groups[i - 1]["chat_id"] for i in expected
        }
        assert page["total"] == len(expected)
    page = await listing(client, viewer, active="false", q="alpha")
    assert [g["chat_id"] for g in page["items"]] == [four_groups[1]["chat_id"]]


SORTS = [
    ("title", [1, 3, 4, 2]),
    ("-title", [2, 4, 3, 1]),
    ("created_at", [1, 2, 3, 4]),
    ("-created_at", [4, 3, 2, 1]),
    (None, [4, 3, 2, 1]),
]


async def test_list_sorts(client, viewer, four_groups, subtests):
    for sort, expected in SORTS:
        with subtests.test(msg=str(sort)):
            page = await listing(client, viewer, **({"sort": sort} if sort else {}))
            assert [g["chat_id"] for g in page["items"]] == [
                four_groups[i - 1]["chat_id"] for i in expected
            ]
            assert page["next_cursor"] is None and page["total"] == 4


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


async def test_list_limit_bounds_and_total(client, viewer, four_groups, subtests):
    for limit, pages in ((1, 4), (3, 2), (4, 1), (200, 1)):
        with subtests.test(msg=f"limit={limit}"):
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


def bot_link_url(chat_id: int, channel_id: int) -> str:
    return f"/api/v1/bot/groups/{chat_id}/channels/{channel_id}"


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


@pytest.mark.parametrize("linked", [False, True], ids=["new-link", "relink"])
async def test_link_racing_a_channel_delete_is_404_or_shows_the_link(client, editor, bot, linked):
    """A link (the dashboard's and the bot's, new or again) racing a forced delete of its
    channel: the delete comes first and the link is 404, or the link comes first and
    answers a group that requires the channel (the delete then unlinks it). A 2xx that
    shows no link was the bug."""
    group = GROUP["chat_id"]
    await create(client, editor)
    for n in range(20):
        channel = -1009000000100 - n
        url, auth = (bot_link_url, bot) if n % 2 else (link_url, editor)
        await create_channel(client, editor, channel)
        if linked:
            await client.put(url(group, channel), headers=auth)
        linking, deleting = await asyncio.gather(
            client.put(url(group, channel), headers=auth),
            client.delete(f"/api/v1/channels/{channel}", params={"force": "true"}, headers=editor),
        )
        assert deleting.status_code == 204, deleting.text
        if linking.status_code == 404:
            assert problem(linking, 404)["detail"] == f"channel {channel} not found"
        else:
            assert linking.status_code == (200 if linked else 201), linking.text
            assert channel in [c["chat_id"] for c in linking.json()["channels"]]
    assert (await read(client, editor, group))["channels"] == []


async def test_concurrent_links_never_exceed_ten(client, editor, bot):
    await create(client, editor)
    channels = [-1009000000000 - i for i in range(16)]
    for channel in channels:
        await create_channel(client, editor, channel)
    calls = [
        (bot_link_url(GROUP["chat_id"], c), bot)
        if i % 2
        else (link_url(GROUP["chat_id"], c), editor)
        for i, c in enumerate(channels)
    ]
    responses = await asyncio.gather(*(client.put(url, headers=auth) for url, auth in calls))
    statuses = Counter(r.status_code for r in responses)
    assert statuses == {201: 10, 409: 6}, [r.text for r in responses]
    group = await read(client, editor, GROUP["chat_id"])
    assert group["channel_count"] == 10 and group["version"] == 11


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
