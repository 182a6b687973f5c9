"""The `channelgate` command: in-process through `cli.main` (fast), and as a real process for what
only a process shows (exit status, stderr, the installed console script)."""

import os
import re
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import jwt
import pytest
from alembic.script import ScriptDirectory
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine

import cli
from auth import hash_key
from db import alembic_config
from settings import Settings, get_settings
from tests.conftest import HS_SECRET, ISSUER, ROOT, SUPABASE_URL, start_harness

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
