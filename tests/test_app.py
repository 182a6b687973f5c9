"""The application shell: problem+json errors, body limits, request ids, security headers, CORS,
health and readiness, a database that is down, the OpenAPI document, and settings."""

import re
import uuid
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from pydantic import ValidationError
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError

from db import asyncpg_dsn, schema_head
from settings import Settings
from tests.conftest import ENV_OWNER, Harness, clean_database, problem, start_harness
from tests.factories import listening

pytestmark = pytest.mark.anyio

MIB = 1024 * 1024
KEYS = "/api/v1/bot-keys"
JSON = {"Content-Type": "application/json"}


def json_of_size(size: int) -> bytes:
    """A valid JSON object body of exactly `size` bytes."""
    head, tail = b'{"name": "', b'"}'
    return head + b"x" * (size - len(head) - len(tail)) + tail


async def chunks(body: bytes, size: int = 64 * 1024) -> AsyncIterator[bytes]:
    for start in range(0, len(body), size):
        yield body[start : start + size]


# ---------------------------------------------------------------- problem+json


async def test_unknown_route_is_404_problem(client: httpx.AsyncClient):
    body = problem(await client.get("/api/v1/nothing-here"), 404)
    assert body == {
        "type": "about:blank",
        "title": "Not Found",
        "status": 404,
        "detail": "no route for /api/v1/nothing-here",
        "request_id": body["request_id"],
    }


async def test_wrong_method_is_405_problem(client: httpx.AsyncClient):
    response = await client.delete("/healthz")
    body = problem(response, 405)
    assert body["title"] == "Method Not Allowed" and body["type"] == "about:blank"
    assert response.headers["allow"] == "GET"


async def test_non_json_body_is_415(client: httpx.AsyncClient, owner):
    for content_type in (None, "text/plain", "application/x-www-form-urlencoded", "text/json"):
        headers = {**owner, "Content-Type": content_type} if content_type else owner
        response = await client.post(KEYS, content=b'{"name": "x"}', headers=headers)
        body = problem(response, 415)
        assert body["detail"] == "request bodies must be application/json"
        assert body["type"] == "https://channelgate.dev/problems/not-json"
    assert (await client.get(KEYS, headers=owner)).json()["total"] == 0


async def test_json_with_charset_is_accepted(client: httpx.AsyncClient, owner):
    headers = {**owner, "Content-Type": "application/json; charset=utf-8"}
    response = await client.post(KEYS, content=b'{"name": "x"}', headers=headers)
    assert response.status_code == 201, response.text


@pytest.mark.parametrize("streamed", [False, True], ids=["content-length", "chunked"])
async def test_body_over_1_mib_is_413(client: httpx.AsyncClient, owner, streamed):
    data = json_of_size(MIB + 1)
    content: Any = chunks(data) if streamed else data
    response = await client.post(KEYS, content=content, headers={**owner, **JSON})
    if streamed:
        assert "content-length" not in response.request.headers
    body = problem(response, 413)
    assert body["detail"] == f"the body exceeds {MIB} bytes"
    assert body["type"] == "https://channelgate.dev/problems/too-large"
    assert (await client.get(KEYS, headers=owner)).json()["total"] == 0


@pytest.mark.parametrize("streamed", [False, True], ids=["content-length", "chunked"])
async def test_body_of_exactly_1_mib_is_read(client: httpx.AsyncClient, owner, streamed):
    data = json_of_size(MIB)
    content: Any = chunks(data) if streamed else data
    response = await client.post(KEYS, content=content, headers={**owner, **JSON})
    errors = problem(response, 422)["errors"]  # parsed and validated, not refused for size
    assert [(e["loc"], e["type"]) for e in errors] == [(["body", "name"], "string_too_long")]


async def test_verification_batches_may_be_larger(client: httpx.AsyncClient, bot):
    padded = b'{"events": [], "pad": "' + b"x" * (2 * MIB) + b'"}'
    response = await client.post(
        "/api/v1/bot/verifications", content=padded, headers={**bot, **JSON}
    )
    assert response.status_code == 422, response.text
    huge = json_of_size(8 * MIB + 1)
    response = await client.post("/api/v1/bot/verifications", content=huge, headers={**bot, **JSON})
    assert problem(response, 413)["detail"] == f"the body exceeds {8 * MIB} bytes"


async def test_malformed_json_is_400(client: httpx.AsyncClient, owner):
    for raw in (b'{"name": ', b"{'name': 'x'}", b'{"name": "x"} trailing', b"[1,]"):
        body = problem(await client.post(KEYS, content=raw, headers={**owner, **JSON}), 400)
        assert body["detail"] == "the body is not valid JSON", raw
        assert body["type"] == "https://channelgate.dev/problems/malformed"
        assert "errors" not in body


async def test_body_that_is_not_utf8_is_400(client: httpx.AsyncClient, owner):
    problem(await client.post(KEYS, content=b"\xff\xfe", headers={**owner, **JSON}), 400)


async def test_invalid_body_is_422_with_errors(client: httpx.AsyncClient, owner):
    response = await client.post(KEYS, json={"name": 5, "colour": "red"}, headers=owner)
    body = problem(response, 422)
    assert body["title"] == "Unprocessable Content"
    assert body["type"] == "https://channelgate.dev/problems/validation"
    assert body["detail"] == "body.name: Input should be a valid string (and 1 more)"
    assert all(set(e) == {"loc", "msg", "type"} for e in body["errors"])
    assert sorted((e["loc"], e["type"]) for e in body["errors"]) == [
        (["body", "colour"], "extra_forbidden"),
        (["body", "name"], "string_type"),
    ]


async def test_invalid_query_is_422_with_errors(client: httpx.AsyncClient, owner):
    body = problem(await client.get(KEYS, params={"limit": "many"}, headers=owner), 422)
    assert [(e["loc"], e["type"]) for e in body["errors"]] == [(["query", "limit"], "int_parsing")]


async def test_unhandled_exception_is_500_problem_without_trace(harness: Harness):
    @harness.app.get("/boom")
    async def boom() -> None:
        raise RuntimeError("secret internals at /srv/app.py line 42")

    response = await harness.client.get("/boom", headers={"X-Request-ID": "boom-1"})
    body = problem(response, 500)
    assert body == {
        "type": "about:blank",
        "title": "Internal Server Error",
        "status": 500,
        "detail": "internal error; quote the request id when reporting it",
        "request_id": "boom-1",
    }
    assert "secret" not in response.text and "Traceback" not in response.text
    assert response.headers["x-content-type-options"] == "nosniff"


# ---------------------------------------------------------------- request ids, headers


async def test_sane_request_id_is_echoed(client: httpx.AsyncClient):
    for sent in ("abc-123", "a.b:c_d-e", "x" * 64, str(uuid.uuid4())):
        response = await client.get("/healthz", headers={"X-Request-ID": sent})
        assert response.headers["x-request-id"] == sent


async def test_insane_request_id_is_replaced(client: httpx.AsyncClient):
    insane = [
        b"x" * 65,
        b"has space",
        b"a\r\nX-Evil: 1",
        b"a\nb",
        b"caf\xc3\xa9",
        b"<b>",
        b"a/b",
        b"",
    ]
    for sent in insane:
        response = await client.get("/api/v1/nope", headers=[(b"X-Request-ID", sent)])
        generated = response.headers["x-request-id"]
        assert generated.encode() != sent and len(generated) == 32 and generated.isalnum(), sent
        assert problem(response, 404)["request_id"] == generated
        assert "x-evil" not in response.headers


async def test_request_id_generated_when_absent(client: httpx.AsyncClient):
    first = (await client.get("/healthz")).headers["x-request-id"]
    second = (await client.get("/healthz")).headers["x-request-id"]
    assert first and second and first != second


async def test_security_headers(client: httpx.AsyncClient):
    for path in ("/healthz", "/api/v1/nope", "/api/v1/groups"):  # 200, 404, 401
        response = await client.get(path)
        assert response.headers["x-content-type-options"] == "nosniff"
        assert response.headers["x-frame-options"] == "DENY"
        assert response.headers["referrer-policy"] == "no-referrer"
        assert "default-src 'none'" in response.headers["content-security-policy"]


async def test_security_headers_on_gate_rejections(client: httpx.AsyncClient):
    response = await client.post(KEYS, content=b"x", headers={"Content-Type": "text/plain"})
    assert response.status_code == 415
    assert response.headers["x-frame-options"] == "DENY" and response.headers["x-request-id"]


# ---------------------------------------------------------------- CORS


@pytest.fixture
async def cors(database_url: str, jwks_server: Any, tokens: Any) -> AsyncIterator[Harness]:
    await clean_database(database_url)
    async for h in start_harness(
        database_url, jwks_server.url, tokens, cors_origins=["https://dash.example"]
    ):
        yield h


def preflight(origin: str) -> dict[str, str]:
    return {
        "Origin": origin,
        "Access-Control-Request-Method": "PATCH",
        "Access-Control-Request-Headers": "authorization, content-type, if-match",
    }


async def test_cors_preflight_for_a_configured_origin(cors: Harness):
    response = await cors.client.options(
        "/api/v1/groups/-1001234567890", headers=preflight("https://dash.example")
    )
    assert response.status_code == 200
    assert response.headers["access-control-allow-origin"] == "https://dash.example"
    assert "PATCH" in response.headers["access-control-allow-methods"]
    allowed = response.headers["access-control-allow-headers"].lower()
    assert {"authorization", "content-type", "if-match"} <= {h.strip() for h in allowed.split(",")}


async def test_cors_exposes_headers_on_actual_requests(cors: Harness):
    headers = {**cors.auth(ENV_OWNER), "Origin": "https://dash.example"}
    response = await cors.client.get("/api/v1/groups", headers=headers)
    assert response.status_code == 200
    assert response.headers["access-control-allow-origin"] == "https://dash.example"
    exposed = response.headers["access-control-expose-headers"].lower()
    assert "etag" in exposed and "x-request-id" in exposed


@pytest.mark.parametrize("path", ["/api/v1/groups", "/api/v1/bot/groups/-1001234567890/policy"])
async def test_cors_headers_on_every_route_and_error(cors: Harness, path: str):
    """The policy route, served before FastAPI's stack (app.App), answers like the others:
    CORS headers, problem+json errors with the request id."""
    origin = {"Origin": "https://dash.example"}
    refused = await cors.client.get(path, headers={**origin, "X-Request-ID": "r-7"})
    assert problem(refused, 401)["request_id"] == "r-7"
    assert refused.headers["access-control-allow-origin"] == "https://dash.example"
    assert refused.headers["www-authenticate"].startswith("Bearer")
    assert refused.headers["x-content-type-options"] == "nosniff"


async def test_cors_absent_for_other_origins(cors: Harness):
    response = await cors.client.options(
        "/api/v1/groups", headers=preflight("https://evil.example")
    )
    assert response.status_code != 200
    assert "access-control-allow-origin" not in response.headers
    response = await cors.client.get(
        "/api/v1/groups", headers={**cors.auth(ENV_OWNER), "Origin": "https://evil.example"}
    )
    assert "access-control-allow-origin" not in response.headers


async def test_cors_off_by_default(client: httpx.AsyncClient):
    response = await client.options("/api/v1/groups", headers=preflight("https://dash.example"))
    assert "access-control-allow-origin" not in response.headers


# ---------------------------------------------------------------- health, readiness, database down


async def test_healthz_and_readyz(harness: Harness):
    client = harness.client
    response = await client.get("/healthz")
    assert response.status_code == 200 and response.json() == {"status": "ok"}
    await listening(harness)
    response = await client.get("/readyz")
    assert response.status_code == 200, response.text
    link = "up" if harness.services.db.is_postgres else "none"
    ready = {"status": "ok", "schema_revision": schema_head(), "replica_link": link}
    assert response.json() == ready


async def test_sql_errors_never_show_their_parameters(harness: Harness):
    async with harness.sessionmaker() as session:
        with pytest.raises(DBAPIError) as error:
            await session.execute(
                text("SELECT * FROM no_such_table WHERE name = :name"), {"name": "user-secret"}
            )
    assert "user-secret" not in str(error.value)
    assert "parameters hidden" in str(error.value)


async def test_readyz_is_503_while_the_schema_is_behind(harness: Harness):
    await listening(harness)
    async with harness.sessionmaker() as session:
        await session.execute(text("UPDATE alembic_version SET version_num = 'older'"))
        await session.commit()
    try:
        body = problem(await harness.client.get("/readyz"), 503)
        assert "schema is at older" in body["detail"] and "channelgate migrate" in body["detail"]
    finally:
        async with harness.sessionmaker() as session:
            await session.execute(
                text("UPDATE alembic_version SET version_num = :head"), {"head": schema_head()}
            )
            await session.commit()


DOWN_URLS = [
    pytest.param("postgresql+asyncpg://postgres@127.0.0.1:1/nope", id="postgresql-refused"),
    pytest.param("sqlite+aiosqlite:////nonexistent-dir/channelgate.db", id="sqlite-unopenable"),
]


@pytest.fixture(params=DOWN_URLS)
async def down(request: pytest.FixtureRequest, jwks_server: Any, tokens: Any):
    async for h in start_harness(request.param, jwks_server.url, tokens, auto_migrate=False):
        yield h


def assert_unavailable(response: httpx.Response) -> None:
    body = problem(response, 503)
    assert body["detail"] == "the database is unavailable; retry shortly"
    assert int(response.headers["retry-after"]) > 0


# aiosqlite's worker thread for the connection that failed to open may report to the test's
# closed event loop afterwards; that noise is the library's, not a response of ours.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
async def test_database_down_is_503_not_500(down: Harness):
    client = down.client
    assert (await client.get("/healthz")).status_code == 200  # the process itself is fine
    assert_unavailable(await client.get("/readyz"))
    owner = down.auth("00000000-0000-4000-8000-00000000e0e0")  # OWNER_USER_IDS: no DB lookup
    assert_unavailable(await client.get("/api/v1/groups", headers=owner))
    assert_unavailable(await client.post(KEYS, json={"name": "x"}, headers=owner))
    staff = down.auth(str(uuid.uuid4()))  # the staff lookup itself needs the database
    assert_unavailable(await client.get("/api/v1/me", headers=staff))
    bot = {"Authorization": "Bearer cgk_" + "Z" * 43}  # not cached: needs the database
    assert_unavailable(await client.get("/api/v1/bot/groups/-1001234567890/policy", headers=bot))


# ---------------------------------------------------------------- OpenAPI


async def test_openapi_document(client: httpx.AsyncClient):
    response = await client.get("/openapi.json")
    assert response.status_code == 200
    spec = response.json()
    assert spec["openapi"].startswith("3.1.")
    schemes = spec["components"]["securitySchemes"]
    assert schemes["SupabaseJWT"] == {
        "type": "http",
        "scheme": "bearer",
        "bearerFormat": "JWT",
        "description": "Supabase access token",
    }
    assert schemes["BotKey"]["bearerFormat"].startswith("cgk_")
    assert schemes["BotKey"]["type"] == "http" and schemes["BotKey"]["scheme"] == "bearer"
    operations = {
        (method.upper(), path): op
        for path, item in spec["paths"].items()
        for method, op in item.items()
    }
    assert operations[("GET", "/api/v1/groups")]["security"] == [{"SupabaseJWT": []}]
    policy = operations[("GET", "/api/v1/bot/groups/{chat_id}/policy")]
    assert policy["security"] == [{"BotKey": []}]
    assert "201" in operations[("POST", "/api/v1/bot-keys")]["responses"]
    assert all(op.get("summary") and op.get("responses") for op in operations.values())


OPERATION_IDS = {
    ("GET", "/api/v1/groups"): "groups-list",
    ("POST", "/api/v1/groups"): "groups-create",
    ("GET", "/api/v1/groups/{chat_id}"): "groups-read",
    ("PUT", "/api/v1/groups/{chat_id}/channels/{channel_id}"): "groups-link_channel",
    ("DELETE", "/api/v1/groups/{chat_id}/channels/{channel_id}"): "groups-unlink_channel",
    ("GET", "/api/v1/channels"): "channels-list",
    ("GET", "/api/v1/staff"): "staff-list",
    ("DELETE", "/api/v1/bot-keys/{key_id}"): "bot_keys-revoke",
    ("GET", "/api/v1/bot/groups/{chat_id}/policy"): "bot-read_policy",
    ("POST", "/api/v1/bot/verifications"): "bot-ingest_verifications",
    ("GET", "/api/v1/analytics/top-groups"): "analytics-top_groups",
    ("GET", "/healthz"): "service-healthz",
}


async def test_openapi_operation_ids_are_short_and_unique(client: httpx.AsyncClient, subtests):
    """`<tag>-<function>`, without the tag's words repeated, so generated clients read
    `groupsList` and `botKeysRevoke`; an id that repeats would make a client drop a route."""
    spec = (await client.get("/openapi.json")).json()
    operations = {
        (method.upper(), path): op["operationId"]
        for path, item in spec["paths"].items()
        for method, op in item.items()
    }
    for (method, path), expected in OPERATION_IDS.items():
        with subtests.test(msg=f"{method} {path}"):
            assert operations[(method, path)] == expected
    ids = list(operations.values())
    assert len(ids) == len(set(ids)), sorted(i for i in ids if ids.count(i) > 1)
    for (method, path), operation_id in operations.items():
        with subtests.test(msg=f"shape of {method} {path}"):
            assert re.fullmatch(r"[a-z_]+-[a-z_]+", operation_id), operation_id


async def test_openapi_document_is_valid(client: httpx.AsyncClient):
    validator = pytest.importorskip("openapi_spec_validator")
    validator.validate((await client.get("/openapi.json")).json())


# ---------------------------------------------------------------- settings


SETTING_NAMES = [name.upper() for name in Settings.model_fields]


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """No setting leaks in from the environment of whoever runs the tests."""
    for name in SETTING_NAMES:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def settings(**values: Any) -> Settings:
    return Settings(_env_file=None, **values)  # pyrefly: ignore[unexpected-keyword]


async def test_production_needs_a_way_to_verify_tokens(env):
    with pytest.raises(ValidationError) as error:
        settings(environment="production")
    assert "production needs SUPABASE_URL, SUPABASE_JWKS_URL or SUPABASE_JWT_SECRET" in str(
        error.value
    )
    ok = settings(environment="production", supabase_url="https://abc.supabase.co/")
    assert ok.jwks_url == "https://abc.supabase.co/auth/v1/.well-known/jwks.json"
    assert ok.jwt_issuer == "https://abc.supabase.co/auth/v1"
    assert settings(environment="production", supabase_jwt_secret="s" * 32).environment


async def test_production_refuses_a_short_hs256_secret(env):
    # The README's old walkthrough secret signed owner tokens in production.
    with pytest.raises(ValidationError, match="at least 32 bytes in production"):
        settings(environment="production", supabase_jwt_secret="local-dev-secret-change-me")
    assert settings(supabase_jwt_secret="short").supabase_jwt_secret == "short"  # development


async def test_database_settings_that_cannot_work_are_refused(env):
    pooler = "postgresql://u@pooler.example:6543/postgres"
    with pytest.raises(ValidationError, match="DATABASE_LISTEN_URL: LISTEN needs a session"):
        settings(database_url=pooler, database_pool_mode="transaction")
    ok = settings(
        database_url=pooler,
        database_pool_mode="transaction",
        database_listen_url="postgres://u@pooler.example:5432/postgres",
    )
    assert ok.listen_url == "postgresql+asyncpg://u@pooler.example:5432/postgres"
    with pytest.raises(ValidationError, match="must be below DATABASE_COMMAND_TIMEOUT"):
        settings(database_statement_timeout=5, database_command_timeout=5)
    replica = "postgres://u@replica.example:5432/postgres"
    with pytest.raises(ValidationError, match="DATABASE_READ_URL is a PostgreSQL replica's"):
        settings(database_read_url=replica)  # beside the default SQLite
    with pytest.raises(ValidationError, match="DATABASE_READ_URL is a PostgreSQL replica's"):
        settings(database_url=pooler, database_read_url="sqlite+aiosqlite:///r.db")
    read = settings(database_url="postgresql://u@primary.example/p", database_read_url=replica)
    assert read.database_read_url == "postgresql+asyncpg://u@replica.example:5432/postgres"


@pytest.mark.parametrize(
    ("query", "dsn", "seconds"),
    [
        ("sslmode=require", "postgresql://u:p@h:5432/d?sslmode=require", None),
        (
            "sslmode=verify-full&sslrootcert=/ca.pem&connect_timeout=7",
            "postgresql://u:p@h:5432/d?sslmode=verify-full&sslrootcert=%2Fca.pem",
            7.0,
        ),
        ("keepalives=1&keepalives_idle=30&gssencmode=disable", "postgresql://u:p@h:5432/d", None),
        ("requiressl=1", "postgresql://u:p@h:5432/d?sslmode=require", None),
        (
            "fallback_application_name=psql&target_session_attrs=read-write",
            "postgresql://u:p@h:5432/d?application_name=psql&target_session_attrs=read-write",
            None,
        ),
    ],
    ids=["sslmode", "verify-full", "libpq-only", "requiressl", "fallback-name"],
)
async def test_libpq_url_parameters_are_translated_for_asyncpg(query, dsn, seconds):
    assert asyncpg_dsn(f"postgresql+asyncpg://u:p@h:5432/d?{query}") == (dsn, seconds)


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("postgres://u:p@db:5432/app", "postgresql+asyncpg://u:p@db:5432/app"),
        ("postgresql://u@db/app?sslmode=require", "postgresql+asyncpg://u@db/app?sslmode=require"),
        ("postgresql+asyncpg://u@db/app", "postgresql+asyncpg://u@db/app"),
        ("sqlite+aiosqlite:///./x.db", "sqlite+aiosqlite:///./x.db"),
    ],
)
async def test_database_url_is_normalised(env, url, expected):
    assert settings(database_url=url).database_url == expected
    env.setenv("DATABASE_URL", url)
    assert Settings(_env_file=None).database_url == expected  # pyrefly: ignore[unexpected-keyword]


@pytest.mark.parametrize(
    "entry",
    [
        "no-separator",
        "name:",
        ":cgk_" + "A" * 43,
        "name:cgk_" + "A" * 42,
        "name:cgk_" + "A" * 44,
        "name:xyz_" + "A" * 43,
        "name:cgk_" + "!" * 43,
        "name:cgk_" + "A" * 42 + " ",
    ],
    ids=["no-colon", "no-key", "no-name", "short", "long", "prefix", "not-url-safe", "space"],
)
async def test_malformed_bot_api_keys_are_rejected(env, entry):
    with pytest.raises(ValidationError, match="BOT_API_KEYS entries must be name:cgk_"):
        settings(bot_api_keys=[entry])
    env.setenv("BOT_API_KEYS", f"ok:cgk_{'B' * 43},{entry}")
    with pytest.raises(ValidationError, match="BOT_API_KEYS"):
        Settings(_env_file=None)  # pyrefly: ignore[unexpected-keyword]


async def test_malformed_owner_user_ids_are_rejected(env):
    env.setenv("OWNER_USER_IDS", "not-a-uuid")
    with pytest.raises(ValidationError, match=r"(?i)owner_user_ids"):
        Settings(_env_file=None)  # pyrefly: ignore[unexpected-keyword]


async def test_comma_separated_env_values(env):
    owner_a, owner_b = str(uuid.uuid4()), str(uuid.uuid4())
    env.setenv("OWNER_USER_IDS", f" {owner_a} ,{owner_b},,")
    env.setenv("BOT_API_KEYS", f"one:cgk_{'A' * 43}, two:cgk_{'b-_' * 14}x")
    env.setenv("CORS_ORIGINS", "https://a.example,https://b.example")
    env.setenv("REQUIRE_AAL2_FOR_OWNERS", "true")
    loaded = Settings(_env_file=None)  # pyrefly: ignore[unexpected-keyword]
    assert loaded.owner_user_ids == [owner_a, owner_b]
    assert loaded.env_bot_keys == {"one": "cgk_" + "A" * 43, "two": "cgk_" + "b-_" * 14 + "x"}
    assert loaded.cors_origins == ["https://a.example", "https://b.example"]
    assert loaded.require_aal2_for_owners is True


async def test_empty_env_lists(env):
    env.setenv("OWNER_USER_IDS", "")
    env.setenv("BOT_API_KEYS", " , ")
    loaded = Settings(_env_file=None)  # pyrefly: ignore[unexpected-keyword]
    assert loaded.owner_user_ids == [] and loaded.bot_api_keys == []
