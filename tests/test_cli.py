"""The `channelgate` command: in-process through `cli.main` (fast), and as a real process for what
only a process shows (exit status, stderr, the installed console script)."""

import contextlib
import json
import os
import re
import signal
import socket
import struct
import sys
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import httpx
import jwt
import pytest
from alembic.script import ScriptDirectory
from sqlalchemy import make_url, text
from sqlalchemy.ext.asyncio import create_async_engine

import cli
from auth import hash_key
from db import alembic_config
from settings import Settings, get_settings
from tests.conftest import (
    ENV_BOT_KEY,
    ENV_OWNER,
    HS_SECRET,
    ISSUER,
    ROOT,
    SUPABASE_URL,
    start_harness,
)
from tests.factories import VERIFICATIONS, event, eventually

pytestmark = pytest.mark.anyio

KEY_RE = re.compile(r"^cgk_[A-Za-z0-9_-]{43}$")
SETTING_NAMES = {name.upper() for name in Settings.model_fields}
POLICY = "/api/v1/bot/groups/-1001234567890/policy"


def foreign_setting(name: str) -> bool:
    name = name.upper()
    return name in SETTING_NAMES or name.startswith(("SUPABASE", "DATABASE"))


class Workdir:
    """An empty temp dir as cwd (so no .env is read unless a test writes one), a fresh SQLite
    file as DATABASE_URL, and no other channelgate setting from the caller's environment."""

    def __init__(self, path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        self.path = path
        self.monkeypatch = monkeypatch
        self.db_url = f"sqlite+aiosqlite:///{path / 'cli.db'}"
        self.env = {k: v for k, v in os.environ.items() if not foreign_setting(k)}
        self.env.update(DATABASE_URL=self.db_url, AUTO_MIGRATE="true", LOG_LEVEL="warning")

    def setenv(self, **values: str) -> None:
        for name, value in values.items():
            self.monkeypatch.setenv(name, value)
        get_settings.cache_clear()

    async def main(self, *args: str, **env: str) -> None:
        """`channelgate ARGS` in this process (in a thread: the command runs its own loop)."""
        self.setenv(**env)
        await anyio.to_thread.run_sync(cli.main, list(args))

    async def refused(self, *args: str, **env: str) -> str:
        with pytest.raises(SystemExit) as exit_info:
            await self.main(*args, **env)
        assert isinstance(exit_info.value.code, str)
        return exit_info.value.code

    async def process(self, *args: str, **env: str) -> tuple[int, str, str]:
        """`python -m cli ARGS` as a real process."""
        result = await anyio.run_process(
            [sys.executable, "-m", "cli", *args],
            cwd=self.path,
            env={**self.env, "PYTHONPATH": str(ROOT), **env},
            check=False,
        )
        return result.returncode, result.stdout.decode(), result.stderr.decode()

    async def query(self, sql: str) -> list[Any]:
        engine = create_async_engine(self.db_url)
        try:
            async with engine.connect() as connection:
                return list((await connection.execute(text(sql))).all())
        finally:
            await engine.dispose()


@pytest.fixture
def work(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Workdir]:
    for name in list(os.environ):
        if foreign_setting(name):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)
    workdir = Workdir(tmp_path, monkeypatch)
    workdir.setenv(DATABASE_URL=workdir.db_url, AUTO_MIGRATE="true", LOG_LEVEL="warning")
    yield workdir
    get_settings.cache_clear()


async def test_migrate_as_a_process_then_again_in_process(work: Workdir, capsys):
    status, out, err = await work.process("migrate")
    assert status == 0, err
    assert out == "database is at the latest schema\n"
    await work.main("migrate")  # idempotent
    assert capsys.readouterr().out == "database is at the latest schema\n"
    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    assert await work.query("SELECT version_num FROM alembic_version") == [(head,)]
    tables = {row[0] for row in await work.query("SELECT name FROM sqlite_master")}
    assert {"groups", "channels", "staff", "bot_keys", "audit_log"} <= tables


async def test_migrate_accepts_a_postgres_url(work: Workdir, database_url: str, capsys):
    if not database_url.startswith("postgresql"):
        pytest.skip("PostgreSQL only")
    plain = "postgres://" + database_url.removeprefix("postgresql+asyncpg://")
    await work.main("migrate", DATABASE_URL=plain)  # the Heroku/Supabase-style URL form
    assert capsys.readouterr().out == "database is at the latest schema\n"


async def test_create_bot_key_prints_a_working_key(work: Workdir, capsys, jwks_server, tokens):
    await work.main("create-bot-key", " fleet-1 ")
    captured = capsys.readouterr()
    key = captured.out.strip()
    assert captured.out == key + "\n" and KEY_RE.fullmatch(key), captured.out
    assert "shown once" in captured.err and key not in captured.err
    rows = await work.query("SELECT name, prefix, key_hash, revoked_at FROM bot_keys")
    assert rows == [("fleet-1", key[:12], hash_key(key), None)]
    audit = await work.query("SELECT action, actor_id, after FROM audit_log")
    assert [(action, actor) for action, actor, _ in audit] == [("bot_key.create", "cli")]
    assert key not in str(audit) and hash_key(key) not in str(audit)

    async for harness in start_harness(work.db_url, jwks_server.url, tokens):
        response = await harness.client.get(POLICY, headers={"Authorization": f"Bearer {key}"})
        assert response.status_code == 404, response.text  # authenticated; the group is unknown


async def test_create_bot_key_rejects_bad_names(work: Workdir):
    for name in ("", "   ", "x" * 65):
        message = await work.refused("create-bot-key", name)
        assert message == "channelgate: the key name must be 1 to 64 characters"
    assert not (work.path / "cli.db").exists()


async def test_dev_token_needs_a_secret(work: Workdir):
    status, out, err = await work.process("dev-token", "--role", "editor")
    assert status != 0 and out == ""
    assert err == "channelgate: dev-token needs SUPABASE_JWT_SECRET (set it in .env)\n"
    assert not (work.path / "cli.db").exists()


async def test_dev_token_refuses_in_production(work: Workdir):
    message = await work.refused(
        "dev-token", "--role", "editor", SUPABASE_JWT_SECRET=HS_SECRET, ENVIRONMENT="production"
    )
    assert message == "channelgate: dev-token is for local use; refusing in production"
    assert not (work.path / "cli.db").exists()


async def test_dev_token_mints_a_token_for_new_staff(work: Workdir, capsys, jwks_server, tokens):
    # The secret comes from ./.env, as the refusal message tells developers to do.
    (work.path / ".env").write_text(f"SUPABASE_JWT_SECRET={HS_SECRET}\n")
    user_id = str(uuid.uuid4())
    args = ["dev-token", "--role", "editor", "--user-id", user_id, "--email", "dev@example.com"]
    await work.main(*args, SUPABASE_URL=SUPABASE_URL)
    captured = capsys.readouterr()
    token = captured.out.strip()
    assert captured.out == token + "\n" and user_id in captured.err
    claims = jwt.decode(
        token, HS_SECRET, algorithms=["HS256"], audience="authenticated", issuer=ISSUER
    )
    assert claims["sub"] == user_id and claims["role"] == "authenticated"
    assert claims["email"] == "dev@example.com" and claims["exp"] > claims["iat"]
    assert await work.query("SELECT role, email FROM staff") == [("editor", "dev@example.com")]

    async for harness in start_harness(work.db_url, jwks_server.url, tokens):
        me = await harness.client.get("/api/v1/me", headers={"Authorization": f"Bearer {token}"})
        assert me.status_code == 200, me.text
        assert me.json()["user_id"] == user_id and me.json()["role"] == "editor"

    await work.main("dev-token", "--role", "viewer", "--user-id", user_id)  # changes the role
    assert await work.query("SELECT role, email FROM staff") == [("viewer", "dev@example.com")]


async def test_dev_token_defaults_to_a_new_user_and_the_local_issuer(work: Workdir, capsys):
    await work.main("dev-token", "--role", "viewer", SUPABASE_JWT_SECRET=HS_SECRET)
    claims = jwt.decode(
        capsys.readouterr().out.strip(),
        HS_SECRET,
        algorithms=["HS256"],
        audience="authenticated",
        issuer="http://127.0.0.1:54321/auth/v1",  # what a local `supabase start` issues
    )
    ((stored_id, role),) = await work.query("SELECT user_id, role FROM staff")
    assert uuid.UUID(str(stored_id)) == uuid.UUID(claims["sub"]) and role == "viewer"


async def test_configuration_errors_are_one_line(work: Workdir):
    status, out, err = await work.process("migrate", BOT_API_KEYS="broken")
    assert status != 0 and out == ""
    assert err.startswith("channelgate: configuration error:") and err.count("\n") == 1
    assert "BOT_API_KEYS" in err


async def test_installed_console_script(work: Workdir):
    script = Path(sys.executable).with_name("channelgate")
    if not script.exists():
        pytest.skip("the channelgate console script is not installed in this environment")
    # Without PYTHONPATH, as a user runs it: the installed package must carry every module.
    env = {k: v for k, v in work.env.items() if k != "PYTHONPATH"}
    result = await anyio.run_process([str(script), "migrate"], cwd=work.path, env=env, check=False)
    assert result.returncode == 0, result.stderr.decode()
    assert result.stdout.decode() == "database is at the latest schema\n"
    # What `serve` imports, from outside the tree: every module must be installed.
    imports = [sys.executable, "-c", "import app; app.create_app()"]
    result = await anyio.run_process(imports, cwd=work.path, env=env, check=False)
    assert result.returncode == 0, result.stderr.decode()


# ---------------------------------------------------------------- failing like a tool


@pytest.mark.parametrize(
    ("args", "env", "says"),
    [
        (["purge", "--batch", "0"], {}, "argument --batch: 0 is out of range (1 to 1000000)"),
        (["purge", "--days", "0"], {}, "argument --days: 0 is out of range (1 to 3650)"),
        (["seed-demo", "--events", "-5"], {}, "argument --events: -5 is out of range"),
        (["seed-demo", "--groups", "x"], {}, "argument --groups: 'x' is not an integer"),
        (["serve", "--workers", "2"], {}, "SQLite serves one worker"),
        (
            ["migrate"],
            {"DATABASE_URL": "postgresql://postgres@127.0.0.1:1/nowhere"},
            "channelgate: the database is unreachable or unavailable:",
        ),
        (
            ["purge"],
            {"AUTO_MIGRATE": "false"},
            "channelgate: the database has no channelgate schema",
        ),
        (
            ["create-bot-key", "ci"],
            {"AUTO_MIGRATE": "false"},
            "run `channelgate migrate`",
        ),
    ],
    ids=[
        "batch-0",
        "days-0",
        "negative-events",
        "not-a-number",
        "sqlite-workers",
        "unreachable",
        "no-schema",
        "no-schema-key",
    ],
)
async def test_failures_are_one_line_and_a_nonzero_exit(
    work: Workdir, args: list[str], env: dict[str, str], says: str
):
    status, out, err = await work.process(*args, **env)
    assert status != 0 and out == ""
    *usage, last = err.strip().splitlines()  # argparse shows its usage first
    assert says in last and "Traceback" not in err
    assert all(line.startswith(("usage:", " ")) for line in usage), err


async def test_version_and_help(work: Workdir):
    status, out, _ = await work.process("--version")
    assert status == 0 and re.fullmatch(r"channelgate \d+\.\d+\.\d+\n", out), out
    status, out, _ = await work.process("serve", "--help")
    assert status == 0
    assert "(default: 8000)" in out and "(default: 10)" in out  # port, drain seconds
    for name in ("DATABASE_URL", "DATABASE_POOL_MODE", "SUPABASE_JWT_SECRET", "BOT_API_KEYS"):
        assert name in out


# ---------------------------------------------------------------- serve: workers, logs, SIGTERM


@pytest.fixture
async def fresh_pg(database_url: str) -> AsyncIterator[str]:
    """A PostgreSQL database of this test's own, never migrated."""
    if not database_url.startswith("postgresql"):
        pytest.skip("several workers need PostgreSQL")
    name = f"cg_serve_{uuid.uuid4().hex[:10]}"
    admin = create_async_engine(database_url, isolation_level="AUTOCOMMIT")
    async with admin.connect() as connection:
        await connection.execute(text(f"CREATE DATABASE {name}"))
    try:
        yield make_url(database_url).set(database=name).render_as_string(False)
    finally:
        async with admin.connect() as connection:
            await connection.execute(text(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
        await admin.dispose()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Served:
    """`channelgate serve` as a real process on a free port, ready; its stderr afterwards."""

    def __init__(self, process: Any, port: int) -> None:
        self.process = process
        self.port = port
        self.base = f"http://127.0.0.1:{port}"

    async def records(self) -> list[dict[str, Any]]:
        """Its JSON log lines (the process has ended)."""
        assert self.process.stderr is not None
        err = (await self.process.stderr.receive(1 << 20)).decode()
        return [json.loads(line) for line in err.splitlines() if line.strip()]


@asynccontextmanager
async def serving(work: Workdir, *args: str, **env: str) -> AsyncIterator[Served]:
    port = free_port()
    env = {
        **work.env,
        "PYTHONPATH": str(ROOT),
        "LOG_LEVEL": "info",
        "SUPABASE_JWT_SECRET": HS_SECRET,
        "SUPABASE_URL": SUPABASE_URL,
        "OWNER_USER_IDS": ENV_OWNER,
        **env,
    }
    command = [sys.executable, "-m", "cli", "serve", "--port", str(port), *args]
    # A session of its own: the cleanup kills the workers too (Granian forks them, and a
    # killed supervisor leaves them running).
    process = await anyio.open_process(command, cwd=work.path, env=env, start_new_session=True)
    served = Served(process, port)
    try:
        async with httpx.AsyncClient(base_url=served.base, timeout=10) as client:

            async def ready() -> bool:
                try:
                    return (await client.get("/readyz")).status_code in (200, 429)
                except httpx.TransportError:
                    return False

            await eventually(ready, timeout=60, interval=0.2)
        yield served
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        await process.aclose()


@pytest.mark.parametrize("server", cli.SERVERS)
async def test_serve_two_workers_migrates_once_logs_json_and_drains_on_sigterm(
    work: Workdir, fresh_pg: str, tokens: Any, server: str
):
    args = ["--workers", "2", "--drain-seconds", "5", "--server", server]
    owner = {"Authorization": f"Bearer {tokens.mint(ENV_OWNER, alg='HS256')}"}
    async with serving(work, *args, DATABASE_URL=fresh_pg, AUTO_MIGRATE="true") as served:
        process = served.process
        async with httpx.AsyncClient(base_url=served.base, timeout=10) as client:
            listed = await client.get("/api/v1/groups", headers={**owner, "X-Request-ID": "r-1"})
            assert listed.status_code == 200
            assert listed.headers["x-request-id"] == "r-1"

            # A client sends its whole body before it reads: over the limit, declared or
            # streamed (chunked), or to no route at all, it gets its answer, never a reset.
            async def chunks() -> AsyncIterator[bytes]:
                for _ in range(48):
                    yield b" " * 65536

            json_ = {"Content-Type": "application/json"}
            for path, body, headers, status in [
                ("/api/v1/groups", b"[" + b" " * (3 << 20) + b"]", json_, 413),
                ("/api/v1/groups", chunks(), {**json_, **owner}, 413),
                ("/api/v1/nowhere", chunks(), json_, 404),
            ]:
                answer = await client.post(path, content=body, headers=headers)
                assert answer.status_code == status, answer.text
            async with client.stream("GET", "/api/v1/events", headers=owner) as stream:
                lines = stream.aiter_lines()
                assert await anext(lines) == "retry: 3000"
                process.send_signal(signal.SIGTERM)
                rest = [line async for line in lines]  # ends: no half-read chunk, no error
            assert all(line in ("", ": ping") for line in rest), rest
        with anyio.fail_after(20):
            status = await process.wait()
        assert status == 0
        records = await served.records()
    server_logger = {"uvicorn": "uvicorn.error", "granian": "_granian"}[server]
    assert {r["logger"] for r in records} >= {server_logger, "channelgate"}
    assert any(r.get("path") == "/api/v1/groups" for r in records)  # the access log
    assert all(re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", r["ts"]) for r in records)
    assert any("token checks: " in r["msg"] for r in records)
    # One migration before the workers started: one alembic_version row, the head.
    engine = create_async_engine(fresh_pg)
    async with engine.connect() as connection:
        revisions = (
            await connection.execute(text("SELECT version_num FROM alembic_version"))
        ).all()
    await engine.dispose()
    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    assert revisions == [(head,)]


def stalled(port: int, path: str, token: str) -> socket.socket:
    """A GET whose client reads the status line, then nothing: a 4 KiB receive buffer lets
    little more than that into the client's kernel, so a long answer backs up the server."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.settimeout(10)
    sock.connect(("127.0.0.1", port))
    request = f"GET {path} HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer {token}\r\n\r\n"
    sock.sendall(request.encode())
    assert sock.recv(12) == b"HTTP/1.1 200", path
    return sock


def cut(sock: socket.socket) -> None:
    """Go away as a crashed client does: a reset, not a polite close."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


@pytest.mark.parametrize("server", cli.SERVERS)
async def test_served_streams_end_when_their_client_goes_away_and_proxies_are_trusted(
    work: Workdir, tokens: Any, server: str
):
    """Under either server: an export or a live feed whose client vanished gives its slot back
    at once (not after the export's 30 s stall limit), and X-Forwarded-For from the trusted
    local proxy is the caller's address (the anonymous rate limit counts it)."""
    token = tokens.mint(ENV_OWNER, alg="HS256")
    owner = {"Authorization": f"Bearer {token}"}
    limits = {"RATE_LIMIT_ANONYMOUS": "3/minute", "BOT_API_KEYS": f"envbot:{ENV_BOT_KEY}"}
    async with (
        serving(work, "--server", server, **limits) as served,
        httpx.AsyncClient(base_url=served.base, timeout=10) as client,
    ):
        proxied = [
            (await client.get("/healthz", headers={"X-Forwarded-For": address})).status_code
            for address in ["203.0.113.7"] * 4 + ["203.0.113.8"]
        ]
        assert proxied == [200, 200, 200, 429, 200]

        # A CSV of ~7 MB: more than both sockets buffer (the server's send buffer grows up
        # to net.ipv4.tcp_wmem's 4 MiB), so a stalled client holds its export.
        rows = 20_000
        bot = {"Authorization": f"Bearer {ENV_BOT_KEY}"}
        for start in range(0, rows, 1000):
            batch = [
                event(user_id=start + n + 1, result="error", error="e" * 200) for n in range(1000)
            ]
            response = await client.post(VERIFICATIONS, json={"events": batch}, headers=bot)
            assert response.status_code == 200, response.text
        export = "/api/v1/verifications/export"
        first, second = stalled(served.port, export, token), stalled(served.port, export, token)
        await anyio.sleep(1)  # long enough to end an export that is not backed up
        assert (await client.get(export, headers=owner)).status_code == 429  # both held
        cut(second)

        async def exported() -> bool:
            response = await client.get(export, headers=owner)
            return response.status_code == 200 and response.text.count("\n") == rows + 1

        await eventually(exported, timeout=10, interval=0.2)
        cut(first)

        feeds = [stalled(served.port, "/api/v1/events", token) for _ in range(5)]
        assert (await client.get("/api/v1/events", headers=owner)).status_code == 429
        for feed in feeds:
            cut(feed)

        async def subscribed() -> bool:
            async with client.stream("GET", "/api/v1/events", headers=owner) as response:
                return response.status_code == 200

        await eventually(subscribed, timeout=10, interval=0.2)


async def test_serve_granian_without_the_extra_is_one_line(work: Workdir, monkeypatch):
    """Chosen by flag or by CHANNELGATE_SERVER: a missing granian is a one-line refusal."""
    monkeypatch.setattr(cli, "granian_installed", lambda: False)
    refused = await work.refused("serve", "--server", "granian")
    assert "pip install 'channelgate[granian]'" in refused
    assert refused == await work.refused("serve", CHANNELGATE_SERVER="granian")
    assert "one of uvicorn, granian" in await work.refused("serve", CHANNELGATE_SERVER="gunicorn")


def test_the_package_carries_every_module():
    """Every top-level module is in pyproject's py-modules: the installed console script
    imports only those (a module left out works in the tests, which run from the tree, and
    fails for a user)."""
    import tomllib

    listed = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    modules = {path.stem for path in ROOT.glob("*.py")}
    assert set(listed["py-modules"]) == modules
