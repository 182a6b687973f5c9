"""Staff: listing (environment and database owners, keyset pages), PUT create/change, the
last-owner rule, environment owners, validation and audit."""

import asyncio
import base64
import json
import uuid
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from sqlalchemy import delete
from sqlmodel import select

from models import Staff
from tests.conftest import (
    ENV_OWNER,
    Harness,
    b64,
    clean_database,
    names_field,
    problem,
    start_harness,
)
from tests.factories import create_group

pytestmark = pytest.mark.anyio


def new_id() -> str:
    return str(uuid.uuid4())


@pytest.fixture
async def solo(database_url: str, jwks_server: Any, tokens: Any) -> AsyncIterator[Harness]:
    """An app whose OWNER_USER_IDS is empty: every owner lives in the database."""
    await clean_database(database_url)
    async for h in start_harness(database_url, jwks_server.url, tokens, owner_user_ids=[]):
        yield h


async def staff_list(client: httpx.AsyncClient, auth: dict[str, str]) -> list[dict[str, Any]]:
    response = await client.get("/api/v1/staff", headers=auth)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["total"] == len(body["items"]) and body["next_cursor"] is None
    return body["items"]


async def audit_rows(client: httpx.AsyncClient, auth: dict[str, str], action: str) -> list[dict]:
    response = await client.get("/api/v1/audit", params={"action": action}, headers=auth)
    assert response.status_code == 200, response.text
    return response.json()["items"]


async def put(
    client: httpx.AsyncClient, auth: dict[str, str], user_id: str, /, **body: Any
) -> httpx.Response:
    return await client.put(f"/api/v1/staff/{user_id}", json=body, headers=auth)


async def test_list_has_environment_owner_and_database_staff(harness: Harness, owner):
    editor_id, viewer_id = new_id(), new_id()
    await harness.add_staff("editor", editor_id)
    await harness.add_staff("viewer", viewer_id)
    items = await staff_list(harness.client, owner)
    assert items[0] == {
        "user_id": ENV_OWNER,
        "email": None,
        "role": "owner",
        "created_at": None,
        "source": "environment",
    }
    rest = {i["user_id"]: (i["role"], i["source"]) for i in items[1:]}
    assert rest == {editor_id: ("editor", "database"), viewer_id: ("viewer", "database")}
    assert all(i["created_at"].endswith("Z") for i in items[1:])


async def test_environment_owner_with_a_database_row_is_listed_once(harness: Harness, owner):
    response = await put(harness.client, owner, ENV_OWNER, role="owner", email="boss@example.com")
    assert response.status_code == 201, response.text
    assert response.json()["source"] == "environment"
    items = await staff_list(harness.client, owner)
    assert [(i["user_id"], i["source"], i["email"]) for i in items] == [
        (ENV_OWNER, "environment", "boss@example.com")
    ]


async def test_put_creates_then_changes(harness: Harness, owner):
    client, user_id = harness.client, new_id()
    created = await put(client, owner, user_id, role="viewer", email=" Ann@example.com ")
    assert created.status_code == 201, created.text
    body = created.json()
    assert body["user_id"] == user_id and body["role"] == "viewer"
    assert body["email"] == "Ann@example.com" and body["source"] == "database"
    assert (await client.get("/api/v1/me", headers=harness.auth(user_id))).json()[
        "role"
    ] == "viewer"

    changed = await put(client, owner, user_id, role="editor")
    assert changed.status_code == 200, changed.text
    assert changed.json() == {**body, "role": "editor"}  # email kept when not sent
    me = await client.get("/api/v1/me", headers=harness.auth(user_id))
    assert me.json()["role"] == "editor"

    cleared = await put(client, owner, user_id, role="editor", email=None)
    assert cleared.status_code == 200 and cleared.json()["email"] is None


@pytest.mark.parametrize(
    ("body", "loc", "error_type"),
    [
        ({"role": "viewer", "email": "not-an-email"}, ["body", "email"], "string_pattern_mismatch"),
        ({"role": "viewer", "email": "a b@c.de"}, ["body", "email"], "string_pattern_mismatch"),
        (
            {"role": "viewer", "email": "ann@localhost"},
            ["body", "email"],
            "string_pattern_mismatch",
        ),
        ({"role": "viewer", "email": "a" * 320 + "@x.io"}, ["body", "email"], "string_too_long"),
        ({"role": "admin"}, ["body", "role"], "literal_error"),
        ({"email": "ann@example.com"}, ["body", "role"], "missing"),
        ({"role": "viewer", "name": "Ann"}, ["body", "name"], "extra_forbidden"),
        ({"role": "viewer", "user_id": ENV_OWNER}, ["body", "user_id"], "extra_forbidden"),
    ],
)
async def test_put_invalid_body_is_422(harness: Harness, owner, body, loc, error_type):
    user_id = new_id()
    body_out = problem(
        await harness.client.put(f"/api/v1/staff/{user_id}", json=body, headers=owner), 422
    )
    assert [(e["loc"], e["type"]) for e in body_out["errors"]] == [(loc, error_type)]
    assert len(await staff_list(harness.client, owner)) == 1  # nothing was added


@pytest.mark.parametrize("method", ["PUT", "DELETE"])
@pytest.mark.parametrize("user_id", ["not-a-uuid", "123", "00000000-0000-4000-8000-00000000e0e"])
async def test_invalid_uuid_in_path_is_422(harness: Harness, owner, method, user_id):
    response = await harness.client.request(
        method, f"/api/v1/staff/{user_id}", json={"role": "viewer"}, headers=owner
    )
    body = problem(response, 422)
    assert body["errors"][0]["loc"] == ["path", "user_id"]


@pytest.mark.parametrize(
    ("method", "path", "json"),
    [
        ("GET", "/api/v1/staff", None),
        ("PUT", f"/api/v1/staff/{ENV_OWNER}", {"role": "viewer"}),
        ("DELETE", f"/api/v1/staff/{ENV_OWNER}", None),
    ],
)
async def test_staff_routes_need_an_owner(harness: Harness, editor, method, path, json):
    response = await harness.client.request(method, path, json=json, headers=editor)
    assert problem(response, 403)["detail"] == "this needs the owner role"


async def test_delete_unknown_is_404(harness: Harness, owner):
    user_id = new_id()
    response = await harness.client.delete(f"/api/v1/staff/{user_id}", headers=owner)
    assert problem(response, 404)["detail"] == f"staff member {user_id} not found"


async def test_delete_removes_access(harness: Harness, owner):
    user_id = new_id()
    auth = await harness.add_staff("editor", user_id)
    response = await harness.client.delete(f"/api/v1/staff/{user_id}", headers=owner)
    assert response.status_code == 204 and response.content == b""
    assert [i["user_id"] for i in await staff_list(harness.client, owner)] == [ENV_OWNER]
    denied = problem(await harness.client.get("/api/v1/me", headers=auth), 403)
    assert denied["detail"] == "this account is not channelgate staff"


@pytest.mark.parametrize("role", ["editor", "viewer"])
async def test_environment_owner_cannot_be_demoted(harness: Harness, owner, role):
    body = problem(await put(harness.client, owner, ENV_OWNER, role=role), 409)
    assert body["detail"] == "this user is an owner through OWNER_USER_IDS; change it there"
    assert (await staff_list(harness.client, owner))[0]["role"] == "owner"


async def test_environment_owner_cannot_be_deleted(harness: Harness, owner):
    await put(harness.client, owner, ENV_OWNER, role="owner")  # with a database row too
    response = await harness.client.delete(f"/api/v1/staff/{ENV_OWNER}", headers=owner)
    body = problem(response, 409)
    assert body["detail"] == "this user is an owner through OWNER_USER_IDS; remove them there"
    assert [i["user_id"] for i in await staff_list(harness.client, owner)] == [ENV_OWNER]


async def test_database_owner_can_be_removed_while_an_environment_owner_remains(
    harness: Harness, owner
):
    user_id = new_id()
    await harness.add_staff("owner", user_id)
    assert (await put(harness.client, owner, user_id, role="viewer")).status_code == 200
    response = await harness.client.delete(f"/api/v1/staff/{user_id}", headers=owner)
    assert response.status_code == 204


async def test_last_database_owner_cannot_be_demoted_or_deleted(solo: Harness):
    client, user_id = solo.client, new_id()
    auth = await solo.add_staff("owner", user_id)
    for role in ("editor", "viewer"):
        body = problem(await put(client, auth, user_id, role=role), 409)
        assert body["detail"] == "this would leave no owner"
    body = problem(await client.delete(f"/api/v1/staff/{user_id}", headers=auth), 409)
    assert body["detail"] == "this is the last owner"
    items = await staff_list(client, auth)
    assert [(i["user_id"], i["role"], i["source"]) for i in items] == [
        (user_id, "owner", "database")
    ]
    assert await audit_rows(client, auth, "staff.put") == []
    assert await audit_rows(client, auth, "staff.delete") == []


async def test_with_two_owners_one_can_go(solo: Harness):
    client, first, second = solo.client, new_id(), new_id()
    first_auth = await solo.add_staff("owner", first)
    second_auth = await solo.add_staff("owner", second)
    assert (await put(client, first_auth, second, role="editor")).status_code == 200
    # second is an editor now, so first is the last owner and cannot step down
    assert problem(await put(client, first_auth, first, role="viewer"), 409)
    assert (await put(client, first_auth, second, role="owner")).status_code == 200
    assert (await client.delete(f"/api/v1/staff/{first}", headers=second_auth)).status_code == 204
    assert [i["user_id"] for i in await staff_list(client, second_auth)] == [second]
    body = problem(await client.delete(f"/api/v1/staff/{second}", headers=second_auth), 409)
    assert body["detail"] == "this is the last owner"


# Two database owners, A and B, act at once: (method, whom, role) each, and the statuses
# a serial order gives. Whichever goes second has seen the first's outcome: it is not an
# owner any more (403), or it is the last one (409).
DEMOTE_B, DEMOTE_A = ("put", "B", "editor"), ("put", "A", "editor")
DELETE_B, DELETE_A = ("delete", "B", None), ("delete", "A", None)
RACES = [
    pytest.param(DEMOTE_B, DEMOTE_A, {(200, 403)}, id="demote-each-other"),
    pytest.param(DELETE_B, DELETE_A, {(204, 403)}, id="delete-each-other"),
    pytest.param(DEMOTE_B, DELETE_A, {(200, 403), (204, 403)}, id="demote-vs-delete"),
    pytest.param(DEMOTE_A, DEMOTE_B, {(200, 409)}, id="both-step-down"),
    pytest.param(DELETE_A, DELETE_B, {(204, 409)}, id="both-leave"),
]


def staff_call(harness: Harness, auth: dict[str, str], user_id: str, change: tuple) -> Any:
    method, _, role = change
    url = f"/api/v1/staff/{user_id}"
    if method == "put":
        return harness.client.put(url, json={"role": role}, headers=auth)
    return harness.client.delete(url, headers=auth)


@pytest.mark.parametrize(("by_a", "by_b", "outcomes"), RACES)
async def test_concurrent_staff_changes_keep_an_owner_and_never_deadlock(
    solo: Harness, by_a: tuple, by_b: tuple, outcomes: set[tuple[int, ...]]
):
    """Real concurrency on PostgreSQL (each request on its own connection). The rows are
    locked in one order, so no deadlock (it was replayed, slowly, then a 503 or a 500),
    and never an outcome no serial order gives, such as both demoted or no owner left."""
    for _ in range(5):
        async with solo.sessionmaker() as session:
            await session.execute(delete(Staff))
            await session.commit()
        ids = {"A": new_id(), "B": new_id()}
        auth = {name: await solo.add_staff("owner", user_id) for name, user_id in ids.items()}
        responses = await asyncio.gather(
            staff_call(solo, auth["A"], ids[by_a[1]], by_a),
            staff_call(solo, auth["B"], ids[by_b[1]], by_b),
        )
        statuses = tuple(sorted(r.status_code for r in responses))
        assert statuses in outcomes, [r.text for r in responses]
        async with solo.sessionmaker() as session:
            owners = await session.scalars(select(Staff.user_id).where(Staff.role == "owner"))
            assert len(list(owners)) == 1


async def test_two_owners_adding_one_new_member_at_once_get_201_then_200(solo: Harness):
    """Both adds apply, in some serial order: one creates the member, the other changes it
    (it was a 409 "added concurrently")."""
    for _ in range(5):
        async with solo.sessionmaker() as session:
            await session.execute(delete(Staff))
            await session.commit()
        a, b = await solo.add_staff("owner"), await solo.add_staff("owner")
        newcomer = new_id()
        responses = await asyncio.gather(
            solo.client.put(f"/api/v1/staff/{newcomer}", json={"role": "viewer"}, headers=a),
            solo.client.put(f"/api/v1/staff/{newcomer}", json={"role": "editor"}, headers=b),
        )
        assert sorted(r.status_code for r in responses) == [200, 201], [r.text for r in responses]
        last = next(r for r in responses if r.status_code == 200).json()["role"]
        async with solo.sessionmaker() as session:
            roles = list(
                await session.scalars(
                    select(Staff.role).where(Staff.user_id == uuid.UUID(newcomer))
                )
            )
        assert roles == [last]


async def test_put_and_delete_are_audited(harness: Harness, owner):
    client, user_id = harness.client, new_id()
    await put(client, owner, user_id, role="viewer", email="ann@example.com")
    await put(client, owner, user_id, role="editor")
    await client.delete(f"/api/v1/staff/{user_id}", headers=owner)

    changed, created = await audit_rows(client, owner, "staff.put")
    for row in (changed, created):
        assert row["resource"] == "staff" and row["resource_id"] == user_id
        assert row["actor"]["kind"] == "staff" and row["actor"]["id"] == ENV_OWNER
        assert row["request_id"]
    assert created["before"] is None
    assert created["after"]["role"] == "viewer"
    assert created["after"]["email"] == "ann@example.com"
    assert changed["before"]["role"] == "viewer" and changed["after"]["role"] == "editor"

    (deleted,) = await audit_rows(client, owner, "staff.delete")
    assert deleted["resource_id"] == user_id and deleted["after"] is None
    assert deleted["before"]["role"] == "editor"


# Only in OWNER_USER_IDS (ids in list order: the first two), and one there with a row too.
ENV_ONLY = ["00000000-0000-4000-8000-00000000000a", "00000000-0000-4000-8000-00000000000b"]
ENV_WITH_ROW = "00000000-0000-4000-8000-00000000000c"
ROWS = [  # added in this order, after ENV_WITH_ROW's row; ids ascend too, so ties cannot reorder
    ("10000000-0000-4000-8000-000000000001", "viewer"),
    ("20000000-0000-4000-8000-000000000002", "editor"),
    ("30000000-0000-4000-8000-000000000003", "owner"),
    ("40000000-0000-4000-8000-000000000004", "viewer"),
]


@pytest.fixture
async def crowd(database_url: str, jwks_server: Any, tokens: Any) -> AsyncIterator[Harness]:
    """Three environment owners (one with a database row) and four database staff."""
    await clean_database(database_url)
    env_owners = [ENV_WITH_ROW, ENV_ONLY[1], ENV_ONLY[0]]  # the environment's order is not kept
    async for h in start_harness(database_url, jwks_server.url, tokens, owner_user_ids=env_owners):
        owner = h.auth(ENV_ONLY[0])
        for user_id, role in [(ENV_WITH_ROW, "owner"), *ROWS]:
            assert (await put(h.client, owner, user_id, role=role)).status_code == 201
        yield h


async def test_list_pages_walk_everyone_once_in_order(crowd: Harness, subtests):
    """Keyset pages: the environment owners first, then the database staff by creation."""
    owner = crowd.auth(ENV_ONLY[0])
    everyone = await staff_list(crowd.client, owner)
    expected = [*ENV_ONLY, ENV_WITH_ROW, *(user_id for user_id, _ in ROWS)]
    assert [i["user_id"] for i in everyone] == expected
    assert [(i["source"], i["created_at"] is None) for i in everyone[:3]] == [
        ("environment", True),
        ("environment", True),
        ("environment", False),
    ]
    assert [(i["role"], i["source"]) for i in everyone[3:]] == [
        (role, "database") for _, role in ROWS
    ]
    created = [i["created_at"] for i in everyone[2:]]
    assert created == sorted(created)
    for limit in (1, 2, 3):
        with subtests.test(msg=f"limit={limit}"):
            seen: list[dict] = []
            params: dict[str, Any] = {"limit": limit}
            for _ in range(len(expected)):
                response = await crowd.client.get("/api/v1/staff", params=params, headers=owner)
                assert response.status_code == 200, response.text
                page = response.json()
                assert page["total"] == len(expected)
                seen += page["items"]
                if page["next_cursor"] is None:
                    break
                assert len(page["items"]) == limit
                params["cursor"] = page["next_cursor"]
            assert page["next_cursor"] is None and 0 < len(page["items"]) <= limit
            assert seen == everyone


async def test_list_refuses_a_cursor_it_did_not_make(crowd: Harness, subtests):
    owner, client = crowd.auth(ENV_ONLY[0]), crowd.client
    for chat_id in (-1001000000001, -1001000000002):
        await create_group(client, owner, chat_id)
    foreign = {}
    for name, url in (("groups", "/api/v1/groups"), ("audit", "/api/v1/audit")):
        page = await client.get(url, params={"limit": 1}, headers=owner)
        assert page.status_code == 200 and page.json()["next_cursor"], page.text
        foreign[f"from {name}"] = page.json()["next_cursor"]
    staff_cursor = json.loads(base64.urlsafe_b64decode(await first_cursor(crowd) + "=="))
    cursors = {
        **foreign,
        "garbage": "garbage!",
        "not-base64": "%%%",
        "too-long": "x" * 600,
        "empty-list": b64([]),
        "other-name": b64(["-created_at", *staff_cursor[1:]]),
        "rank-string": b64([staff_cursor[0], "0", *staff_cursor[2:]]),
        "naive-time": b64([*staff_cursor[:2], "1970-01-01T00:00:00", staff_cursor[3]]),
        "not-a-uuid": b64([*staff_cursor[:3], "not-a-uuid"]),
        "too-short": b64(staff_cursor[:3]),
        "nul": b64([*staff_cursor[:3], "\u0000"]),
    }
    for label, cursor in cursors.items():
        with subtests.test(msg=label):
            response = await client.get("/api/v1/staff", params={"cursor": cursor}, headers=owner)
            assert names_field(problem(response, 422), "query", "cursor")
    # and the real one still works
    response = await client.get(
        "/api/v1/staff", params={"cursor": b64(staff_cursor)}, headers=owner
    )
    assert response.status_code == 200, response.text
    assert [i["user_id"] for i in response.json()["items"]][:1] == [ENV_ONLY[1]]


async def first_cursor(harness: Harness) -> str:
    response = await harness.client.get(
        "/api/v1/staff", params={"limit": 1}, headers=harness.auth(ENV_ONLY[0])
    )
    assert response.status_code == 200, response.text
    return response.json()["next_cursor"]
