"""Channels: CRUD, versions, delete while linked, list and pagination, audit. The validation
channels share with groups is in test_resources.py."""

from datetime import datetime
from typing import Any

import httpx
import pytest

from tests.conftest import Harness, audit_log, problem
from tests.factories import CHANNELS, GROUP_ID, GROUPS, create_channel, create_group, link

pytestmark = pytest.mark.anyio

CHANNEL: dict[str, Any] = {"chat_id": -1009876543210, "title": "Rust News", "username": "@RustNews"}
GROUP = GROUP_ID
EDITOR_ID = "22222222-2222-4222-8222-222222222222"
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
    """CHANNEL, or another channel where `fields` say so."""
    return await create_channel(client, auth, **{**CHANNEL, **fields})


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


async def test_patch_bumps_version_etag_and_updated_at(client, editor):
    created = await create(client, editor)
    await create_group(client, editor)
    await link(client, editor, GROUP, CHANNEL["chat_id"])
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
    group = await read_group(client, editor, GROUP)
    assert group["channels"][0]["title"] == "Rust Weekly"
    assert group["channels"][0]["username"] == "rust_weekly"


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
    await link(client, editor, GROUP, other["chat_id"])
    await link(client, editor, GROUP, CHANNEL["chat_id"])
    before = await read_group(client, editor, GROUP)
    for params in ({}, {"force": "false"}):
        response = await client.delete(URL, params=params, headers=editor)
        assert problem(response, 409)["detail"] == (
            f"channel {CHANNEL['chat_id']} is required by 1 group(s); "
            "unlink it first or pass force=true"
        )
    assert await read_group(client, editor, GROUP) == before
    assert (await read(client, editor, CHANNEL["chat_id"]))["group_count"] == 1
    problem(await client.delete(URL, params={"force": "maybe"}, headers=editor), 422)

    response = await client.delete(URL, params={"force": "true"}, headers=editor)
    assert response.status_code == 204, response.text
    problem(await client.get(URL, headers=editor), 404)
    group = await read_group(client, editor, GROUP)
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


async def test_list_filters_by_q_newest_first(client, viewer, three_channels, subtests):
    for q, expected in Q_CASES:
        with subtests.test(msg=q):
            page = await listing(client, viewer, q=q)
            ids = [three_channels[i - 1]["chat_id"] for i in sorted(expected, reverse=True)]
            assert [c["chat_id"] for c in page["items"]] == ids
            assert page["total"] == len(ids)
    page = await listing(client, viewer)
    assert all(set(item) == set(SUMMARY) for item in page["items"])
    assert [c["chat_id"] for c in page["items"]] == [-1009000000003, -1009000000002, -1009000000001]


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
    await link(client, editor, GROUP, chat_id)
    _, row = await write("DELETE", URL, 204, params={"force": "true"})
    assert row["action"] == "channel.delete" and row["before"]["title"] == "Rust News"


async def test_rejected_channel_writes_leave_no_audit_row(client, editor, owner):
    await create(client, editor)
    await create_group(client, editor)
    await link(client, editor, GROUP, CHANNEL["chat_id"])
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
