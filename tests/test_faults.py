"""Database faults, for real, on PostgreSQL: the service reaches its database through a TCP proxy
of the test's own that refuses, partitions (holds every socket open and moves no byte) and
resets; backends are terminated under load; the LISTEN link of one replica stalls; and the
whole service runs through a real PgBouncer in transaction mode. Whatever happens, an answer
is a success or a 503 (never a 500), and every event the service acknowledged is stored."""

import asyncio
import itertools
import os
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from datetime import UTC, datetime, timedelta
from ipaddress import ip_address
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from sqlalchemy import make_url, text
from sqlalchemy.ext.asyncio import create_async_engine
from sqlmodel import select

from models import Channel, Group, GroupChannel
from tests.conftest import (
    DEPLOYED_TIMEOUTS,
    ENV_OWNER,
    Harness,
    JWKSServer,
    Tokens,
    clean_database,
    start_harness,
)
from tests.factories import (
    CHANNEL_ID,
    GROUP_ID,
    GROUPS,
    VERIFICATIONS,
    create_channel,
    event,
    eventually,
    group_body,
    link,
    listening,
    register_group,
)

pytestmark = pytest.mark.anyio
replica = asynccontextmanager(start_harness)
POLICY = f"/api/v1/bot/groups/{GROUP_ID}/policy"


@pytest.fixture
def pg_url(database_url: str) -> str:
    if not database_url.startswith("postgresql"):
        pytest.skip("database faults are PostgreSQL's (set TEST_DATABASE_URL)")
    return database_url


# ---------------------------------------------------------------- the proxy


class Proxy:
    """127.0.0.1:<port> -> PostgreSQL, breakable: `refuse()` closes the port and resets every
    link, `partition()` keeps every socket open but moves no byte either way (new connections
    are accepted and then hear nothing), `heal()` brings it all back: bytes held during a
    partition then flow, as TCP's retransmissions would deliver them."""

    def __init__(self, target: str) -> None:
        url = make_url(target)
        self.target = (url.host or "127.0.0.1", url.port or 5432)
        self.url_of = lambda port: url.set(host="127.0.0.1", port=port).render_as_string(False)
        self.flowing = asyncio.Event()
        self.flowing.set()
        self.links: set[asyncio.StreamWriter] = set()
        self.server: asyncio.Server | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return self.url_of(self.port)

    async def start(self) -> None:
        self.server = await asyncio.start_server(
            self.accept, "127.0.0.1", self.port, reuse_address=True
        )
        self.port = self.server.sockets[0].getsockname()[1]

    async def accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.links.add(writer)
        try:
            await self.flowing.wait()
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.close()
            return
        self.links.add(up_writer)
        await asyncio.gather(self.pipe(reader, up_writer), self.pipe(up_reader, writer))

    async def pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                await self.flowing.wait()
                writer.write(data)
                await writer.drain()
        except OSError:
            pass
        finally:
            self.links.discard(writer)
            writer.close()

    def reset(self) -> None:
        """Every open link dies at once (RST), as when a server or a NAT forgets them."""
        for writer in list(self.links):
            transport = writer.transport
            sock = transport.get_extra_info("socket")
            if sock is not None:  # SO_LINGER 0: close() sends RST, not FIN
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\0\0\0\0\0\0\0")
            transport.abort()
        self.links.clear()

    async def refuse(self) -> None:
        assert self.server is not None
        self.server.close()
        self.reset()
        await self.server.wait_closed()

    def partition(self) -> None:
        self.flowing.clear()

    async def heal(self) -> None:
        self.flowing.set()
        if self.server is None or not self.server.is_serving():
            await self.start()

    async def close(self) -> None:
        self.flowing.set()
        if self.server is not None:
            self.server.close()
        self.reset()


@pytest.fixture
async def proxy(pg_url: str) -> AsyncIterator[Proxy]:
    proxy = Proxy(pg_url)
    await proxy.start()
    yield proxy
    await proxy.close()


@pytest.fixture
async def proxied(
    pg_url: str, proxy: Proxy, jwks_server: JWKSServer, tokens: Tokens
) -> AsyncIterator[Harness]:
    """The app with every database connection, LISTEN included, through the proxy; the
    default timeouts (what a deployment gets)."""
    await clean_database(pg_url)
    async with replica(proxy.url, jwks_server.url, tokens, **DEPLOYED_TIMEOUTS) as harness:
        await listening(harness)
        yield harness


async def count_events(url: str, event_ids: list[str]) -> int:
    engine = create_async_engine(url)
    async with engine.connect() as connection:
        stored = await connection.scalar(
            text("SELECT count(*) FROM verifications WHERE event_id = ANY(CAST(:ids AS uuid[]))"),
            {"ids": event_ids},
        )
    await engine.dispose()
    return stored or 0


def assert_503(response: httpx.Response) -> None:
    assert response.status_code == 503, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    assert int(response.headers["retry-after"]) > 0


class Calls:
    """A few requests of every kind the service answers from the database: a policy that is
    not cached, a dashboard list, a write, an ingestion batch. `acked` holds the ids of every
    event the service said it stored."""

    def __init__(self, harness: Harness, bot: dict[str, str]) -> None:
        self.harness = harness
        self.bot = bot
        self.owner = harness.auth(ENV_OWNER)
        self.acked: list[str] = []
        self.chat_ids = itertools.count(-1009000000000, -1)

    async def all(self) -> list[httpx.Response]:
        client = self.harness.client
        self.harness.services.policies.clear()
        batch = [event(user_id=n) for n in range(1, 51)]
        responses = await asyncio.gather(
            client.get(POLICY, headers=self.bot),
            client.get(GROUPS, headers=self.owner),
            client.post(GROUPS, json=group_body(next(self.chat_ids)), headers=self.owner),
            client.post(VERIFICATIONS, json={"events": batch}, headers=self.bot),
        )
        if responses[-1].status_code == 200:
            self.acked += [e["event_id"] for e in batch]
        return list(responses)


@pytest.fixture
async def calls(proxied: Harness) -> Calls:
    """The calls, once they all succeed through the proxy."""
    bot = await proxied.bot_key()
    await register_group(proxied.client, bot)
    calls = Calls(proxied, bot)
    assert all(r.is_success for r in await calls.all())
    return calls


async def all_503(calls: Calls) -> float:
    """Every kind of call answers 503 (problem+json, Retry-After); how long that took."""
    started = time.monotonic()
    for response in await calls.all():
        assert_503(response)
    return time.monotonic() - started


async def recovered(calls: Calls, within: float) -> None:
    """Every kind of request succeeds again within `within` seconds, without a restart."""

    async def all_succeed() -> bool:
        return all(r.is_success for r in await calls.all())

    await eventually(all_succeed, timeout=within, interval=0.2)


# ---------------------------------------------------------------- refused, partitioned


async def test_refused_connections_are_503_at_once_and_recover(calls: Calls, proxy: Proxy):
    await proxy.refuse()
    seconds = await all_503(calls)
    assert seconds < 1.5, f"503s took {seconds:.2f}s"
    await proxy.heal()
    await recovered(calls, within=5)
    assert await count_events(proxy.url, calls.acked) == len(calls.acked)


async def test_a_silent_partition_is_503_within_10s_and_recovers_within_5s(
    proxied: Harness, proxy: Proxy, calls: Calls
):
    proxy.partition()
    seconds = await all_503(calls)
    assert seconds < 10, f"503s took {seconds:.2f}s"
    # The LISTEN link notices too, and readiness says so.
    assert (await proxied.client.get("/readyz")).status_code == 503
    await proxy.heal()
    healed = time.monotonic()
    await recovered(calls, within=5)
    assert time.monotonic() - healed < 5
    await eventually(lambda: proxied.client.get("/readyz"), timeout=10)
    await eventually(lambda: proxied.services.db.listener.linked.is_set(), timeout=10)  # pyrefly: ignore[missing-attribute]
    assert await count_events(proxy.url, calls.acked) == len(calls.acked)


async def test_links_reset_mid_request_are_503_and_nothing_acknowledged_is_lost(
    proxied: Harness, proxy: Proxy
):
    bot = await proxied.bot_key()
    await register_group(proxied.client, bot)
    calls = Calls(proxied, bot)
    statuses: Counter[int] = Counter()
    deadline = time.monotonic() + 4

    async def load() -> None:
        while time.monotonic() < deadline:
            statuses.update(r.status_code for r in await calls.all())

    async def resets() -> None:
        while time.monotonic() < deadline:
            await asyncio.sleep(0.3)
            proxy.reset()

    await asyncio.gather(load(), load(), resets())
    assert set(statuses) <= {200, 201, 503}, statuses
    assert statuses[503] > 0 and statuses[200] > 0, statuses
    assert await count_events(proxy.url, calls.acked) == len(calls.acked)


# ---------------------------------------------------------------- backends terminated


async def test_terminated_backends_under_load_are_503_never_500(harness: Harness, pg_url: str):
    """What a restart or a failover does to running queries: pg_terminate_backend on every
    channelgate backend, again and again, while bots and staff keep calling."""
    bot = await harness.bot_key()
    await register_group(harness.client, bot)
    calls = Calls(harness, bot)
    statuses: Counter[int] = Counter()
    deadline = time.monotonic() + 5
    engine = create_async_engine(pg_url)
    killed = 0

    async def load() -> None:
        while time.monotonic() < deadline:
            statuses.update(r.status_code for r in await calls.all())

    async def terminate() -> None:
        nonlocal killed
        async with engine.connect() as connection:
            while time.monotonic() < deadline:
                await asyncio.sleep(0.15)
                killed += len(
                    (
                        await connection.execute(
                            text(
                                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                                " WHERE datname = current_database()"
                                " AND application_name LIKE 'channelgate%'"
                            )
                        )
                    ).all()
                )
                await connection.commit()

    try:
        await asyncio.gather(load(), load(), load(), terminate())
    finally:
        await engine.dispose()
    assert killed > 10
    assert set(statuses) <= {200, 201, 503}, statuses
    assert statuses[200] > 0 and statuses[503] > 0, statuses
    await recovered(calls, within=5)
    assert await count_events(pg_url, calls.acked) == len(calls.acked)


# ---------------------------------------------------------------- transient conflicts


@pytest.fixture
async def conflicts(harness: Harness, pg_url: str) -> AsyncIterator[Any]:
    """A trigger (counting down a sequence) that fails the next N group inserts with a real
    serialization failure (SQLSTATE 40001), raised by PostgreSQL in the request's own
    transaction."""
    engine = create_async_engine(pg_url)
    suffix = uuid.uuid4().hex[:8]
    sequence, function = f"cg_conflicts_{suffix}", f"cg_conflict_{suffix}"

    async def fail_next(n: int) -> None:
        async with engine.begin() as connection:
            await connection.execute(text(f"SELECT setval('{sequence}', {n}, false)"))

    async with engine.begin() as connection:
        await connection.execute(
            text(f"CREATE SEQUENCE {sequence} INCREMENT -1 MINVALUE -1000000 MAXVALUE 1000000")
        )
        await connection.execute(
            text(
                f"CREATE FUNCTION {function}() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN"
                f" IF nextval('{sequence}') > 0 THEN RAISE EXCEPTION 'injected conflict'"
                " USING ERRCODE = '40001'; END IF; RETURN NEW; END $$"
            )
        )
        await connection.execute(
            text(
                f"CREATE TRIGGER {function} BEFORE INSERT ON groups FOR EACH ROW"
                f" EXECUTE FUNCTION {function}()"
            )
        )
    await fail_next(0)
    try:
        yield fail_next
    finally:
        async with engine.begin() as connection:
            await connection.execute(text(f"DROP TRIGGER {function} ON groups"))
            await connection.execute(text(f"DROP FUNCTION {function}()"))
            await connection.execute(text(f"DROP SEQUENCE {sequence}"))
        await engine.dispose()


async def test_serialization_failures_are_replayed_then_503(
    harness: Harness, conflicts: Any, owner
):
    client = harness.client
    await conflicts(2)  # fails twice, then the third attempt commits: the body is replayed
    response = await client.post(GROUPS, json=group_body(), headers=owner)
    assert response.status_code == 201, response.text
    assert response.json()["chat_id"] == GROUP_ID
    await conflicts(100)  # conflicts that do not clear: a 503 after the replays, never a 500
    assert_503(await client.post(GROUPS, json=group_body(GROUP_ID - 1), headers=owner))
    listed = (await client.get(GROUPS, headers=owner)).json()["items"]
    assert [g["chat_id"] for g in listed] == [GROUP_ID]


# ---------------------------------------------------------------- server-side timeouts


@pytest.fixture
async def quick(pg_url: str, jwks_server: JWKSServer, tokens: Tokens) -> AsyncIterator[Harness]:
    """The app with short server-side timeouts (the defaults are 4 s and 2 s)."""
    await clean_database(pg_url)
    async with replica(
        pg_url,
        jwks_server.url,
        tokens,
        database_statement_timeout=0.5,
        database_lock_timeout=0.3,
        database_command_timeout=3,
    ) as harness:
        yield harness


async def test_slow_statements_and_lock_waits_are_cut_and_answer_503(quick: Harness, pg_url: str):
    client, owner = quick.client, quick.auth(ENV_OWNER)
    async with quick.sessionmaker() as session:
        settings = [
            await session.scalar(text(f"SHOW {name}"))
            for name in ("statement_timeout", "lock_timeout")
        ]
    assert settings == ["500ms", "300ms"]
    await client.post(GROUPS, json=group_body(), headers=owner)
    engine = create_async_engine(pg_url)
    try:
        async with engine.connect() as other:  # another writer holds the group's row
            await other.execute(
                text("SELECT id FROM groups WHERE chat_id = :id FOR UPDATE"), {"id": GROUP_ID}
            )
            started = time.monotonic()
            patch = {"title": "waits for the lock"}
            assert_503(await client.patch(f"{GROUPS}/{GROUP_ID}", json=patch, headers=owner))
            assert time.monotonic() - started < 2
            await other.rollback()
        renamed = await client.patch(f"{GROUPS}/{GROUP_ID}", json={"title": "now"}, headers=owner)
        assert renamed.status_code == 200
        async with engine.begin() as connection:  # every new group now takes 10 s to insert
            await connection.execute(
                text(
                    "CREATE FUNCTION cg_slow() RETURNS trigger LANGUAGE plpgsql AS"
                    " $$ BEGIN PERFORM pg_sleep(10); RETURN NEW; END $$"
                )
            )
            await connection.execute(
                text(
                    "CREATE TRIGGER cg_slow BEFORE INSERT ON groups FOR EACH ROW"
                    " EXECUTE FUNCTION cg_slow()"
                )
            )
        try:
            started = time.monotonic()
            assert_503(await client.post(GROUPS, json=group_body(GROUP_ID - 1), headers=owner))
            assert time.monotonic() - started < 2
        finally:
            async with engine.begin() as connection:
                await connection.execute(text("DROP TRIGGER cg_slow ON groups"))
                await connection.execute(text("DROP FUNCTION cg_slow()"))
    finally:
        await engine.dispose()
    listed = (await client.get(GROUPS, headers=owner)).json()["items"]
    assert [(g["chat_id"], g["title"]) for g in listed] == [(GROUP_ID, "now")]


# ---------------------------------------------------------------- two replicas, the LISTEN link


async def test_changes_and_revocations_reach_the_other_replica_within_a_second(
    harness: Harness, pg_url: str, jwks_server: JWKSServer, tokens: Tokens, editor
):
    bot = await harness.bot_key()
    await register_group(harness.client, bot)
    async with replica(pg_url, jwks_server.url, tokens) as other:
        await listening(harness, other)
        assert (await other.client.get(POLICY, headers=bot)).json()["mode"] == "all"
        started = time.monotonic()
        await harness.client.patch(f"{GROUPS}/{GROUP_ID}", json={"mode": "any"}, headers=editor)

        async def sees_any() -> bool:
            return (await other.client.get(POLICY, headers=bot)).json()["mode"] == "any"

        await eventually(sees_any, timeout=1)
        policy_seconds = time.monotonic() - started

        key_id = await harness.client.get("/api/v1/bot-keys", headers=harness.auth(ENV_OWNER))
        key = key_id.json()["items"][0]["id"]
        assert (await other.client.get(POLICY, headers=bot)).status_code == 200  # cached there
        started = time.monotonic()
        revoked = await harness.client.delete(
            f"/api/v1/bot-keys/{key}", headers=harness.auth(ENV_OWNER)
        )
        assert revoked.status_code == 204

        async def dead() -> bool:
            return (await other.client.get(POLICY, headers=bot)).status_code == 401

        await eventually(dead, timeout=1)
        print(f"policy change {policy_seconds:.3f}s, revocation {time.monotonic() - started:.3f}s")


async def test_a_stalled_listen_link_is_noticed_bounded_and_relinked(
    harness: Harness,
    pg_url: str,
    proxy: Proxy,
    jwks_server: JWKSServer,
    tokens: Tokens,
    editor,
):
    """The other replica's queries go straight to PostgreSQL; only its LISTEN link runs
    through the proxy, which then stalls (a 45 s stall killed the old listener for good)."""
    bot = await harness.bot_key()
    await register_group(harness.client, bot)
    async with replica(
        pg_url, jwks_server.url, tokens, database_listen_url=proxy.url, **DEPLOYED_TIMEOUTS
    ) as other:
        await listening(harness, other)
        listener = other.services.db.listener
        assert listener is not None
        assert (await other.client.get(POLICY, headers=bot)).json()["mode"] == "all"
        proxy.partition()
        await eventually(lambda: not listener.linked.is_set(), timeout=10)
        ready = await other.client.get("/readyz")
        assert ready.status_code == 503 and "LISTEN" in ready.json()["detail"]
        # Unlinked, it cannot hear the change, but trusts its cache for a second at most.
        await harness.client.patch(f"{GROUPS}/{GROUP_ID}", json={"mode": "any"}, headers=editor)
        started = time.monotonic()

        async def sees_any() -> bool:
            return (await other.client.get(POLICY, headers=bot)).json()["mode"] == "any"

        await eventually(sees_any, timeout=2)
        assert time.monotonic() - started < 1.5
        await proxy.heal()
        await eventually(listener.linked.is_set, timeout=10)
        assert (await other.client.get("/readyz")).status_code == 200
        # Linked again: changes arrive by NOTIFY once more.
        await harness.client.patch(f"{GROUPS}/{GROUP_ID}", json={"mode": "all"}, headers=editor)

        async def sees_all() -> bool:
            return (await other.client.get(POLICY, headers=bot)).json()["mode"] == "all"

        await eventually(sees_all, timeout=1)


async def test_a_change_to_a_channel_in_600_groups_notifies_in_chunks(
    harness: Harness, pg_url: str, jwks_server: JWKSServer, tokens: Tokens, editor, owner
):
    """600 chat ids are ~10 kB, over NOTIFY's 8000-byte payload limit."""
    bot = await harness.bot_key()
    channel = await create_channel(harness.client, owner)
    groups = [Group(chat_id=-1001100000000 - n, title=f"g{n}") for n in range(1, 601)]
    async with harness.sessionmaker() as session:
        session.add_all(groups)
        await session.flush()
        channel_id = await session.scalar(select(Channel.id).where(Channel.chat_id == CHANNEL_ID))
        assert channel_id is not None and channel["chat_id"] == CHANNEL_ID
        session.add_all(
            GroupChannel(group_id=g.id, channel_id=channel_id, position=0)  # pyrefly: ignore[bad-argument-type]
            for g in groups
        )
        await session.commit()
    async with replica(pg_url, jwks_server.url, tokens) as other:
        await listening(harness, other)
        group = -1001100000600
        before = await other.client.get(f"/api/v1/bot/groups/{group}/policy", headers=bot)
        assert before.json()["channels"][0]["title"] == f"Channel {CHANNEL_ID}"
        renamed = await harness.client.patch(
            f"/api/v1/channels/{CHANNEL_ID}", json={"title": "Renamed"}, headers=editor
        )
        assert renamed.status_code == 200, renamed.text

        async def renamed_there() -> bool:
            response = await other.client.get(f"/api/v1/bot/groups/{group}/policy", headers=bot)
            return response.json()["channels"][0]["title"] == "Renamed"

        await eventually(renamed_there, timeout=2)
        deleted = await harness.client.delete(
            f"/api/v1/channels/{CHANNEL_ID}", params={"force": "true"}, headers=editor
        )
        assert deleted.status_code == 204, deleted.text


# ---------------------------------------------------------------- PgBouncer, transaction mode


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def running_pgbouncer(pg_url: str, **options: str) -> Iterator[str]:
    """A real PgBouncer on a free port in front of the test database, with these settings;
    yields its URL."""
    binary = shutil.which("pgbouncer") or "/usr/sbin/pgbouncer"
    if not Path(binary).exists():
        if os.environ.get("CI"):
            pytest.fail("pgbouncer is not installed (.ci/run installs it)")
        pytest.skip("pgbouncer is not installed (apt-get install pgbouncer)")
    url = make_url(pg_url)
    port = free_port()
    workdir = Path(tempfile.mkdtemp(prefix="cg-pgbouncer-"))
    (workdir / "users.txt").write_text(f'"{url.username}" ""\n')
    settings = {
        "listen_addr": "127.0.0.1",
        "listen_port": str(port),
        "unix_socket_dir": "",
        "auth_type": "trust",
        "auth_file": str(workdir / "users.txt"),
        "default_pool_size": "4",
        "max_client_conn": "200",
        "logfile": str(workdir / "pgbouncer.log"),
        "pidfile": str(workdir / "pgbouncer.pid"),
        **options,
    }
    (workdir / "pgbouncer.ini").write_text(
        f"[databases]\n{url.database} = host={url.host} port={url.port or 5432}\n[pgbouncer]\n"
        + "".join(f"{key} = {value}\n" for key, value in settings.items())
    )
    command = [binary, str(workdir / "pgbouncer.ini")]
    if os.geteuid() == 0:  # PgBouncer refuses to run as root: it runs as postgres, here
        command[1:1] = ["-u", "postgres"]
        for path in (workdir, *workdir.iterdir()):
            shutil.chown(path, "postgres")
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)  # noqa: S603
    try:
        deadline = time.monotonic() + 10
        while True:
            with socket.socket() as sock:
                if sock.connect_ex(("127.0.0.1", port)) == 0:
                    break
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"pgbouncer did not start: {process.stderr.read()!r}")  # pyrefly: ignore[missing-attribute]
            time.sleep(0.05)
        yield url.set(port=port, host="127.0.0.1").render_as_string(False)
    finally:
        process.terminate()
        process.wait(10)
        shutil.rmtree(workdir, ignore_errors=True)


def self_signed(directory: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 and its key, as files PgBouncer and a client can read."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ip_address("127.0.0.1"))]), False
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
        .sign(key, hashes.SHA256())
    )
    cert_file, key_file = directory / "server.crt", directory / "server.key"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    for path in (directory, cert_file, key_file):
        path.chmod(0o755 if path.is_dir() else 0o644)
    return cert_file, key_file


async def test_a_tls_url_as_providers_hand_it_out(
    pg_url: str, jwks_server: JWKSServer, tokens: Tokens
):
    """`?sslmode=require` (and verify-full with the provider's CA) used to crash at start:
    here the database end only speaks TLS (PgBouncer terminating it), and channelgate
    migrates, serves and reaches it through the URL's own parameters."""
    await clean_database(pg_url)
    certs = Path(tempfile.mkdtemp(prefix="cg-tls-"))
    cert, key = self_signed(certs)
    tls = {
        "pool_mode": "session",
        "client_tls_sslmode": "require",
        "client_tls_cert_file": str(cert),
        "client_tls_key_file": str(key),
    }
    try:
        with running_pgbouncer(pg_url, **tls) as bouncer:
            plain = f"{bouncer}?sslmode=disable"
            for query in ("sslmode=require", f"sslmode=verify-full&sslrootcert={cert}"):
                async with replica(
                    f"{bouncer}?{query}", jwks_server.url, tokens, auto_migrate=True
                ) as harness:
                    owner = harness.auth(ENV_OWNER)
                    assert (await harness.client.get(GROUPS, headers=owner)).status_code == 200
                    assert (await harness.client.get("/readyz")).status_code == 200
            async with replica(plain, jwks_server.url, tokens) as harness:
                assert_503(await harness.client.get(GROUPS, headers=harness.auth(ENV_OWNER)))
    finally:
        shutil.rmtree(certs, ignore_errors=True)


@pytest.fixture
def pgbouncer(pg_url: str) -> Iterator[str]:
    """PgBouncer in transaction mode, as Supavisor's port 6543 pools."""
    with running_pgbouncer(pg_url, pool_mode="transaction") as url:
        yield url


async def test_everything_works_through_pgbouncer_in_transaction_mode(
    pg_url: str, pgbouncer: str, jwks_server: JWKSServer, tokens: Tokens
):
    """Transaction pooling: each transaction may run on another server connection, so no
    prepared statement may outlive it and LISTEN needs its own session URL.

    What a stalled database costs (503 within the timeouts) is the other tests' subject;
    here the waits are long enough to outlast one. With the defaults, this test failed CI
    three times (24-37 of 200 answers 503): for ~5 s every commit waited while the shared
    machine stalled (likely a WAL flush behind a checkpoint syncing thousands of the test
    databases' files; a notifying commit also waits for the one before it), and the 2 s
    pool and lock, 4 s statement and 5 s command timeouts cut the queue. A real fault in
    the pooling (a prepared statement reused on another backend, a session setting lost)
    fails on every attempt, whatever the timeouts."""
    await clean_database(pg_url)
    async with replica(
        pgbouncer,
        jwks_server.url,
        tokens,
        database_pool_mode="transaction",
        database_listen_url=pg_url,
        database_pool_timeout=30,
        database_lock_timeout=20,
        database_statement_timeout=25,
        database_command_timeout=30,
    ) as harness:
        await listening(harness)
        client, owner = harness.client, harness.auth(ENV_OWNER)
        bot = await harness.bot_key()
        await register_group(client, bot)
        await create_channel(client, owner)
        await link(client, owner, GROUP_ID, CHANNEL_ID)
        statuses: Counter[int] = Counter()
        acked: list[str] = []

        async def work(n: int) -> None:
            batch = [event(user_id=n * 100 + i + 1) for i in range(20)]
            for response in await asyncio.gather(
                client.post(VERIFICATIONS, json={"events": batch}, headers=bot),
                client.get(GROUPS, headers=owner),
                client.get(f"{GROUPS}/{GROUP_ID}", headers=owner),
                client.get("/api/v1/verifications", headers=owner),
                client.get("/api/v1/analytics/summary", headers=owner),
            ):
                statuses[response.status_code] += 1
                if response.url.path == VERIFICATIONS and response.is_success:
                    acked.extend(e["event_id"] for e in batch)

        async def worker(first: int) -> None:  # 8 at a time: 40 requests for 20 connections
            for n in range(first, 40, 8):
                await work(n)

        await asyncio.gather(*(worker(first) for first in range(8)))
        assert statuses == Counter({200: 200}), statuses
        # The pooler's server timeouts are set per transaction: a slow statement is cut.
        async with harness.sessionmaker() as session:
            timeout = await session.scalar(text("SHOW statement_timeout"))
        assert timeout == "25s"
        patched = await client.patch(f"{GROUPS}/{GROUP_ID}", json={"mode": "any"}, headers=owner)
        assert patched.status_code == 200
        assert (await client.get(POLICY, headers=bot)).json()["mode"] == "any"
        assert await count_events(pg_url, acked) == len(acked) == 800
