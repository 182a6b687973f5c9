"""Shared fixtures: real databases (SQLite always, PostgreSQL with TEST_DATABASE_URL), schema from
Alembic, a fresh app per test with clean tables, a real JWKS endpoint and real signed tokens."""

import base64
import json
import os
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import anyio
import httpx
import jwt
import pytest
from alembic import command
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from fastapi import FastAPI
from sqlalchemy import make_url, text
from sqlalchemy.ext.asyncio import create_async_engine

import cli
from analytics import FOLD_LOCK
from app import Services, create_app
from db import alembic_config
from models import Staff, metadata
from settings import Settings, get_settings
from tests.network import Network

HS_SECRET = "test-hs256-secret-that-is-long-enough-for-hmac"
SUPABASE_URL = "https://project.supabase.test"
ISSUER = f"{SUPABASE_URL}/auth/v1"
ENV_OWNER = "00000000-0000-4000-8000-00000000e0e0"
ENV_BOT_KEY = "cgk_" + "E" * 43


@pytest.fixture(scope="session")
def anyio_backend() -> str:
    return "asyncio"


# ---------------------------------------------------------------- databases


def _backends() -> list[Any]:
    backends: list[Any] = [pytest.param("sqlite", id="sqlite")]
    if os.environ.get("TEST_DATABASE_URL"):
        backends.append(pytest.param("postgresql", id="postgresql"))
    return backends


def normalise_url(url: str) -> str:
    for prefix in ("postgres://", "postgresql://"):
        if url.startswith(prefix):
            return "postgresql+asyncpg://" + url.removeprefix(prefix)
    return url


@asynccontextmanager
async def scratch_postgres(suffix: str) -> AsyncIterator[str]:
    """A PostgreSQL database of the test's own beside TEST_DATABASE_URL's (its URL), dropped
    at the end; the test is skipped without TEST_DATABASE_URL. For migrations' tests."""
    url = os.environ.get("TEST_DATABASE_URL")
    if not url:
        pytest.skip("PostgreSQL only: TEST_DATABASE_URL is not set")
    server = make_url(normalise_url(url))
    name = f"{server.database}_{suffix}"
    admin = create_async_engine(server, isolation_level="AUTOCOMMIT")
    async with admin.connect() as connection:
        await connection.execute(text(f'DROP DATABASE IF EXISTS "{name}"'))
        await connection.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield server.set(database=name).render_as_string(hide_password=False)
    finally:
        async with admin.connect() as connection:
            await connection.execute(text(f'DROP DATABASE IF EXISTS "{name}"'))
        await admin.dispose()


@pytest.fixture(scope="session", params=_backends())
def database_url(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> str:
    if request.param == "sqlite":
        url = f"sqlite+aiosqlite:///{tmp_path_factory.mktemp('db') / 'test.db'}"
    else:
        url = normalise_url(os.environ["TEST_DATABASE_URL"])
    command.upgrade(alembic_config(url), "head")
    return url


async def clean_database(url: str) -> None:
    engine = create_async_engine(url)
    tables = [t.name for t in reversed(metadata.sorted_tables)]
    async with engine.begin() as connection:
        if connection.dialect.name == "postgresql":
            # After any folder's pass: a folder mid-pass locks tables in another order.
            await connection.execute(text(f"SELECT pg_advisory_xact_lock({FOLD_LOCK})"))
            # TRUNCATE swaps every one of the log's 16 partitions and their indexes for new
            # files (~67 ms a test); the few rows a test leaves are deleted in ~1 ms.
            tables.remove("verifications")
            await connection.execute(text(f"TRUNCATE {', '.join(tables)} RESTART IDENTITY"))
            await connection.execute(text("DELETE FROM verifications"))
            await connection.execute(text("ALTER SEQUENCE verifications_id_seq RESTART"))
        else:
            for table in tables:
                await connection.execute(text(f"DELETE FROM {table}"))  # noqa: S608
    await engine.dispose()


# ---------------------------------------------------------------- JWKS server and tokens


class JWKSServer:
    """A real HTTP endpoint serving a JWKS that tests can rotate or take down."""

    def __init__(self) -> None:
        self.jwks: dict[str, Any] = {"keys": []}
        self.down = False
        self.hits = 0
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                server.hits += 1
                if server.down:
                    self.send_response(503)
                    self.end_headers()
                    return
                body = json.dumps(server.jwks).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/auth/v1/.well-known/jwks.json"
        threading.Thread(
            target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        ).start()


class Keys:
    def __init__(self) -> None:
        self.ec = ec.generate_private_key(ec.SECP256R1())
        self.rsa = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.rotated_ec = ec.generate_private_key(ec.SECP256R1())

    def jwk(self, private: Any, kid: str, alg: str) -> dict[str, Any]:
        algorithm = jwt.get_algorithm_by_name(alg)
        data = json.loads(algorithm.to_jwk(private.public_key()))
        return {**data, "kid": kid, "alg": alg, "use": "sig"}

    def jwks(self) -> dict[str, Any]:
        return {"keys": [self.jwk(self.ec, "ec-1", "ES256"), self.jwk(self.rsa, "rsa-1", "RS256")]}


@pytest.fixture(scope="session")
def keys() -> Keys:
    return Keys()


@pytest.fixture(scope="session")
def shared_jwks_server() -> Iterator[JWKSServer]:
    server = JWKSServer()
    yield server
    server.httpd.shutdown()


@pytest.fixture
def jwks_server(shared_jwks_server: JWKSServer, keys: Keys) -> JWKSServer:
    """One endpoint for the whole run, reset for each test (each test's app has its own
    JWKS cache, so nothing carries over)."""
    shared_jwks_server.jwks = keys.jwks()
    shared_jwks_server.down = False
    shared_jwks_server.hits = 0
    return shared_jwks_server


def claims_for(user_id: str, **overrides: Any) -> dict[str, Any]:
    now = int(time.time())
    claims = {
        "iss": ISSUER,
        "aud": "authenticated",
        "sub": user_id,
        "role": "authenticated",
        "aal": "aal1",
        "is_anonymous": False,
        "email": f"{user_id[:8]}@example.com",
        "iat": now,
        "exp": now + 3600,
    }
    claims.update(overrides)
    return {k: v for k, v in claims.items() if v is not None}


class Tokens:
    def __init__(self, keys: Keys) -> None:
        self.keys = keys

    def mint(self, user_id: str, alg: str = "ES256", kid: str | None = None, **claims: Any) -> str:
        payload = claims_for(user_id, **claims)
        if alg == "ES256":
            return jwt.encode(payload, self.keys.ec, "ES256", headers={"kid": kid or "ec-1"})
        if alg == "RS256":
            return jwt.encode(payload, self.keys.rsa, "RS256", headers={"kid": kid or "rsa-1"})
        return jwt.encode(payload, HS_SECRET, "HS256")


@pytest.fixture(scope="session")
def tokens(keys: Keys) -> Tokens:
    return Tokens(keys)


# ---------------------------------------------------------------- the app


# The database waits a deployment gets (Settings' defaults: a 3 s connect, 2 s for a pooled
# connection, 5 s a command, 4 s a statement, 2 s a lock), for the tests about them.
DEPLOYED_TIMEOUTS = {
    name: field.default
    for name, field in Settings.model_fields.items()
    if name.startswith("database_") and name.endswith("_timeout")
}
# Every other test waits longer: the CI machine (a shared VM) stalls every commit or new
# connection for a few seconds now and then (PSI shows whole-machine I/O stalls), and a
# test about groups or exports must not fail on that.
STALL_TOLERANT_TIMEOUTS = {
    "database_connect_timeout": 10.0,
    "database_pool_timeout": 10.0,
    "database_command_timeout": 15.0,
    "database_statement_timeout": 12.0,
    "database_lock_timeout": 10.0,
}


def make_settings(database_url: str, jwks_url: str, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        **STALL_TOLERANT_TIMEOUTS,
        "database_url": database_url,
        "supabase_url": SUPABASE_URL,
        "supabase_jwks_url": jwks_url,
        "supabase_jwt_secret": HS_SECRET,
        "owner_user_ids": [ENV_OWNER],
        "bot_api_keys": [f"envbot:{ENV_BOT_KEY}"],
        "environment": "test",
        "auto_migrate": False,
        "log_level": "warning",
        # Off unless a test turns them on: tables of refused tokens fail auth many times over.
        **{f"rate_limit_{kind}": "" for kind in ("bot", "staff", "anonymous", "auth_failures")},
    }
    values.update(overrides)
    return Settings(_env_file=None, **values)  # pyrefly: ignore[unexpected-keyword]


class Harness:
    """One running app on a clean database, with helpers to call it as staff or as a bot."""

    def __init__(self, app: FastAPI, client: httpx.AsyncClient, tokens: Tokens) -> None:
        self.app = app
        self.client = client
        self.tokens = tokens

    @property
    def services(self) -> Services:
        return self.app.state.services

    @property
    def sessionmaker(self) -> Any:
        return self.services.db.sessionmaker

    async def add_staff(self, role: str, user_id: str | None = None) -> dict[str, str]:
        """A staff member in the database; returns their Authorization header."""
        user_id = user_id or str(uuid.uuid4())
        async with self.sessionmaker() as session:
            session.add(Staff(user_id=uuid.UUID(user_id), role=role, email=None))  # pyrefly: ignore[bad-argument-type]
            await session.commit()
        return self.auth(user_id)

    def auth(self, user_id: str, **claims: Any) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.tokens.mint(user_id, **claims)}"}

    async def bot_key(self, name: str = "bot") -> dict[str, str]:
        owner = self.auth(ENV_OWNER)
        response = await self.client.post("/api/v1/bot-keys", json={"name": name}, headers=owner)
        assert response.status_code == 201, response.text
        return {"Authorization": f"Bearer {response.json()['key']}"}


async def start_harness(
    database_url: str, jwks_url: str, tokens: Tokens, **overrides: Any
) -> AsyncIterator[Harness]:
    app = create_app(make_settings(database_url, jwks_url, **overrides))
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            yield Harness(app, client, tokens)


@pytest.fixture
async def harness(
    database_url: str, jwks_server: JWKSServer, tokens: Tokens
) -> AsyncIterator[Harness]:
    await clean_database(database_url)
    async for h in start_harness(database_url, jwks_server.url, tokens):
        yield h


@pytest.fixture
async def replica(
    harness: Harness, database_url: str, jwks_server: JWKSServer, tokens: Tokens
) -> AsyncIterator[Harness]:
    """A second app instance on the harness's database, as another replica would be. SQLite
    serves one process (`serve` refuses more workers), so there it is the harness itself."""
    if not database_url.startswith("postgresql"):
        yield harness
        return
    async for other in start_harness(database_url, jwks_server.url, tokens):
        yield other


@pytest.fixture(params=["up", "down"], ids=["read-url-up", "read-url-down"])
async def reader(
    request: pytest.FixtureRequest,
    harness: Harness,
    database_url: str,
    jwks_server: JWKSServer,
    tokens: Tokens,
) -> AsyncIterator[Harness]:
    """Another replica whose dashboard reads go to DATABASE_READ_URL: the harness's own
    server under a second URL ("up"), or an address that refuses connections ("down": the
    reads fall back to the primary). PostgreSQL only, as DATABASE_READ_URL is."""
    if not database_url.startswith("postgresql"):
        pytest.skip("DATABASE_READ_URL is a PostgreSQL replica's")
    read_url = database_url
    if request.param == "down":
        read_url = make_url(database_url).set(port=1).render_as_string(hide_password=False)
    async for other in start_harness(
        database_url, jwks_server.url, tokens, database_read_url=read_url
    ):
        yield other


@pytest.fixture
def purge(
    database_url: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> Callable[..., Awaitable[str]]:
    """`channelgate purge ARGS` in this process on the test database; returns what it printed."""

    async def run(*args: str) -> str:
        monkeypatch.chdir(tmp_path)  # no stray .env
        monkeypatch.setenv("DATABASE_URL", database_url)
        get_settings.cache_clear()
        try:
            await anyio.to_thread.run_sync(cli.main, ["purge", *args])
        finally:
            get_settings.cache_clear()
        return capsys.readouterr().out

    return run


@pytest.fixture
def network(harness: Harness) -> Network:
    """The harness app behind a network the test can break (client.py's and the bot's)."""
    return Network(harness.app)


@pytest.fixture
async def key(harness: Harness) -> str:
    """A bot key, bare, as a bot is configured with it."""
    return (await harness.bot_key())["Authorization"].removeprefix("Bearer ")


@pytest.fixture
def client(harness: Harness) -> httpx.AsyncClient:
    return harness.client


@pytest.fixture
def owner(harness: Harness) -> dict[str, str]:
    return harness.auth(ENV_OWNER)


@pytest.fixture
async def editor(harness: Harness) -> dict[str, str]:
    return await harness.add_staff("editor")


@pytest.fixture
async def viewer(harness: Harness) -> dict[str, str]:
    return await harness.add_staff("viewer")


@pytest.fixture
async def bot(harness: Harness) -> dict[str, str]:
    return await harness.bot_key()


def problem(response: httpx.Response, status: int) -> dict[str, Any]:
    """Assert a problem+json response with this status; return its body."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    body = response.json()
    assert body["status"] == status
    assert body["request_id"] == response.headers["x-request-id"]
    return body


ROOT = Path(__file__).resolve().parent.parent


# ---------------------------------------------------------------- tables and their checks


SAME = object()


def b64(value: Any) -> str:
    """Unpadded URL-safe base64 of these bytes, or of this value as JSON (cursors, tokens)."""
    raw = value if isinstance(value, bytes) else json.dumps(value).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def names_field(body: dict, *loc: Any) -> bool:
    """Whether one of a 422's `errors` is at `loc` (or under it)."""
    return any(e["loc"][: len(loc)] == list(loc) for e in body["errors"])


def case(field: str, value: Any, name: str | None = None) -> tuple[str, str, Any]:
    """A row of a table of refused values: (subtest label, field, value)."""
    return (f"{field}={name or repr(value)}", field, value)


def valid(
    field: str, value: Any, expected: Any = SAME, name: str | None = None
) -> tuple[str, str, Any, Any]:
    """A row of a table of accepted values: (subtest label, field, value, value as stored)."""
    return (f"{field}={name or repr(value)}", field, value, value if expected is SAME else expected)


async def audit_log(client: httpx.AsyncClient, owner: dict[str, str]) -> list[dict]:
    response = await client.get("/api/v1/audit", params={"limit": 200}, headers=owner)
    assert response.status_code == 200, response.text
    return response.json()["items"]
