"""What groups and channels share, tested once for both: body validation (invalid, valid and
null values, missing and unknown fields, malformed JSON, bodies that are not objects, NUL
characters), hostile titles and searches, list parameters and cursors, path ids, 404, 409 and
If-Match. What only one of them does is in test_groups.py or test_channels.py."""

import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest

from tests.conftest import audit_log, b64, case, names_field, problem, valid
from tests.factories import CHANNELS, GROUPS, SETTINGS, create_channel, create_group

pytestmark = pytest.mark.anyio

INT64_MAX = 2**63 - 1
NOW = "2026-01-01T00:00:00Z"
VALIDATION = "https://channelgate.dev/problems/validation"
MALFORMED_CURSOR = "query.cursor: malformed cursor; use next_cursor as returned"


class Keyed:
    """A cursor's contents before encoding: the order and its values. The list's name is
    put in front per resource (`groups:-created_at`), as the service names its cursors."""

    def __init__(self, sort: str, *values: Any) -> None:
        self.sort = sort
        self.values = values

    def encoded(self, list_name: str) -> str:
        return b64([f"{list_name}:{self.sort}", *self.values])


keyed = Keyed


@dataclass(frozen=True)
class Resource:
    """One of the two resources, with what its tests need to know about it."""

    name: str  # as problem details name it: "group 5 not found"
    url: str
    body: dict[str, Any]  # the POST body of the one most tests create
    make: Callable[..., Awaitable[dict[str, Any]]]  # a factory: POST, assert 201, the answer
    free_chat_ids: range  # more ids of this kind, none of them body["chat_id"]
    invalid: list[tuple[str, str, Any]]  # 422 on create and on update
    invalid_chat_ids: list[tuple[str, str, Any]]  # 422 on create
    valid: list[tuple[str, str, Any, Any]]  # accepted on create and on update: value, stored
    valid_chat_ids: list[int]
    non_nullable: tuple[str, ...]  # null is 422
    nullable: dict[str, Any]  # field: a value to set, which null clears
    unknown_fields: list[tuple[str, dict[str, Any]]]
    nul_values: dict[str, str]  # free-text field: a value with a NUL character in it
    path_routes: list[tuple[str, str, str]]  # method, path under the item's url, path param
    bad_parameters: list[tuple[dict[str, Any], str]]  # list query: the parameter it names
    restated: tuple[dict[str, Any], dict[str, Any]]  # created with, then a PATCH changing nothing
    extra_cursors: list[tuple[str, dict[str, Any], int]] = field(default_factory=list)

    @property
    def chat_id(self) -> int:
        return self.body["chat_id"]

    @property
    def item(self) -> str:
        return f"{self.url}/{self.chat_id}"

    async def create(self, client: httpx.AsyncClient, auth: dict, **fields: Any) -> dict:
        return await self.make(client, auth, **{**self.body, **fields})

    async def read(self, client: httpx.AsyncClient, auth: dict, chat_id: int) -> dict:
        response = await client.get(f"{self.url}/{chat_id}", headers=auth)
        assert response.status_code == 200, response.text
        return response.json()

    async def listing(self, client: httpx.AsyncClient, auth: dict, **params: Any) -> dict:
        response = await client.get(self.url, params=params, headers=auth)
        assert response.status_code == 200, response.text
        return response.json()


# ---------------------------------------------------------------- what the two accept

USERNAMES = [
    case("username", "abc"),
    case("username", "a" * 33, "33-chars"),
    case("username", "@" + "a" * 33, "@+33-chars"),
    case("username", "1abcd"),
    case("username", "9news"),
    case("username", "_abcd"),
    case("username", "_news"),
    case("username", "ab-cd"),
    case("username", "ab cd"),
    case("username", "rust.news"),
    case("username", "@@abcd"),
    case("username", "@@rustnews"),
    case("username", ""),
    case("username", "abcd\n", "trailing-newline"),
    case("username", "rustnews\n", "trailing-newline-2"),
    case("username", "пример", "cyrillic"),
    case("username", "новости", "cyrillic-2"),
]
TITLES = [
    case("title", "", "empty"),
    case("title", "   ", "blank"),
    case("title", "x" * 256, "256-chars"),
    case("title", 5),
    case("title", ["Rust"]),
]
VALID_COMMON = [
    valid("title", "x" * 255, name="255-chars"),
    valid("title", "  Padded  ", "Padded"),
    valid("username", "@Rust_Devs", "rust_devs"),
    valid("username", "@Rust_News", "rust_news"),
    valid("username", "abcd"),
    valid("username", "a" * 32, name="32-chars"),
    valid("username", "@" + "A" * 32, "a" * 32, name="@+32-upper"),
    valid("username", "@" + "Z" * 32, "z" * 32, name="@+32-upper-z"),
    valid("username", "z_1_"),
    valid("username", None),
]

GROUP_RESOURCE = Resource(
    name="group",
    url=GROUPS,
    body={"chat_id": -1001234567890, "title": "Rust Devs"},
    make=create_group,
    free_chat_ids=range(-1001000000001, -1002000000000, -1),
    invalid=[
        *TITLES,
        *USERNAMES,
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
    ],
    invalid_chat_ids=[
        case("chat_id", 0),
        case("chat_id", 1),
        case("chat_id", 5),
        case("chat_id", 123456789, "user-id"),
        case("chat_id", -(10**12), "between-basic-and-super"),
        case("chat_id", 2**63, "beyond-int64"),
        case("chat_id", -(2**63) - 1, "below-int64"),
        case("chat_id", "abc"),
        case("chat_id", -1.5),
        case("chat_id", None),
    ],
    valid=[
        *VALID_COMMON,
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
    ],
    valid_chat_ids=[-1, -999_999_999_999, -1_000_000_000_001, -4_000_000_000_000],
    non_nullable=("title", "is_active", *SETTINGS),
    nullable={"username": "placeholder"},
    unknown_fields=[
        ("POST", {"titel": "typo"}),
        ("POST", {"Title": "case"}),
        ("POST", {"id": 1}),
        ("POST", {"version": 7}),
        ("POST", {"channel_count": 2}),
        ("POST", {"member_count": 5}),
        ("POST", {"created_at": "2026-01-01T00:00:00Z"}),
        ("POST", {"updated_at": "2026-01-01T00:00:00Z"}),
        ("POST", {"channels": []}),
        ("POST", {"stats": {}}),
        ("PATCH", {"chat_id": -1001111111111}),
        ("PATCH", {"titel": "typo"}),
        ("PATCH", {"Title": "case"}),
        ("PATCH", {"version": 2}),
        ("PATCH", {"member_count": 5}),
        ("PATCH", {"updated_at": "2026-01-01T00:00:00Z"}),
        ("PATCH", {"settings": {"mode": "any"}}),
    ],
    nul_values={"title": "a\u0000b", "warning_text": "a\u0000b {user}"},
    path_routes=[
        ("GET", "{}", "chat_id"),
        ("PATCH", "{}", "chat_id"),
        ("DELETE", "{}", "chat_id"),
        ("GET", "{}/members", "chat_id"),
        ("PUT", "{}/channels/-1009000000001", "chat_id"),
        ("PUT", "-1001000000001/channels/{}", "channel_id"),
        ("DELETE", "-1001000000001/channels/{}", "channel_id"),
    ],
    bad_parameters=[
        ({"sort": "name"}, "sort"),
        ({"sort": "-chat_id"}, "sort"),
        ({"sort": "title; DROP TABLE groups"}, "sort"),
        ({"active": "maybe"}, "active"),
    ],
    restated=({"mode": "any"}, {"title": "Rust Devs", "mode": "any"}),
    extra_cursors=[
        ("date-cursor-for-title", {"sort": "title", "cursor": keyed("-created_at", NOW, 1)}, 422),
        ("title-int", {"sort": "title", "cursor": keyed("title", 5, 1)}, 422),
        ("title-list", {"sort": "title", "cursor": keyed("title", ["x"], 1)}, 422),
        ("title-nul", {"sort": "title", "cursor": keyed("title", "a\u0000b", 1)}, 422),
        ("title-lone-surrogate", {"sort": "title", "cursor": keyed("title", "a\ud800b", 1)}, 422),
        (
            "year-9999",
            {"sort": "created_at", "cursor": keyed("created_at", "9999-12-31T23:59:59-14:00", 1)},
            422,
        ),
        ("title-long", {"sort": "title", "cursor": keyed("title", "x" * 300, 1)}, 200),
    ],
)

CHANNEL_RESOURCE = Resource(
    name="channel",
    url=CHANNELS,
    body={"chat_id": -1009876543210, "title": "Rust News", "username": "@RustNews"},
    make=create_channel,
    free_chat_ids=range(-1009000000001, -1010000000000, -1),
    invalid=[
        *TITLES,
        *USERNAMES,
        case("invite_link", "javascript:alert(1)"),
        case("invite_link", "http://t.me/rustnews"),
        case("invite_link", "https://evil.example/t.me/x"),
        case("invite_link", "t.me/rustnews"),
        case("invite_link", "https://t.me/"),
        case("invite_link", "https://t.me/a b"),
        case("invite_link", "https://t.me/" + "x" * 243, "256-chars"),
        case("invite_link", ""),
    ],
    invalid_chat_ids=[
        case("chat_id", -(10**12), "-10^12"),
        case("chat_id", -999_999_999_999, "basic-group"),
        case("chat_id", -100),
        case("chat_id", -1),
        case("chat_id", 0),
        case("chat_id", 5),
        case("chat_id", -4_000_000_000_001, "below-range"),
        case("chat_id", 2**63, "beyond-int64"),
        case("chat_id", -(2**63) - 1, "below-int64"),
        case("chat_id", "x"),
        case("chat_id", -1.5),
        case("chat_id", None),
    ],
    valid=[
        *VALID_COMMON,
        valid("invite_link", "https://t.me/+AbCdEf123"),
        valid("invite_link", "https://t.me/joinchat/AAAAAEaB"),
        valid("invite_link", "https://t.me/rust_news"),
        valid("invite_link", "tg://join?invite=AbC"),
        valid("invite_link", "https://t.me/" + "x" * 242, name="255-chars"),
        valid("invite_link", None),
    ],
    valid_chat_ids=[-1_000_000_000_001, -4_000_000_000_000],
    non_nullable=("title",),
    nullable={"username": "placeholder", "invite_link": "https://t.me/+x"},
    unknown_fields=[
        ("POST", {"titel": "typo"}),
        ("POST", {"Title": "case"}),
        ("POST", {"id": 1}),
        ("POST", {"version": 3}),
        ("POST", {"subscriber_count": 10}),
        ("POST", {"group_count": 1}),
        ("POST", {"groups": []}),
        ("POST", {"created_at": "2026-01-01T00:00:00Z"}),
        ("POST", {"updated_at": "2026-01-01T00:00:00Z"}),
        ("PATCH", {"chat_id": -1009999999999}),
        ("PATCH", {"titel": "typo"}),
        ("PATCH", {"Title": "case"}),
        ("PATCH", {"subscriber_count": 10}),
        ("PATCH", {"version": 2}),
        ("PATCH", {"updated_at": "2026-01-01T00:00:00Z"}),
    ],
    nul_values={"title": "a\u0000b", "invite_link": "https://t.me/+a\u0000b"},
    path_routes=[("GET", "{}", "chat_id"), ("PATCH", "{}", "chat_id"), ("DELETE", "{}", "chat_id")],
    bad_parameters=[],
    restated=({}, {"title": "Rust News", "username": "RUSTNEWS"}),
)


@pytest.fixture(params=[GROUP_RESOURCE, CHANNEL_RESOURCE], ids=["groups", "channels"])
def resource(request: pytest.FixtureRequest) -> Resource:
    return request.param


# ---------------------------------------------------------------- field values


async def test_invalid_values_on_create_are_422_naming_the_field(
    resource: Resource, client, editor, subtests
):
    for label, name, value in [*resource.invalid, *resource.invalid_chat_ids]:
        with subtests.test(msg=label):
            response = await client.post(
                resource.url, json={**resource.body, name: value}, headers=editor
            )
            body = problem(response, 422)
            assert body["type"] == VALIDATION
            assert names_field(body, "body", name), body["errors"]
            assert body["detail"].startswith(f"body.{name}"), body["detail"]
    assert (await resource.listing(client, editor))["total"] == 0


async def test_invalid_values_on_update_are_422_and_change_nothing(
    resource: Resource, client, editor, subtests
):
    created = await resource.create(client, editor, **resource.nullable)
    for label, name, value in resource.invalid:
        with subtests.test(msg=label):
            body = problem(
                await client.patch(resource.item, json={name: value}, headers=editor), 422
            )
            assert body["type"] == VALIDATION
            assert names_field(body, "body", name), body["errors"]
    assert await resource.read(client, editor, resource.chat_id) == created


async def test_valid_edge_values_on_create_are_accepted(
    resource: Resource, client, editor, subtests
):
    chat_ids = iter(resource.free_chat_ids)
    edges = [valid("chat_id", chat_id) for chat_id in resource.valid_chat_ids]
    for label, name, value, expected in [*resource.valid, *edges]:
        with subtests.test(msg=label):
            chat_id = value if name == "chat_id" else next(chat_ids)
            created = await resource.create(client, editor, **{"chat_id": chat_id, name: value})
            assert created[name] == expected
            assert (await resource.read(client, editor, chat_id))[name] == expected


async def test_valid_edge_values_on_update_are_accepted(
    resource: Resource, client, editor, subtests
):
    await resource.create(client, editor, **resource.nullable)
    for label, name, value, expected in resource.valid:
        with subtests.test(msg=label):
            response = await client.patch(resource.item, json={name: value}, headers=editor)
            assert response.status_code == 200, response.text
            assert response.json()[name] == expected
            assert (await resource.read(client, editor, resource.chat_id))[name] == expected


async def test_null_for_a_required_field_on_create_is_422(
    resource: Resource, client, editor, subtests
):
    for name in resource.non_nullable:
        with subtests.test(msg=name):
            response = await client.post(
                resource.url, json={**resource.body, name: None}, headers=editor
            )
            assert names_field(problem(response, 422), "body", name)
    assert (await resource.listing(client, editor))["total"] == 0


async def test_null_for_a_non_nullable_field_on_update_is_422_naming_it(
    resource: Resource, client, editor, subtests
):
    created = await resource.create(client, editor)
    for name in resource.non_nullable:
        with subtests.test(msg=name):
            body = problem(
                await client.patch(resource.item, json={name: None}, headers=editor), 422
            )
            assert names_field(body, "body", name), body["errors"]
    assert await resource.read(client, editor, resource.chat_id) == created


async def test_null_clears_the_nullable_fields(resource: Resource, client, editor):
    created = await resource.create(client, editor, **resource.nullable)
    assert {name: created[name] for name in resource.nullable} == resource.nullable
    cleared = dict.fromkeys(resource.nullable)
    response = await client.patch(resource.item, json=cleared, headers=editor)
    assert response.status_code == 200, response.text
    assert {name: response.json()[name] for name in resource.nullable} == cleared
    assert response.json()["version"] == 2
    stored = await resource.read(client, editor, resource.chat_id)
    assert {name: stored[name] for name in resource.nullable} == cleared


async def test_missing_required_field_on_create_is_422(
    resource: Resource, client, editor, subtests
):
    for name in ("chat_id", "title"):
        with subtests.test(msg=name):
            payload = {k: v for k, v in resource.body.items() if k != name}
            body = problem(await client.post(resource.url, json=payload, headers=editor), 422)
            assert any(
                e["loc"] == ["body", name] and e["type"] == "missing" for e in body["errors"]
            ), body["errors"]
    assert (await resource.listing(client, editor))["total"] == 0


# ---------------------------------------------------------------- bodies


async def test_unknown_fields_are_422(resource: Resource, client, editor, subtests):
    created = await resource.create(client, editor)
    other_chat_id = resource.free_chat_ids[0]
    for method, extra in resource.unknown_fields:
        with subtests.test(msg=f"{method} {extra}"):
            if method == "POST":
                payload, url = {**resource.body, "chat_id": other_chat_id, **extra}, resource.url
            else:
                payload, url = extra, resource.item
            body = problem(await client.request(method, url, json=payload, headers=editor), 422)
            (name,) = extra
            assert any(
                e["loc"] == ["body", name] and e["type"] == "extra_forbidden"
                for e in body["errors"]
            ), body["errors"]
    assert (await resource.listing(client, editor))["total"] == 1
    assert await resource.read(client, editor, resource.chat_id) == created


MALFORMED_JSON = [
    b'{"chat_id": ',
    b'{"title": ',
    b"{'title': 'x'}",
    b"{title: 1}",
    b'{"title": "x",}',
    b'{"title": "x"}}',
    b"[1,]",
    b"nul",
]


async def test_malformed_json_is_400(resource: Resource, client, editor, subtests):
    created = await resource.create(client, editor)
    headers = {**editor, "Content-Type": "application/json"}
    for method in ("POST", "PATCH"):
        url = resource.url if method == "POST" else resource.item
        for content in MALFORMED_JSON:
            with subtests.test(msg=f"{method} {content!r}"):
                response = await client.request(method, url, content=content, headers=headers)
                body = problem(response, 400)
                assert body["type"] == "https://channelgate.dev/problems/malformed"
                assert body["detail"] == "the body is not valid JSON"
        with subtests.test(msg=f"{method} not UTF-8"):
            problem(await client.request(method, url, content=b"\xff", headers=headers), 400)
    assert (await resource.listing(client, editor))["total"] == 1
    assert await resource.read(client, editor, resource.chat_id) == created


async def test_json_that_is_not_an_object_is_422(resource: Resource, client, editor, subtests):
    created = await resource.create(client, editor)
    headers = {**editor, "Content-Type": "application/json"}
    for method in ("POST", "PATCH"):
        url = resource.url if method == "POST" else resource.item
        for payload in ([], "title", 5, [resource.body], None):
            with subtests.test(msg=f"{method} {payload!r}"):
                content = json.dumps(payload).encode()
                response = await client.request(method, url, content=content, headers=headers)
                assert problem(response, 422)["type"] == VALIDATION
    assert (await resource.listing(client, editor))["total"] == 1
    assert await resource.read(client, editor, resource.chat_id) == created


async def test_nul_characters_in_text_are_422(resource: Resource, client, editor, subtests):
    """PostgreSQL cannot store NUL, so the contract refuses it in every string of a body."""
    created = await resource.create(client, editor)
    for method in ("POST", "PATCH"):
        for name, value in resource.nul_values.items():
            with subtests.test(msg=f"{method} {name}"):
                if method == "POST":
                    url = resource.url
                    payload = {**resource.body, "chat_id": resource.free_chat_ids[0], name: value}
                else:
                    url, payload = resource.item, {name: value}
                response = await client.request(method, url, json=payload, headers=editor)
                errors = problem(response, 422)["errors"]
                assert [e["loc"] for e in errors] == [["body", name]], errors
                assert "NUL" in errors[0]["msg"], errors
    assert (await resource.listing(client, editor))["total"] == 1
    assert await resource.read(client, editor, resource.chat_id) == created


# ---------------------------------------------------------------- hostile input

HOSTILE_TITLES = [
    "'; DROP TABLE groups; --",
    "'; DROP TABLE channels; --",
    "Robert'); DELETE FROM channels WHERE ('1'='1",
    "1' OR '1'='1",
    '" OR ""="',
    "%_\\%",
    "<script>alert(1)</script>",
    "<img src=x onerror=alert(1)>",
    "🦀 Rust 🚀 👩‍👩‍👧",
    "📣 News 🦀",
    "\u202egnp.exe",
    "\u202eswen",
    "שלום עולם",
    "مرحبا بالعالم",
    "أخبار",
    "zero\u200bwidth",
    "a\u200db",
    "x" * 254 + "🦀",
]


async def test_hostile_titles_are_stored_verbatim(resource: Resource, client, editor, subtests):
    chat_ids = iter(resource.free_chat_ids)
    for title in HOSTILE_TITLES:
        with subtests.test(msg=repr(title)[:30]):
            chat_id = next(chat_ids)
            assert (await resource.create(client, editor, chat_id=chat_id, title=title))[
                "title"
            ] == title
            assert (await resource.read(client, editor, chat_id))["title"] == title
            page = await resource.listing(client, editor, q=title)
            assert [item["chat_id"] for item in page["items"]] == [chat_id]
            renamed = f"{title[:250]}!"
            response = await client.patch(
                f"{resource.url}/{chat_id}", json={"title": renamed}, headers=editor
            )
            assert response.status_code == 200, response.text
            assert response.json()["title"] == renamed
    assert (await resource.listing(client, editor))["total"] == len(HOSTILE_TITLES)


SEARCHED = ["Crab 🦀 club", "שלום חברים", "📣 Announcements"]
HOSTILE_Q = [
    ("' OR 1=1 --", []),
    ("' OR ''='", []),
    ("'; DROP TABLE groups; --", []),
    ("%' OR '1'='1", []),
    ("\\", []),
    ("%%", []),
    ("🦀", [1]),
    ("שלום", [2]),
    ("📣", [3]),
    ("²", []),
    ("١٢", []),
    ("--5", []),
    ("--1", []),
    ("-", []),
    ("9223372036854775807", []),
    ("-9223372036854775808", []),
    ("99999999999999999999999", []),
    ("-99999999999999999999", []),
]


async def test_hostile_q_is_never_500(resource: Resource, client, viewer, editor, subtests):
    chat_ids = iter(resource.free_chat_ids)
    created = [
        await resource.create(client, editor, chat_id=next(chat_ids), title=title)
        for title in SEARCHED
    ]
    for q, expected in HOSTILE_Q:
        with subtests.test(msg=repr(q)):
            page = await resource.listing(client, viewer, q=q)
            assert [item["chat_id"] for item in page["items"]] == [
                created[i - 1]["chat_id"] for i in expected
            ]
            assert page["total"] == len(expected)
    for q in ("\u0000", "a\u0000b"):  # NUL: 422, like NUL anywhere
        with subtests.test(msg=repr(q)):
            response = await client.get(resource.url, params={"q": q}, headers=viewer)
            assert names_field(problem(response, 422), "query", "q")
    assert (await resource.listing(client, viewer))["total"] == len(SEARCHED)


# ---------------------------------------------------------------- lists

BAD_PARAMETERS = [
    ({"limit": 0}, "limit"),
    ({"limit": 201}, "limit"),
    ({"limit": -1}, "limit"),
    ({"limit": "ten"}, "limit"),
    ({"limit": "x"}, "limit"),
    ({"limit": 1.5}, "limit"),
    ({"q": "x" * 256}, "q"),
]


async def test_list_rejects_bad_parameters(resource: Resource, client, viewer, subtests):
    for params, name in [*BAD_PARAMETERS, *resource.bad_parameters]:
        with subtests.test(msg=str(params)[:40]):
            body = problem(await client.get(resource.url, params=params, headers=viewer), 422)
            assert names_field(body, "query", name), body["errors"]
    for limit in (1, 200):
        assert (await resource.listing(client, viewer, limit=limit))["items"] == []


BAD_CURSORS = [
    ("random", "not-a-cursor"),
    ("punctuation", "garbage!"),
    ("not-base64", "%%%%"),
    ("non-ascii", "é"),
    ("too-long", "x" * 600),
    ("just-too-long", "A" * 513),
    ("b64-binary", b64(b"\xff\xfe\x00junk")),
    ("b64-junk", b64(b"\x00\x01\x02")),
    ("b64-bad-json", b64(b"[1, 2")),
    ("b64-object", b64({"a": 1})),
    ("b64-object-with-sort", b64({"sort": "-created_at"})),
    ("too-short", keyed("-created_at")),
    ("too-long-list", keyed("-created_at", NOW, 1, 2)),
    ("other-sort", keyed("title", "Bravo", 1)),
    ("other-sort-2", keyed("title", "Rust News", 1)),
    ("other-direction", keyed("created_at", NOW, 1)),
    ("bad-date", keyed("-created_at", "yesterday", 1)),
    ("month-13", keyed("-created_at", "2026-13-01T00:00:00Z", 1)),
    ("naive", keyed("-created_at", "2026-01-01T00:00:00", 1)),
    ("epoch", keyed("-created_at", 1767225600, 1)),
    ("id-string", keyed("-created_at", NOW, "1")),
    ("id-string-2", keyed("-created_at", NOW, "7")),
    ("id-float", keyed("-created_at", NOW, 1.5)),
    ("id-bool", keyed("-created_at", NOW, True)),
    ("id-null", keyed("-created_at", NOW, None)),
    ("id-beyond-int64", keyed("-created_at", NOW, 2**63)),
    ("year-1", keyed("-created_at", "0001-01-01T00:00:00+14:00", 1)),  # before year 1 in UTC
    ("year-9999", keyed("-created_at", "9999-12-31T23:59:59-14:00", 1)),  # after 9999 in UTC
]
# Well formed and in range: such a cursor only moves the page, it cannot reach other data.
BAD_CURSORS += [
    # Beyond what the id column (32-bit) holds: never issued, and no query of it is valid.
    ("id-beyond-int32", keyed("-created_at", NOW, 2**31)),
    ("id-below-int32", keyed("-created_at", NOW, -(2**31) - 1)),
    ("id-negative-int64", keyed("-created_at", NOW, -(2**62))),
]
WELL_FORMED_CURSORS = [
    ("id-largest-int32", keyed("-created_at", NOW, 2**31 - 1)),
    ("id-smallest-int32", keyed("-created_at", NOW, -(2**31))),
]


async def test_malformed_or_tampered_cursor_is_422_never_500(
    resource: Resource, client, viewer, editor, subtests
):
    chat_ids = iter(resource.free_chat_ids)
    created = {
        (await resource.create(client, editor, chat_id=next(chat_ids), title=title))["chat_id"]
        for title in ("Alpha", "Bravo", "Charlie")
    }
    cases = [
        *((label, {"cursor": cursor}, 422) for label, cursor in BAD_CURSORS),
        *((label, {"cursor": cursor}, 200) for label, cursor in WELL_FORMED_CURSORS),
        ("other-list", {"cursor": Keyed("-created_at", NOW, 1).encoded("bots")}, 422),
        *resource.extra_cursors,
    ]
    list_name = resource.url.rsplit("/", 1)[-1]
    for label, raw, status in cases:
        cursor = raw["cursor"]
        encoded: str = cursor.encoded(list_name) if isinstance(cursor, Keyed) else cursor
        params = {**raw, "cursor": encoded}
        with subtests.test(msg=label):
            response = await client.get(resource.url, params=params, headers=viewer)
            if status == 422:
                body = problem(response, 422)
                assert names_field(body, "query", "cursor"), body["errors"]
                if len(encoded) <= 512:  # longer ones fail the parameter's max length
                    assert body["detail"] == MALFORMED_CURSOR
            else:
                assert response.status_code == 200, response.text
                page = response.json()
                assert {item["chat_id"] for item in page["items"]} <= created
                assert page["total"] == len(created)


# ---------------------------------------------------------------- path ids

BEYOND_INT64 = [
    "9223372036854775808",
    "-9223372036854775809",
    "-99999999999999999999999",
    "-1" + "0" * 30,
    "abc",
    "x",
    "1.5",
]


async def test_path_ids_beyond_int64_are_422(resource: Resource, client, editor, subtests):
    for method, template, param in resource.path_routes:
        for value in BEYOND_INT64:
            url = f"{resource.url}/{template.format(value)}"
            with subtests.test(msg=f"{method} {url}"):
                kwargs = {"json": {"title": "x"}} if method == "PATCH" else {}
                response = await client.request(method, url, headers=editor, **kwargs)
                assert names_field(problem(response, 422), "path", param)


async def test_path_ids_follow_the_telegram_id_rules(resource: Resource, client, editor):
    """Path ids are 64-bit and of the resource's kind: one that cannot be a group's (or a
    channel's) id is a 422, one that could but is unknown a 404."""
    impossible = [INT64_MAX, -INT64_MAX, 5, 0, -(10**12), -4_000_000_000_001]
    if resource.name == "channel":
        impossible += [-1, -999_999_999_999]
    for chat_id in impossible:
        response = await client.get(f"{resource.url}/{chat_id}", headers=editor)
        assert names_field(problem(response, 422), "path", "chat_id"), chat_id
    for chat_id in (-4_000_000_000_000, -(10**12 + 1)):
        response = await client.get(f"{resource.url}/{chat_id}", headers=editor)
        assert problem(response, 404)["detail"] == f"{resource.name} {chat_id} not found"


# ---------------------------------------------------------------- 404, 409, 412


async def test_unknown_item_is_404(resource: Resource, client, editor):
    for method in ("GET", "PATCH", "DELETE"):
        kwargs = {"json": {"title": "x"}} if method == "PATCH" else {}
        response = await client.request(method, resource.item, headers=editor, **kwargs)
        body = problem(response, 404)
        assert body["detail"] == f"{resource.name} {resource.chat_id} not found", method
    assert (await resource.listing(client, editor))["total"] == 0


async def test_duplicate_is_409_and_changes_nothing(resource: Resource, client, editor):
    created = await resource.create(client, editor)
    response = await client.post(
        resource.url, json={**resource.body, "title": "Other"}, headers=editor
    )
    body = problem(response, 409)
    assert body["detail"] == f"{resource.name} {resource.chat_id} already exists"
    assert await resource.read(client, editor, resource.chat_id) == created
    assert (await resource.listing(client, editor))["total"] == 1


async def test_patch_that_changes_nothing_keeps_the_version(
    resource: Resource, client, editor, owner
):
    """A no-op PATCH is not a change, so it neither bumps the version (which would make other
    editors' If-Match stale for nothing) nor writes an audit row."""
    create_with, restating = resource.restated
    created = await resource.create(client, editor, **create_with)
    rows = len(await audit_log(client, owner))
    for payload in ({}, restating):
        response = await client.patch(resource.item, json=payload, headers=editor)
        assert response.status_code == 200, response.text
        assert response.headers["etag"] == '"1"'
        assert response.json() == created
    assert len(await audit_log(client, owner)) == rows
    assert await resource.read(client, editor, resource.chat_id) == created


STALE_IF_MATCH = ['"2"', '"0"', '"abc"', 'W/"2"', 'W/"9"', "nonsense"]
# Matching forms, each at the version the one before it made.
MATCHING_IF_MATCH = ['"1"', 'W/"2"', "*", '"9", "4"', '"7", W/"5"']


async def test_if_match(resource: Resource, client, editor, subtests):
    created = await resource.create(client, editor)
    for header in STALE_IF_MATCH:
        with subtests.test(msg=f"stale {header}"):
            response = await client.patch(
                resource.item, json={"title": "New"}, headers={**editor, "If-Match": header}
            )
            body = problem(response, 412)
            assert body["detail"] == "version 1 is current; reload and retry"
    assert await resource.read(client, editor, resource.chat_id) == created
    for version, header in enumerate(MATCHING_IF_MATCH, start=2):
        response = await client.patch(
            resource.item, json={"title": f"New {version}"}, headers={**editor, "If-Match": header}
        )
        assert response.status_code == 200, (header, response.text)
        assert response.json()["version"] == version, header
        assert response.json()["title"] == f"New {version}"
        assert response.headers["etag"] == f'"{version}"'


async def test_stale_if_match_after_a_concurrent_edit_is_412(resource: Resource, client, editor):
    await resource.create(client, editor)
    first = await client.patch(
        resource.item, json={"title": "A"}, headers={**editor, "If-Match": '"1"'}
    )
    assert first.status_code == 200, first.text
    second = await client.patch(
        resource.item, json={"title": "B"}, headers={**editor, "If-Match": '"1"'}
    )
    assert problem(second, 412)["detail"] == "version 2 is current; reload and retry"
    assert (await resource.read(client, editor, resource.chat_id))["title"] == "A"
